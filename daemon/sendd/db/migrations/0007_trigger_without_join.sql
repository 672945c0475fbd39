-- The counters trigger without a join of its transition tables. It joined new_rows to
-- old_rows on the message id, and PL/pgSQL plans that join once per server process, for the
-- row counts of its first call: a connection whose first status change was one message (an
-- express claim, a small writer flush) kept a nested loop, and every later 5,000-row flush on
-- it compared 5,000 x 5,000 rows (seconds each: the writer stalls seen with several daemons).
-- Each transition row now counts on its own, new rows +1 and old rows -1, and the sums per
-- (tenant, campaign) are the same deltas; a scan and an aggregate, linear whatever the plan.
-- `counted` (anything beyond the in-flight segments to do) is now "some counter changed": the
-- statuses that no counter sees are exactly queued and sending, the claims and releases that
-- the old condition left out. Everything else is as in 0005.
CREATE OR REPLACE FUNCTION sendd.message_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tenant_ids text[];
    campaign_ids bigint[];
    in_flight bigint[];
    sent bigint[];
    failed bigint[];
    delivered bigint[];
    undelivered bigint[];
    unknown bigint[];
    cancelled bigint[];
    debit bigint[];
    counted boolean;
BEGIN
    SELECT array_agg(c.tenant_id), array_agg(c.campaign_id), array_agg(c.in_flight),
           array_agg(c.sent), array_agg(c.failed), array_agg(c.delivered),
           array_agg(c.undelivered), array_agg(c.unknown), array_agg(c.cancelled),
           array_agg(c.debit),
           bool_or(c.sent <> 0 OR c.failed <> 0 OR c.delivered <> 0 OR c.undelivered <> 0
                   OR c.unknown <> 0 OR c.cancelled <> 0 OR c.debit <> 0)  -- beyond in_flight
    INTO tenant_ids, campaign_ids, in_flight, sent, failed, delivered, undelivered, unknown,
         cancelled, debit, counted
    FROM (SELECT r.tenant_id, r.campaign_id,
                 sum(r.sign * sendd.is_in_flight(r.status) * r.segments) AS in_flight,
                 sum(r.sign * sendd.is_accepted(r.status)) AS sent,
                 sum(r.sign * (r.status = 'failed')::int) AS failed,
                 sum(r.sign * (r.status = 'delivered')::int) AS delivered,
                 sum(r.sign * (r.status = 'undelivered')::int) AS undelivered,
                 sum(r.sign * (r.status = 'unknown')::int) AS unknown,
                 sum(r.sign * (r.status = 'cancelled')::int) AS cancelled,
                 sum(r.sign * sendd.is_accepted(r.status) * r.segments) AS debit
          FROM (SELECT n.tenant_id, n.campaign_id, n.status, n.segments, 1 AS sign
                FROM new_rows n
                UNION ALL
                SELECT o.tenant_id, o.campaign_id, o.status, o.segments, -1
                FROM old_rows o) r
          GROUP BY r.tenant_id, r.campaign_id) c
    -- Groups where nothing changed (no status or segments changed) drop out, as the join's
    -- filter dropped unchanged rows: a statement that changes no status returns here.
    WHERE c.in_flight <> 0 OR c.sent <> 0 OR c.failed <> 0 OR c.delivered <> 0
       OR c.undelivered <> 0 OR c.unknown <> 0 OR c.cancelled <> 0 OR c.debit <> 0;
    IF tenant_ids IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM sendd.add_in_flight(array_agg(u.tenant), array_agg(u.delta))
    FROM (SELECT tenant, sum(delta)::bigint AS delta
          FROM unnest(tenant_ids, in_flight) AS d(tenant, delta) GROUP BY tenant) u;
    IF NOT counted THEN
        RETURN NULL;
    END IF;

    PERFORM 1 FROM sendd.campaign WHERE id = ANY (campaign_ids) ORDER BY id FOR NO KEY UPDATE;
    UPDATE sendd.campaign c SET
        sent = c.sent + d.sent, failed = c.failed + d.failed,
        delivered = c.delivered + d.delivered, undelivered = c.undelivered + d.undelivered,
        unknown = c.unknown + d.unknown, cancelled = c.cancelled + d.cancelled
    FROM (SELECT id, sum(s) AS sent, sum(f) AS failed, sum(dl) AS delivered,
                 sum(ud) AS undelivered, sum(uk) AS unknown, sum(cn) AS cancelled
          FROM unnest(campaign_ids, sent, failed, delivered, undelivered, unknown, cancelled)
               AS u(id, s, f, dl, ud, uk, cn)
          WHERE id IS NOT NULL GROUP BY id) d
    WHERE c.id = d.id;
    -- A campaign whose messages all reached a send outcome is completed.
    UPDATE sendd.campaign c SET status = 'completed', finished_at = now(), pause_reason = NULL
    WHERE c.id = ANY (campaign_ids)
      AND c.status IN ('sending', 'paused')
      AND c.sent + c.failed + c.unknown + c.cancelled >= c.total;

    -- Credits: debit accepted segments (and give back what a settlement takes back), with a
    -- ledger row per tenant and campaign for this write.
    PERFORM 1 FROM sendd.tenant WHERE id = ANY (tenant_ids) ORDER BY id FOR NO KEY UPDATE;
    INSERT INTO sendd.credit_ledger (tenant_id, campaign_id, delta, reason)
    SELECT u.tenant, u.campaign, -u.segments, 'send'
    FROM unnest(tenant_ids, campaign_ids, debit) AS u(tenant, campaign, segments)
    WHERE u.segments <> 0;
    UPDATE sendd.tenant t SET credits = t.credits - d.segments, updated_at = now()
    FROM (SELECT tenant, sum(segments) AS segments
          FROM unnest(tenant_ids, debit) AS u(tenant, segments) GROUP BY tenant) d
    WHERE t.id = d.tenant AND d.segments <> 0;
    RETURN NULL;
END $$;
