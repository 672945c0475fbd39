-- The counters trigger locks campaign and tenant rows FOR NO KEY UPDATE instead of FOR UPDATE:
-- it changes no key, and FOR UPDATE also blocks the FOR KEY SHARE lock that every INSERT of a
-- message (and of a ledger row) takes on its tenant and campaign for the foreign key check: an
-- application queueing messages waited for every writer flush of that tenant, and the writers
-- for the application's open INSERT transactions.
-- The function is otherwise the one of 0001_schema.sql.
CREATE OR REPLACE FUNCTION sendd.message_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Claims (queued -> sending) and releases (sending -> queued) change no counter.
    IF NOT EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
                   WHERE n.status <> o.status AND n.status <> 'sending'
                     AND NOT (o.status = 'sending' AND n.status = 'queued')) THEN
        RETURN NULL;
    END IF;

    -- Lock campaigns, then tenants, in id order, so concurrent writers cannot deadlock.
    PERFORM 1 FROM sendd.campaign WHERE id IN (SELECT campaign_id FROM new_rows)
        ORDER BY id FOR NO KEY UPDATE;
    UPDATE sendd.campaign c SET
        sent = c.sent + d.sent, failed = c.failed + d.failed,
        delivered = c.delivered + d.delivered, undelivered = c.undelivered + d.undelivered,
        unknown = c.unknown + d.unknown, cancelled = c.cancelled + d.cancelled
    FROM (SELECT n.campaign_id,
                 sum(sendd.is_accepted(n.status) - sendd.is_accepted(o.status)) AS sent,
                 sum((n.status = 'failed')::int - (o.status = 'failed')::int) AS failed,
                 sum((n.status = 'delivered')::int - (o.status = 'delivered')::int) AS delivered,
                 sum((n.status = 'undelivered')::int - (o.status = 'undelivered')::int)
                     AS undelivered,
                 sum((n.status = 'unknown')::int - (o.status = 'unknown')::int) AS unknown,
                 sum((n.status = 'cancelled')::int - (o.status = 'cancelled')::int) AS cancelled
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.campaign_id IS NOT NULL AND n.status <> o.status
          GROUP BY n.campaign_id) d
    WHERE c.id = d.campaign_id;
    -- A campaign whose messages all reached a send outcome is completed.
    UPDATE sendd.campaign c SET status = 'completed', finished_at = now(), pause_reason = NULL
    WHERE c.id IN (SELECT campaign_id FROM new_rows)
      AND c.status IN ('sending', 'paused')
      AND c.sent + c.failed + c.unknown + c.cancelled >= c.total;

    -- Credits: debit accepted segments (and give back what a settlement takes back), with a
    -- ledger row per tenant and campaign for this write.
    PERFORM 1 FROM sendd.tenant WHERE id IN (SELECT tenant_id FROM new_rows)
        ORDER BY id FOR NO KEY UPDATE;
    WITH debit AS (
        SELECT n.tenant_id, n.campaign_id,
               sum((sendd.is_accepted(n.status) - sendd.is_accepted(o.status)) * n.segments)
                   AS segments
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status <> o.status
        GROUP BY n.tenant_id, n.campaign_id
    ), ledger AS (
        INSERT INTO sendd.credit_ledger (tenant_id, campaign_id, delta, reason)
        SELECT tenant_id, campaign_id, -segments, 'send' FROM debit WHERE segments <> 0
    )
    UPDATE sendd.tenant t SET credits = t.credits - d.segments, updated_at = now()
    FROM (SELECT tenant_id, sum(segments) AS segments FROM debit GROUP BY tenant_id) d
    WHERE t.id = d.tenant_id AND d.segments <> 0;
    RETURN NULL;
END $$;
