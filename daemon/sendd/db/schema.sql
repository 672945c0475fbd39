-- The sendd schema as it is after every migration (0001..0014), for reading: what each table,
-- function and trigger is for. `sendd migrate` builds and changes the schema with the files in
-- migrations/; this file is not run by sendd. A test (tests/test_schema_file.py) builds a
-- database from it and checks that its catalogue equals that of a database migrated from
-- nothing, so every migration updates this file too.
--
-- The design in four lines: applications insert messages (and campaigns) directly; daemons
-- claim them (`queued` -> `sending`), send them and write the outcomes into the same rows; every
-- counter, credit and ledger row is kept by statement-level triggers in the same transaction as
-- the change, whoever wrote it; claims never spend more than a tenant's credits can pay for.

CREATE SCHEMA sendd;

-- Which migrations `sendd migrate` has applied (created by sendd.db.migrate before the first).
CREATE TABLE sendd.schema_migration (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);


-- === Tenants and their credits ===============================================================

-- A tenant pays per accepted segment from its credits; rate_msgs_per_s caps its messages per
-- second across all accounts (0: unlimited); weight is its share of the throughput beside the
-- other tenants that have messages waiting (claims and senders split by weight; 0013).
CREATE TABLE sendd.tenant (
    id              text PRIMARY KEY,
    credits         bigint NOT NULL DEFAULT 0 CHECK (credits >= 0),
    active          boolean NOT NULL DEFAULT true,
    rate_msgs_per_s integer NOT NULL DEFAULT 0 CHECK (rate_msgs_per_s >= 0),  -- 0 = unlimited
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    weight          integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000)
);


-- === Campaigns ===============================================================================

-- A campaign is created `draft` (an application inserts its messages, then starts it:
-- `sending`, or `scheduled` until scheduled_at). Its counters are the triggers' to keep: total
-- counts its messages, sent every accepted one (delivered and undelivered included), and it is
-- completed once sent + failed + unknown + cancelled reaches total.
CREATE TABLE sendd.campaign (
    id           bigserial PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES sendd.tenant (id),
    name         text,
    status       text NOT NULL DEFAULT 'draft' CHECK (status IN
                 ('draft', 'scheduled', 'sending', 'paused', 'completed', 'cancelled')),
    pause_reason text,
    scheduled_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    total        bigint NOT NULL DEFAULT 0,
    sent         bigint NOT NULL DEFAULT 0,  -- accepted (delivered and undelivered too)
    failed       bigint NOT NULL DEFAULT 0,
    delivered    bigint NOT NULL DEFAULT 0,
    undelivered  bigint NOT NULL DEFAULT 0,
    unknown      bigint NOT NULL DEFAULT 0,
    cancelled    bigint NOT NULL DEFAULT 0
);
-- The pollers' list of campaigns to start or claim from.
CREATE INDEX campaign_active ON sendd.campaign (status) WHERE status IN ('scheduled', 'sending');


-- === Daemons =================================================================================

-- One row per running daemon; a message's lease is its owner's lease, so a live daemon keeps
-- every claim fresh with one row write per heartbeat instead of one per message. accounts: the
-- accounts it serves, so that any daemon can tell messages no daemon of the fleet will ever send
-- (an account named in no configuration) from messages merely waiting for another daemon.
CREATE TABLE sendd.instance (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL,
    stopped_at   timestamptz,
    accounts     text[] NOT NULL DEFAULT '{}',
    -- Sending at its share of each limit, Redis out of its reach (0014; sendd.shared.limits).
    limits_local boolean NOT NULL DEFAULT false
);


-- === Messages ================================================================================

-- One row per message, from queued to its outcome: the daemons write the provider's bulk id,
-- message id, status and error back into it. A message without a campaign is transactional
-- (the express lane). lease_owner: the daemon that claimed it.
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
-- The pollers' queues: per campaign, and transactional (no campaign) by priority. There is no
-- index on campaign_id alone: every status change would rewrite an entry of it (status updates
-- cannot be HOT), and campaign counts come from the campaign row.
CREATE INDEX message_campaign_queue ON sendd.message (campaign_id, next_attempt_at, id)
    WHERE status = 'queued' AND campaign_id IS NOT NULL;
CREATE INDEX message_transactional_queue ON sendd.message (priority DESC, next_attempt_at, id)
    WHERE status = 'queued' AND campaign_id IS NULL;
-- In-flight work: lease ownership (the reaper's adoption of a dead daemon's work).
CREATE INDEX message_in_flight ON sendd.message (tenant_id, lease_owner)
    WHERE status IN ('sending', 'unknown');
-- Delivery reports and lookups find their message by the provider's ids.
CREATE INDEX message_provider_message_id ON sendd.message (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX message_bulk_id ON sendd.message (bulk_id) WHERE bulk_id IS NOT NULL;

-- A durable "submitted" mark, one row per provider request, written before the request and
-- deleted with its outcome: after a crash, the open rows are exactly the work that may have
-- reached the provider (sendd.mark_submitted writes them).
CREATE TABLE sendd.submission (
    id          bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    account     text NOT NULL,
    message_ids bigint[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    adopted_at  timestamptz  -- set when a reaper took the mark over from a dead instance
);
CREATE INDEX submission_instance ON sendd.submission (instance_id);

-- Every credit change, with its reason ('send' rows are written by the counters trigger, one
-- per tenant and campaign and statement; 'set' and 'top-up' by `sendd tenant set`).
CREATE TABLE sendd.credit_ledger (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES sendd.tenant (id),
    campaign_id bigint REFERENCES sendd.campaign (id),
    delta       bigint NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_ledger_tenant ON sendd.credit_ledger (tenant_id);

-- Segments in flight (messages `sending` or `unknown`) per tenant, kept by the message
-- triggers, so that a claim reads its tenant's budget from a few rows instead of summing every
-- in-flight message. One row per tenant and server process that changed it (backend =
-- pg_backend_pid(); 0 holds folded rows): live server processes have distinct pids, so no two
-- transactions ever update the same row, and claims and writer flushes never wait for each
-- other here. sendd.fold_in_flight() folds the rows of ended processes into row 0.
CREATE TABLE sendd.tenant_in_flight (
    tenant_id text NOT NULL,
    backend   integer NOT NULL,
    segments  bigint NOT NULL,
    PRIMARY KEY (tenant_id, backend)
);

-- One row per pause in force (`sendd ctl pause`; `sendd ctl resume` deletes it). scope 'all'
-- has target ''.
CREATE TABLE sendd.pause (
    scope     text NOT NULL CHECK (scope IN ('all', 'tenant', 'account')),
    target    text NOT NULL,
    reason    text,
    paused_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, target),
    CHECK ((scope = 'all') = (target = ''))
);


-- === The rules ===============================================================================

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

-- 1 for the statuses the provider accepted (and the tenant is charged for), else 0.
CREATE FUNCTION sendd.is_accepted(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status IN ('sent', 'delivered', 'undelivered') THEN 1 ELSE 0 END
$$;

-- 1 for the statuses in flight (claimed, not settled: their segments are reserved), else 0.
CREATE FUNCTION sendd.is_in_flight(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status IN ('sending', 'unknown') THEN 1 ELSE 0 END
$$;

-- SMS segments of a body, exactly as sendd.core.segments counts them (a property test holds
-- the two together): GSM-7 when every character is in the GSM 03.38 alphabet, 160 septets in one
-- part, else 153 a part, extension characters 2 septets; otherwise UCS-2, 70 UTF-16 units in one
-- part, else 67, characters beyond the BMP 2 units. Regular expressions rather than a loop
-- (about 2 us a body); pack_segments packs the rare bodies over one segment that have 2-unit
-- characters, which never straddle two parts.
CREATE FUNCTION sendd.pack_segments(body text, pair text, part integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    units text := regexp_replace(body, '(' || pair || ')', E'\\1\x1b', 'g');  -- one char a unit
    total integer := length(units);
    used integer := 0;
    parts integer := 1;
BEGIN
    WHILE total - used > part LOOP
        -- The part's last unit begins a pair: the pair goes whole to the next part.
        used := used + part - (substr(units, used + part, 1) ~ pair)::integer;
        parts := parts + 1;
    END LOOP;
    RETURN parts;
END $$;

CREATE FUNCTION sendd.segments_needed(body text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        -- 70 bytes are at most 140 septets or 70 UTF-16 units: one part whatever the text.
        WHEN octet_length(body) <= 70 THEN 1
        WHEN body ~ '^[\n\r\u0020-\u003f@A-Z_a-z¡£¤¥§¿ÄÅÆÇÉÑÖØÜßàäåæèéìñòöøùüΓΔΘΛΞΠΣΦΨΩ]*$' THEN
            CASE WHEN length(body) <= 160 THEN 1 ELSE (length(body) + 152) / 153 END
        WHEN body ~ ('^[\n\r\u0020-\u003f@A-Z_a-z¡£¤¥§¿ÄÅÆÇÉÑÖØÜßàäåæèéìñòöøùüΓΔΘΛΞΠΣΦΨΩ'
                     '\f\[\\\]\^{|}~€]*$') THEN
            CASE WHEN 2 * length(body)
                      - length(regexp_replace(body, '[\f\[\\\]\^{|}~€]', '', 'g')) <= 160
                 THEN 1
                 ELSE sendd.pack_segments(body, '[\f\[\\\]\^{|}~€]', 153) END
        WHEN body !~ '[\U00010000-\U0010ffff]' THEN
            CASE WHEN length(body) <= 70 THEN 1 ELSE (length(body) + 66) / 67 END
        WHEN 2 * length(body)
             - length(regexp_replace(body, '[\U00010000-\U0010ffff]', '', 'g')) <= 70 THEN 1
        ELSE sendd.pack_segments(body, '[\U00010000-\U0010ffff]', 67)
    END
$$;

-- E.164 shape: an optional +, then 7 to 15 digits, the first not 0 (country codes never start
-- with 0). `sendd enqueue` also checks numbers with phonenumbers and queues only this shape.
CREATE FUNCTION sendd.recipient_valid(recipient text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(ltrim(recipient, '+')) BETWEEN 7 AND 15 AND recipient ~ '^\+?[1-9][0-9]*$'
$$;


-- === Segments in flight ======================================================================

CREATE FUNCTION sendd.in_flight_segments(tenant text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(segments), 0)::bigint FROM sendd.tenant_in_flight WHERE tenant_id = tenant
$$;

-- Add each tenant's delta (tenants unique) to this server process's rows.
CREATE FUNCTION sendd.add_in_flight(tenants text[], deltas bigint[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO sendd.tenant_in_flight AS f (tenant_id, backend, segments)
    SELECT u.tenant, pg_backend_pid(), u.delta FROM unnest(tenants, deltas) AS u(tenant, delta)
    WHERE u.delta <> 0
    ON CONFLICT (tenant_id, backend) DO UPDATE SET segments = f.segments + excluded.segments
$$;

-- Rows of server processes that have ended, folded into row 0. A live process's row is never
-- touched; a new process that reuses an ended one's pid waits for the delete and starts a new row.
CREATE FUNCTION sendd.fold_in_flight() RETURNS void
LANGUAGE sql AS $$
    WITH ended AS (
        DELETE FROM sendd.tenant_in_flight f
        WHERE f.backend <> 0
          AND f.backend NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
        RETURNING f.tenant_id, f.segments)
    INSERT INTO sendd.tenant_in_flight AS f (tenant_id, backend, segments)
    SELECT tenant_id, 0, sum(segments) FROM ended GROUP BY tenant_id
    ON CONFLICT (tenant_id, backend) DO UPDATE SET segments = f.segments + excluded.segments
$$;


-- === The counters trigger ====================================================================
-- Every UPDATE of messages, by any writer: one statement-level trigger works out what the
-- statement's status changes do to every counter (sendd.counter_deltas), then applies them in
-- named steps, always in this order: the segments in flight (this process's own rows: no wait),
-- the campaigns, the tenants. Rows are locked campaigns first, then tenants, each in id order,
-- so concurrent writers cannot deadlock; FOR NO KEY UPDATE, which does not block the FOR KEY
-- SHARE lock that every INSERT of a message or ledger row takes for its foreign keys.
-- Work is per statement, not per row: a 5,000-message writer flush is one scan of the
-- transition tables and a few aggregates. The steps are PL/pgSQL, which keeps their plans (a SQL
-- function that cannot be inlined is planned again on every call).

-- Messages (and their segments) that one statement moved into a status, per tenant and
-- campaign; negative when they moved out of it.
CREATE TYPE sendd.status_shift AS (
    tenant_id   text,
    campaign_id bigint,
    status      text,
    messages    bigint,
    segments    bigint
);

-- What a statement changed, per tenant and campaign: every campaign counter, the segments in
-- flight (sending or unknown) and the segments accepted (what the tenant is charged for).
CREATE TYPE sendd.counter_delta AS (
    tenant_id   text,
    campaign_id bigint,
    in_flight   bigint,
    sent        bigint,
    failed      bigint,
    delivered   bigint,
    undelivered bigint,
    unknown     bigint,
    cancelled   bigint,
    debit       bigint
);

-- The counters that status shifts change, per tenant and campaign; groups where nothing changed
-- (no status or segments changed) are left out, and NULL means nothing changed at all.
CREATE FUNCTION sendd.counter_deltas(shifts sendd.status_shift[]) RETURNS sendd.counter_delta[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN (
        SELECT array_agg(g.d) FROM (
            SELECT (s.tenant_id, s.campaign_id,
                    sum(sendd.is_in_flight(s.status) * s.segments),
                    sum(sendd.is_accepted(s.status) * s.messages),
                    sum((s.status = 'failed')::int * s.messages),
                    sum((s.status = 'delivered')::int * s.messages),
                    sum((s.status = 'undelivered')::int * s.messages),
                    sum((s.status = 'unknown')::int * s.messages),
                    sum((s.status = 'cancelled')::int * s.messages),
                    sum(sendd.is_accepted(s.status) * s.segments))::sendd.counter_delta AS d
            FROM unnest(shifts) AS s
            GROUP BY s.tenant_id, s.campaign_id) g
        WHERE (g.d).in_flight <> 0 OR (g.d).sent <> 0 OR (g.d).failed <> 0
           OR (g.d).delivered <> 0 OR (g.d).undelivered <> 0 OR (g.d).unknown <> 0
           OR (g.d).cancelled <> 0 OR (g.d).debit <> 0);
END $$;

-- Claims (queued -> sending) and releases (sending -> queued) change the segments in flight
-- and nothing else: no campaign or tenant row to lock.
CREATE FUNCTION sendd.only_in_flight(deltas sendd.counter_delta[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN NOT EXISTS (
        SELECT 1 FROM unnest(deltas) AS d
        WHERE d.sent <> 0 OR d.failed <> 0 OR d.delivered <> 0 OR d.undelivered <> 0
           OR d.unknown <> 0 OR d.cancelled <> 0 OR d.debit <> 0);
END $$;

CREATE FUNCTION sendd.add_in_flight_deltas(deltas sendd.counter_delta[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sendd.add_in_flight(array_agg(t.tenant_id), array_agg(t.in_flight))
    FROM (SELECT d.tenant_id, sum(d.in_flight)::bigint AS in_flight
          FROM unnest(deltas) AS d GROUP BY d.tenant_id) t;
END $$;

-- Campaign counters; a campaign whose messages all reached a send outcome is completed.
CREATE FUNCTION sendd.count_into_campaigns(deltas sendd.counter_delta[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    campaigns bigint[] := ARRAY(SELECT d.campaign_id FROM unnest(deltas) AS d);
BEGIN
    PERFORM 1 FROM sendd.campaign WHERE id = ANY (campaigns) ORDER BY id FOR NO KEY UPDATE;
    UPDATE sendd.campaign c SET
        sent = c.sent + d.sent, failed = c.failed + d.failed,
        delivered = c.delivered + d.delivered, undelivered = c.undelivered + d.undelivered,
        unknown = c.unknown + d.unknown, cancelled = c.cancelled + d.cancelled
    FROM (SELECT u.campaign_id, sum(u.sent) AS sent, sum(u.failed) AS failed,
                 sum(u.delivered) AS delivered, sum(u.undelivered) AS undelivered,
                 sum(u.unknown) AS unknown, sum(u.cancelled) AS cancelled
          FROM unnest(deltas) AS u WHERE u.campaign_id IS NOT NULL GROUP BY u.campaign_id) d
    WHERE c.id = d.campaign_id;
    UPDATE sendd.campaign c SET status = 'completed', finished_at = now(), pause_reason = NULL
    WHERE c.id = ANY (campaigns)
      AND c.status IN ('sending', 'paused')
      AND c.sent + c.failed + c.unknown + c.cancelled >= c.total;
END $$;

-- Credits: debit accepted segments (and give back what a settlement takes back), with a ledger
-- row per tenant and campaign.
CREATE FUNCTION sendd.charge_tenants(deltas sendd.counter_delta[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM sendd.tenant
    WHERE id = ANY (ARRAY(SELECT d.tenant_id FROM unnest(deltas) AS d))
    ORDER BY id FOR NO KEY UPDATE;
    INSERT INTO sendd.credit_ledger (tenant_id, campaign_id, delta, reason)
    SELECT d.tenant_id, d.campaign_id, -d.debit, 'send' FROM unnest(deltas) AS d
    WHERE d.debit <> 0;
    UPDATE sendd.tenant t SET credits = t.credits - d.debit, updated_at = now()
    FROM (SELECT u.tenant_id, sum(u.debit) AS debit
          FROM unnest(deltas) AS u GROUP BY u.tenant_id) d
    WHERE t.id = d.tenant_id AND d.debit <> 0;
END $$;

-- The transition tables are counted on their own, new rows +1 and old rows -1, never joined:
-- PL/pgSQL plans a trigger's statements once per server process, for the row counts of its
-- first call, and a join planned for one row would compare 5,000 x 5,000 rows on a later flush.
CREATE FUNCTION sendd.message_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deltas sendd.counter_delta[];
BEGIN
    deltas := sendd.counter_deltas(ARRAY(
        SELECT (r.tenant_id, r.campaign_id, r.status, sum(r.sign),
                sum(r.sign * r.segments))::sendd.status_shift
        FROM (SELECT n.tenant_id, n.campaign_id, n.status, n.segments, 1 AS sign
              FROM new_rows n
              UNION ALL
              SELECT o.tenant_id, o.campaign_id, o.status, o.segments, -1 FROM old_rows o) r
        GROUP BY r.tenant_id, r.campaign_id, r.status));
    IF deltas IS NULL THEN
        RETURN NULL;  -- no status or segments changed
    END IF;
    PERFORM sendd.add_in_flight_deltas(deltas);
    IF sendd.only_in_flight(deltas) THEN
        RETURN NULL;
    END IF;
    PERFORM sendd.count_into_campaigns(deltas);
    PERFORM sendd.charge_tenants(deltas);
    RETURN NULL;
END $$;

CREATE TRIGGER message_status_changed AFTER UPDATE ON sendd.message
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sendd.message_status_changed();


-- === What applications may write =============================================================
-- Applications insert into sendd.message and sendd.campaign directly, so the database itself
-- holds every new row to what sendd needs of it. The checks on messages run once per statement
-- over its transition table, not per row, so a COPY of a million rows pays a few scans.

-- Every insert statement (INSERT or COPY): a new message is `queued`, unclaimed and unattempted,
-- its tenant is its campaign's, and its campaign still takes messages (else the statement is
-- refused, with a message naming the column); the rest are counted into their campaigns, and
-- misfits are corrected by message_rewritten. The NOTIFY wakes the pollers.
CREATE FUNCTION sendd.message_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    campaign_ids bigint[];
    tenant_ids text[];
    counts bigint[];
    refused boolean;
    misfits bigint[];
    bad record;
BEGIN
    SELECT array_agg(g.campaign_id), array_agg(g.tenant_id), array_agg(g.count),
           bool_or(g.refused)
    INTO campaign_ids, tenant_ids, counts, refused
    FROM (SELECT campaign_id, tenant_id, count(*) AS count,
                 bool_or(status <> 'queued' OR lease_owner IS NOT NULL OR attempts <> 0)
                     AS refused
          FROM new_rows GROUP BY campaign_id, tenant_id) g;
    IF refused THEN
        SELECT id, status, lease_owner, attempts INTO bad FROM new_rows
        WHERE status <> 'queued' OR lease_owner IS NOT NULL OR attempts <> 0
        ORDER BY id LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = CASE
            WHEN bad.status <> 'queued' THEN format(
                'sendd.message.status of a new message must be ''queued'', not %L (message %s):'
                ' only sendd moves a message on', bad.status, bad.id)
            WHEN bad.lease_owner IS NOT NULL THEN format(
                'sendd.message.lease_owner of a new message must be NULL, not %L (message %s):'
                ' only a daemon''s claim sets it', bad.lease_owner, bad.id)
            ELSE format('sendd.message.attempts of a new message must be 0, not %s (message %s)',
                        bad.attempts, bad.id) END;
    END IF;

    -- Campaigns in id order, as the counters trigger locks them (no deadlock between the two);
    -- once locked, a campaign cannot complete or be cancelled while these rows join it.
    PERFORM 1 FROM sendd.campaign WHERE id = ANY (campaign_ids) ORDER BY id FOR NO KEY UPDATE;
    SELECT c.id, c.status, c.tenant_id AS owner, g.tenant INTO bad
    FROM unnest(campaign_ids, tenant_ids) AS g(campaign, tenant)
    JOIN sendd.campaign c ON c.id = g.campaign
    WHERE c.tenant_id <> g.tenant OR c.status IN ('completed', 'cancelled')
    ORDER BY c.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = CASE
            WHEN bad.owner <> bad.tenant THEN format(
                'sendd.message.tenant_id must be its campaign''s tenant: campaign %s belongs to'
                ' %L, not %L', bad.id, bad.owner, bad.tenant)
            ELSE format('sendd.message.campaign_id: campaign %s is %s and takes no more messages'
                        ' (create a new campaign)', bad.id, bad.status) END;
    END IF;
    UPDATE sendd.campaign c SET total = c.total + a.count
    FROM (SELECT campaign, sum(count) AS count
          FROM unnest(campaign_ids, counts) AS u(campaign, count)
          WHERE campaign IS NOT NULL GROUP BY campaign) a
    WHERE c.id = a.campaign;

    SELECT array_agg(id) INTO misfits FROM new_rows
    WHERE segments < sendd.segments_needed(body) OR NOT sendd.recipient_valid(recipient);
    IF misfits IS NOT NULL THEN
        -- Rewriting their segments runs them through message_rewritten, where the rule lives.
        UPDATE sendd.message SET segments = segments WHERE id = ANY (misfits);
    END IF;
    PERFORM pg_notify('sendd_queued', '');
    RETURN NULL;
END $$;

CREATE TRIGGER message_inserted AFTER INSERT ON sendd.message
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sendd.message_inserted();

-- The one place where a message row is corrected: segments raised to what the body needs; a
-- queued message to a malformed recipient failed (the counters trigger counts it). Fires only
-- for statements that set body, segments or recipient, which no daemon statement does.
CREATE FUNCTION sendd.message_rewritten() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.segments := greatest(NEW.segments, sendd.segments_needed(NEW.body));
    IF NEW.status = 'queued' AND NOT sendd.recipient_valid(NEW.recipient) THEN
        NEW.status := 'failed';
        NEW.error_code := 'INVALID_NUMBER';
        NEW.error_text := 'recipient is not an E.164 number: an optional +, then 7 to 15 '
                          'digits, the first not 0';
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER message_rewritten BEFORE UPDATE OF body, segments, recipient ON sendd.message
    FOR EACH ROW EXECUTE FUNCTION sendd.message_rewritten();

-- Deleting or truncating messages gives their segments in flight back.
CREATE FUNCTION sendd.message_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sendd.add_in_flight(array_agg(tenant_id), array_agg(-segments))
    FROM (SELECT tenant_id, sum(segments)::bigint AS segments FROM old_rows
          WHERE sendd.is_in_flight(status) = 1 GROUP BY tenant_id) f;
    RETURN NULL;
END $$;

CREATE TRIGGER message_deleted AFTER DELETE ON sendd.message
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION sendd.message_deleted();

CREATE FUNCTION sendd.message_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sendd.tenant_in_flight;
    RETURN NULL;
END $$;

CREATE TRIGGER message_truncated AFTER TRUNCATE ON sendd.message
    FOR EACH STATEMENT EXECUTE FUNCTION sendd.message_truncated();

-- The counters are sendd's to keep: a new campaign starts from zero.
CREATE FUNCTION sendd.campaign_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counter record;
BEGIN
    SELECT c.name, c.value INTO counter
    FROM (VALUES ('total', NEW.total), ('sent', NEW.sent), ('failed', NEW.failed),
                 ('delivered', NEW.delivered), ('undelivered', NEW.undelivered),
                 ('unknown', NEW.unknown), ('cancelled', NEW.cancelled)) AS c(name, value)
    WHERE c.value <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'sendd.campaign.%s of a new campaign must be 0, not %s: sendd keeps the counters',
            counter.name, counter.value);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER campaign_inserted BEFORE INSERT ON sendd.campaign
    FOR EACH ROW EXECUTE FUNCTION sendd.campaign_inserted();

-- A campaign started (by `sendd campaign start`, an application's UPDATE or its schedule) whose
-- every message already reached an outcome (e.g. all malformed numbers) is completed at once:
-- no status change of a message is left to complete it. An empty one stays `sending`.
CREATE FUNCTION sendd.campaign_started_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.status := 'completed';
    NEW.finished_at := now();
    NEW.pause_reason := NULL;
    RETURN NEW;
END $$;

CREATE TRIGGER campaign_started_finished BEFORE UPDATE OF status ON sendd.campaign
    FOR EACH ROW
    WHEN (NEW.status = 'sending' AND OLD.status <> 'sending' AND NEW.total > 0
          AND NEW.sent + NEW.failed + NEW.unknown + NEW.cancelled >= NEW.total)
    EXECUTE FUNCTION sendd.campaign_started_finished();


-- === Claims ==================================================================================
-- Both lanes claim with these functions: the campaign pollers in a transaction of their own
-- (statements in sendd/db/claims.py), the express lane in one call (sendd.claim_express).
--
-- Claim slots: up to N claims of one tenant's messages may run at once (several pollers,
-- several daemons), each spending at most an equal share of a budget that was at least N shares
-- when it was read, so together they can never overspend. A tenant with less budget than that
-- is claimed by one claimer alone, against its exact budget. Advisory locks, not a row lock on
-- the tenant, because the counters trigger locks that row for every writer flush and must not
-- wait for a claim in progress.
--
-- The claim's steps use generic plans (plan_cache_mode): by the sizes of their array arguments,
-- custom plans would be made again on every call, and the plans do not depend on those sizes
-- (index lookups by id, and the queue indexes).

-- A tenant's gate lock (key first_key - 1) is held shared by every claimer in a slot and
-- exclusively by a claimer alone; PostgreSQL queues a shared request behind a waiting exclusive
-- one, so a claimer alone is never starved by a stream of slot claimers. A claimer in a slot
-- takes one of the slots first_slot..last_slot (campaign pollers and the express lane use
-- separate ranges, so a transactional claim never waits for a campaign claim).
-- Locks are taken tenant by tenant in the order given (the caller sorts), the gate before the
-- slot; try-locks never wait, so every wait is in that one global order: no deadlock.
-- (Transaction-level advisory locks, two-key form: (first_key + slot, hashtext(tenant)).)
CREATE FUNCTION sendd.lock_claim_slots(tenants text[], exclusive boolean[], first_key integer,
                                       first_slot integer, last_slot integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    slot integer;
    got boolean;
BEGIN
    FOR i IN 1 .. coalesce(array_length(tenants, 1), 0) LOOP
        IF exclusive[i] THEN
            PERFORM pg_advisory_xact_lock(first_key - 1, hashtext(tenants[i]));
            CONTINUE;
        END IF;
        PERFORM pg_advisory_xact_lock_shared(first_key - 1, hashtext(tenants[i]));
        got := false;
        FOR slot IN first_slot .. last_slot LOOP
            got := pg_try_advisory_xact_lock(first_key + slot, hashtext(tenants[i]));
            EXIT WHEN got;
        END LOOP;
        IF NOT got THEN  -- every slot of the range busy: wait for its first
            PERFORM pg_advisory_xact_lock(first_key + first_slot, hashtext(tenants[i]));
        END IF;
    END LOOP;
END $$;

-- What a tenant can still pay for: its credits minus the segments it has in flight (NULL: no
-- such tenant). Credits and in-flight segments change together in every writer commit, so their
-- difference is consistent in any one snapshot.
CREATE FUNCTION sendd.tenant_budget(tenant text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT t.credits - sendd.in_flight_segments(t.id) FROM sendd.tenant t
            WHERE t.id = tenant);
END $$;

-- Whether a claimer takes a tenant alone (its gate shut) rather than in one of its slots, by the
-- budget it saw last (NULL: never seen, so alone once). A guess only: the budget is read again
-- under the locks, and sendd.spendable holds a claimer in a slot to what is safe.
CREATE FUNCTION sendd.claims_alone(seen_budget bigint, share bigint, slots integer)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(seen_budget, 0) < slots::bigint * share
$$;

-- What one claim may spend of a tenant's budget, read under its claim locks. Alone: all of it.
-- In a slot: one share, and only while the budget still covers a share for every slot; once it
-- does not, nothing this time, and the next claim goes alone.
CREATE FUNCTION sendd.spendable(budget bigint, alone boolean, share bigint, slots integer)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN alone THEN budget WHEN budget >= slots::bigint * share THEN share ELSE 0 END
$$;

-- Take the claim locks of `tenants` (sorted by the caller; slots first_slot..last_slot), then
-- read their budgets: one row per tenant, in the order given, with what this claim may spend.
-- The budgets are read by a statement of their own, after the locks are held, so its snapshot
-- (READ COMMITTED) sees every commit of the claimers before.
CREATE FUNCTION sendd.claim_budgets(tenants text[], seen_tenants text[], seen_budgets bigint[],
                                    share bigint, slots integer, first_key integer,
                                    first_slot integer, last_slot integer)
RETURNS TABLE (tenant_id text, budget bigint, spendable bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    alone boolean[];
BEGIN
    SELECT array_agg(sendd.claims_alone(k.budget, share, slots) ORDER BY u.ord) INTO alone
    FROM unnest(tenants) WITH ORDINALITY AS u(tenant, ord)
    LEFT JOIN unnest(seen_tenants, seen_budgets) AS k(tenant, budget) ON k.tenant = u.tenant;
    PERFORM sendd.lock_claim_slots(tenants, alone, first_key, first_slot, last_slot);
    RETURN QUERY
    WITH read AS MATERIALIZED (  -- each budget read once
        SELECT u.tenant, u.alone, u.ord, coalesce(sendd.tenant_budget(u.tenant), 0) AS budget
        FROM unnest(tenants, alone) WITH ORDINALITY AS u(tenant, alone, ord))
    SELECT r.tenant, r.budget, sendd.spendable(r.budget, r.alone, share, slots)
    FROM read r ORDER BY r.ord;
END $$;

-- A message a claim may take, locked by the claim (FOR UPDATE SKIP LOCKED).
CREATE TYPE sendd.claim_candidate AS (id bigint, tenant_id text, segments integer);

-- A claimed message: what a sender needs of it (sendd.model.Message).
CREATE TYPE sendd.claimed_message AS (
    id          bigint,
    tenant_id   text,
    campaign_id bigint,
    account     text,
    sender      text,
    recipient   text,
    body        text,
    segments    integer,
    attempts    integer
);

-- Claim for `instance` what each tenant can pay for out of `candidates`: per tenant, in id order,
-- while their segments add up to no more than its `spendable` (tenants and spendable: one entry
-- per tenant, from sendd.claim_budgets). Fenced by the instance's own live lease, locked FOR KEY
-- SHARE so that a reaper cannot adopt it mid-claim: a daemon whose work was adopted never claims
-- rows that no lease would ever cover.
CREATE FUNCTION sendd.claim_affordable(instance text, candidates sendd.claim_candidate[],
                                       tenants text[], spendable bigint[])
RETURNS SETOF sendd.claimed_message
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    WITH affordable AS (
        SELECT c.id FROM (
            SELECT c.id, s.budget, sum(c.segments) OVER (
                PARTITION BY c.tenant_id ORDER BY c.id) AS cost
            FROM unnest(candidates) AS c
            JOIN unnest(tenants, spendable) AS s(tenant_id, budget) USING (tenant_id)) c
        WHERE c.cost <= c.budget
    ), lease AS (
        SELECT 1 FROM sendd.instance i
        WHERE i.id = instance AND i.stopped_at IS NULL AND i.lease_until > now() FOR KEY SHARE
    )
    UPDATE sendd.message m SET status = 'sending', lease_owner = instance
    FROM affordable a WHERE m.id = a.id AND sendd.transition_allowed(m.status, 'sending')
      AND EXISTS (SELECT 1 FROM lease)
    RETURNING m.id, m.tenant_id, m.campaign_id, m.account, m.sender, m.recipient, m.body,
              m.segments, m.attempts;
END $$;

-- The lock a mark holds shared and a pause command exclusive: a pause waits for the marks being
-- written as it comes, and every mark after it sees it. Once `sendd ctl pause` has returned, no
-- batch it covers gets a mark; only requests marked before it go out.
CREATE FUNCTION sendd.pause_lock() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 6000288133852255571::bigint $$;  -- "SENDPAUS"

-- The durable "submitted" mark of one provider request, written before the request. Only while
-- the instance's lease outlives the request (a lease_margin of seconds: the request must end
-- before the lease does), every message is still this instance's (a claim that a database crash
-- undid is not), no campaign of the request is cancelled or paused (locked FOR KEY SHARE, so
-- that it cannot be stopped until this commits) and no operator pause (sendd.pause) covers its
-- account, a tenant of its messages or everything. The mark's id, NULL when it was not written,
-- and why: alive (the lease is live at all), held (every message is ours), stopped (a campaign
-- stopped or a pause), paused (a pause).
CREATE FUNCTION sendd.mark_submitted(instance text, account text, message_ids bigint[],
                                     lease_margin float8, campaign_ids bigint[])
RETURNS TABLE (id bigint, alive boolean, held boolean, stopped boolean, paused boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(sendd.pause_lock());
    RETURN QUERY  -- a statement of its own, so its snapshot sees every pause committed before
    WITH lease AS (
        SELECT i.lease_until > now() + make_interval(secs => lease_margin) AS covers
        FROM sendd.instance i
        WHERE i.id = instance AND i.stopped_at IS NULL AND i.lease_until > now()
    ), ours AS (
        SELECT count(*) = cardinality(message_ids) AS all_ours,
               array_agg(DISTINCT m.tenant_id) AS tenants
        FROM sendd.message m
        WHERE m.id = ANY (message_ids) AND m.lease_owner = instance
    ), campaign AS (
        SELECT c.status FROM sendd.campaign c WHERE c.id = ANY (campaign_ids) FOR KEY SHARE
    ), campaigns_stopped AS (
        SELECT coalesce(bool_or(c.status IN ('cancelled', 'paused')), false) AS any_stopped
        FROM campaign c
    ), pauses AS (
        SELECT EXISTS (
            SELECT 1 FROM sendd.pause p, ours o
            WHERE p.scope = 'all' OR (p.scope = 'account' AND p.target = account)
               OR (p.scope = 'tenant' AND p.target = ANY (o.tenants))
        ) AS any_paused
    ), mark AS (
        INSERT INTO sendd.submission (instance_id, account, message_ids)
        SELECT instance, account, message_ids
        WHERE (SELECT l.covers FROM lease l) AND (SELECT o.all_ours FROM ours o)
          AND NOT (SELECT s.any_stopped FROM campaigns_stopped s)
          AND NOT (SELECT p.any_paused FROM pauses p)
        RETURNING sendd.submission.id
    )
    SELECT (SELECT k.id FROM mark k), EXISTS (SELECT 1 FROM lease),
           (SELECT o.all_ours FROM ours o),
           (SELECT s.any_stopped FROM campaigns_stopped s) OR (SELECT p.any_paused FROM pauses p),
           (SELECT p.any_paused FROM pauses p);
END $$;

-- The express lane's claim, one server-side call in autocommit (the transaction, and with it the
-- locks, end with the call; committed synchronously, so the marks are on disk when it returns):
-- the due transactional messages of every tenant that has some, claimed with the steps above,
-- cut into batches and marked submitted: one round trip and one commit from ready to go.
--
-- accounts / batch_sizes: the accounts to claim for and the largest batch of each (provider
-- limit, 413 cap, account rate limits); limited_tenants / tenant_limits: tenants with a message
-- rate limit, which caps a batch too. One mark per batch: per account and tenant, at most that
-- many messages. known_tenants / known_budgets: the budgets the caller saw last (the slot or
-- alone guess). slot: the express lane's claim slot. mark_margin: seconds the lease must still
-- have for the marks to be written; without them the messages come back with no mark and the
-- sender writes one once the heartbeat has renewed the lease.
--
-- Rows: the claimed messages with their batch (numbered per account and tenant), its mark (or
-- NULL) and their tenant's budget; and for every tenant that got nothing, one row with only
-- tenant_id and budget.
CREATE FUNCTION sendd.claim_express(
    instance text, accounts text[], batch_sizes integer[], paused text[], chunk integer,
    limited_tenants text[], tenant_limits integer[], known_tenants text[], known_budgets bigint[],
    share bigint, slots integer, first_key integer, slot integer, mark_margin float8)
RETURNS TABLE (id bigint, tenant_id text, campaign_id bigint, account text, sender text,
               recipient text, body text, segments integer, attempts integer,
               batch bigint, submission_id bigint, budget bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    tenants text[];
    budgets bigint[];
    spendable bigint[];
    claimed sendd.claimed_message[];
BEGIN
    SELECT array_agg(t.id ORDER BY t.id) INTO tenants FROM sendd.tenant t
    WHERE t.active AND NOT (t.id = ANY (paused)) AND EXISTS (
        SELECT 1 FROM sendd.message m
        WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued');
    IF tenants IS NULL OR coalesce(cardinality(accounts), 0) = 0 THEN
        RETURN;
    END IF;

    SELECT array_agg(b.tenant_id), array_agg(b.budget), array_agg(b.spendable)
    INTO tenants, budgets, spendable
    FROM sendd.claim_budgets(tenants => tenants, seen_tenants => known_tenants,
                             seen_budgets => known_budgets, share => share, slots => slots,
                             first_key => first_key, first_slot => slot, last_slot => slot) b;
    SELECT array_agg(c) INTO claimed
    FROM sendd.claim_affordable(
        instance => instance,
        candidates => ARRAY(
            SELECT (q.id, q.tenant_id, q.segments)::sendd.claim_candidate
            FROM unnest(tenants) AS t(id) CROSS JOIN LATERAL (
                SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
                WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued'
                  AND m.next_attempt_at <= now() AND m.account = ANY (accounts)
                ORDER BY m.priority DESC, m.next_attempt_at, m.id LIMIT chunk
                FOR UPDATE SKIP LOCKED) q),
        tenants => tenants, spendable => spendable) c;

    RETURN QUERY
    WITH batched AS (
        SELECT c.*, (row_number() OVER (PARTITION BY c.account, c.tenant_id ORDER BY c.id) - 1)
                    / least(s.size, coalesce(l.limit_, s.size)) AS batch
        FROM unnest(claimed) c
        JOIN unnest(accounts, batch_sizes) AS s(account, size) USING (account)
        LEFT JOIN unnest(limited_tenants, tenant_limits) AS l(tenant_id, limit_) USING (tenant_id)
    ), marked AS MATERIALIZED (
        SELECT g.account, g.tenant_id, g.batch, k.id AS submission_id
        FROM (SELECT b.account, b.tenant_id, b.batch, array_agg(b.id ORDER BY b.id) AS ids
              FROM batched b GROUP BY b.account, b.tenant_id, b.batch) g
        CROSS JOIN LATERAL sendd.mark_submitted(
            instance => instance, account => g.account, message_ids => g.ids,
            lease_margin => mark_margin, campaign_ids => '{}') k
    )
    SELECT b.id, b.tenant_id, b.campaign_id, b.account, b.sender, b.recipient, b.body,
           b.segments, b.attempts, b.batch, k.submission_id, u.budget
    FROM batched b JOIN marked k USING (account, tenant_id, batch)
    JOIN unnest(tenants, budgets) AS u(tenant_id, budget) USING (tenant_id)
    UNION ALL
    SELECT NULL, u.tenant_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, u.budget
    FROM unnest(tenants, budgets) AS u(tenant_id, budget)
    WHERE NOT EXISTS (SELECT 1 FROM unnest(claimed) c WHERE c.tenant_id = u.tenant_id)
    ORDER BY 4, 2, 10, 1;
END $$;
