-- Operator pauses of a tenant, an account or everything, stored: they survive a restart and
-- reach every daemon on the database (each reads the table once a second, sendd.actors.
-- housekeeper), and the submission mark refuses a batch they cover, so that a batch claimed
-- before a pause is not sent after it, whichever daemon holds it.
--
-- sendd.mark_submitted keeps its arguments and its columns (a daemon of the previous release
-- reads them by name during an upgrade) and gains `paused`; `stopped` is set for a pause too, so
-- that such a daemon releases the batch as it does for a stopped campaign.

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

-- The lock a mark holds shared and a pause command exclusive: a pause waits for the marks being
-- written as it comes, and every mark after it sees it. Once `sendd ctl pause` has returned, no
-- batch it covers gets a mark; only requests marked before it go out.
CREATE FUNCTION sendd.pause_lock() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 6000288133852255571::bigint $$;  -- "SENDPAUS"

DROP FUNCTION sendd.mark_submitted(text, text, bigint[], float8, bigint[]);

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
