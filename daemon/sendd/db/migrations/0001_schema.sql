-- sendd schema, version 1.
-- Counters, campaign completion, credits and the ledger are kept by statement-level
-- triggers, so every write path (the daemon, `sendd campaign cancel`, an application
-- updating rows itself) keeps them exact in the same transaction, at one aggregate
-- per statement rather than per row.

CREATE TABLE sendd.tenant (
    id              text PRIMARY KEY,
    credits         bigint NOT NULL DEFAULT 0 CHECK (credits >= 0),
    active          boolean NOT NULL DEFAULT true,
    rate_msgs_per_s integer NOT NULL DEFAULT 0 CHECK (rate_msgs_per_s >= 0),  -- 0 = unlimited
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sendd.campaign (
    id           bigserial PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES sendd.tenant (id),
    name         text,
    status       text NOT NULL DEFAULT 'sending' CHECK (status IN
                 ('draft', 'scheduled', 'sending', 'paused', 'completed', 'cancelled')),
    pause_reason text,
    scheduled_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    total        bigint NOT NULL DEFAULT 0,
    sent         bigint NOT NULL DEFAULT 0,  -- accepted by the provider (incl. delivered/undelivered)
    failed       bigint NOT NULL DEFAULT 0,
    delivered    bigint NOT NULL DEFAULT 0,
    undelivered  bigint NOT NULL DEFAULT 0,
    unknown      bigint NOT NULL DEFAULT 0,
    cancelled    bigint NOT NULL DEFAULT 0
);
CREATE INDEX campaign_active ON sendd.campaign (status) WHERE status IN ('scheduled', 'sending');

-- One row per running daemon; a message's lease is its owner's lease, so a live daemon
-- keeps every claim fresh with one row write per heartbeat instead of one per message.
CREATE TABLE sendd.instance (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL,
    stopped_at   timestamptz
);

CREATE TABLE sendd.message (
    id                  bigserial PRIMARY KEY,
    tenant_id           text NOT NULL REFERENCES sendd.tenant (id),
    campaign_id         bigint REFERENCES sendd.campaign (id),
    account             text NOT NULL,
    sender              text,
    recipient           text NOT NULL,
    body                text NOT NULL,
    priority            smallint NOT NULL DEFAULT 0,
    status              text NOT NULL DEFAULT 'queued' CHECK (status IN
                        ('queued', 'sending', 'sent', 'delivered', 'undelivered', 'failed',
                         'unknown', 'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    bulk_id             text,
    provider_message_id text,
    error_code          text,
    error_text          text,
    segments            integer NOT NULL DEFAULT 1 CHECK (segments >= 1),
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    finished_at         timestamptz
);
-- The poller's queues: per campaign, and transactional (no campaign) by priority.
CREATE INDEX message_campaign_queue ON sendd.message (campaign_id, next_attempt_at, id)
    WHERE status = 'queued' AND campaign_id IS NOT NULL;
CREATE INDEX message_transactional_queue ON sendd.message (priority DESC, next_attempt_at, id)
    WHERE status = 'queued' AND campaign_id IS NULL;
-- In-flight work: credit reservations and lease ownership.
CREATE INDEX message_in_flight ON sendd.message (tenant_id, lease_owner)
    WHERE status IN ('sending', 'unknown');
CREATE INDEX message_provider_message_id ON sendd.message (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX message_bulk_id ON sendd.message (bulk_id) WHERE bulk_id IS NOT NULL;
CREATE INDEX message_campaign ON sendd.message (campaign_id);

-- A durable "submitted" mark, one row per provider request, written before the request and
-- deleted with its outcome: after a crash, the open rows are exactly the work that may have
-- reached the provider.
CREATE TABLE sendd.submission (
    id          bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    account     text NOT NULL,
    message_ids bigint[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    adopted_at  timestamptz  -- set when a reaper took the mark over from a dead instance
);
CREATE INDEX submission_instance ON sendd.submission (instance_id);

CREATE TABLE sendd.credit_ledger (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES sendd.tenant (id),
    campaign_id bigint REFERENCES sendd.campaign (id),
    delta       bigint NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_ledger_tenant ON sendd.credit_ledger (tenant_id);

-- The message state machine, in one place. Every statement that changes a status says
-- `AND sendd.transition_allowed(m.status, <new>)`, so no write path can regress a final status.
CREATE FUNCTION sendd.transition_allowed(old_status text, new_status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (old_status, new_status) IN (
        ('queued', 'sending'), ('queued', 'cancelled'),
        ('sending', 'queued'), ('sending', 'sent'), ('sending', 'failed'),
        ('sending', 'unknown'), ('sending', 'cancelled'),
        ('unknown', 'sent'), ('unknown', 'queued'), ('unknown', 'failed'),
        ('unknown', 'delivered'), ('unknown', 'undelivered'),
        ('sent', 'delivered'), ('sent', 'undelivered')
    )
$$;

CREATE FUNCTION sendd.is_accepted(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status IN ('sent', 'delivered', 'undelivered') THEN 1 ELSE 0 END
$$;

CREATE FUNCTION sendd.message_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sendd.campaign c SET total = c.total + n.count
    FROM (SELECT campaign_id, count(*) AS count FROM new_rows
          WHERE campaign_id IS NOT NULL GROUP BY campaign_id) n
    WHERE c.id = n.campaign_id;
    PERFORM pg_notify('sendd_queued', '');
    RETURN NULL;
END $$;

CREATE TRIGGER message_inserted AFTER INSERT ON sendd.message
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sendd.message_inserted();

CREATE FUNCTION sendd.message_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Claims (queued -> sending) and releases (sending -> queued) change no counter.
    IF NOT EXISTS (SELECT 1 FROM new_rows n JOIN old_rows o ON o.id = n.id
                   WHERE n.status <> o.status AND n.status <> 'sending'
                     AND NOT (o.status = 'sending' AND n.status = 'queued')) THEN
        RETURN NULL;
    END IF;

    -- Lock campaigns, then tenants, in id order, so concurrent writers cannot deadlock.
    PERFORM 1 FROM sendd.campaign WHERE id IN (SELECT campaign_id FROM new_rows)
        ORDER BY id FOR UPDATE;
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
        ORDER BY id FOR UPDATE;
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

CREATE TRIGGER message_status_changed AFTER UPDATE ON sendd.message
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sendd.message_status_changed();
