-- One claim rule, in one place. The campaign claim (statements in sendd.actors.poller) and the
-- express lane's claim (sendd.claim_express, 0006) each spelled out the tenant budget, the slot
-- or alone guess, the spendable rule, the affordable cut, the lease fence and the claim itself,
-- and sendd.claim_express the submission mark of sendd.actors.sender. They are functions now,
-- called by both lanes (sendd/db/claims.py holds the daemon's statements):
--   sendd.tenant_budget, sendd.claims_alone, sendd.spendable    the rules;
--   sendd.claim_budgets     claim locks, then the budgets read under them;
--   sendd.claim_affordable  claim, out of locked candidates, what the budgets pay for;
--   sendd.mark_submitted    a request's submission mark.
-- sendd.claim_express keeps its signature (a daemon of the previous release may still call it
-- positionally during an upgrade) and is now called with named parameters.

-- --- The rules ------------------------------------------------------------------------------

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

-- --- The claim's steps ----------------------------------------------------------------------
-- PL/pgSQL, so that each statement is planned once per server process, and with generic plans
-- (plan_cache_mode): by the sizes of their array arguments, custom plans would be made again on
-- every call (0.6 ms of an express claim's 1.6), and the plans do not depend on those sizes
-- (index lookups by id, and the queue indexes).

-- Take the claim locks of `tenants` (sorted by the caller; sendd.lock_claim_slots, slots
-- first_slot..last_slot), then read their budgets: one row per tenant, in the order given, with
-- what this claim may spend. The budgets are read by a statement of their own, after the locks
-- are held, so its snapshot (READ COMMITTED) sees every commit of the claimers before.
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

-- The durable "submitted" mark of one provider request, written before the request. Only while
-- the instance's lease outlives the request (a lease_margin of seconds: the request must end
-- before the lease does), every message is still this instance's (a claim that a database crash
-- undid is not), and no campaign of the request is cancelled or paused (locked FOR KEY SHARE,
-- so that it cannot be stopped until this commits). The mark's id, NULL when it was not written,
-- and why: alive (the lease is live at all), held (every message is ours), stopped.
CREATE FUNCTION sendd.mark_submitted(instance text, account text, message_ids bigint[],
                                     lease_margin float8, campaign_ids bigint[])
RETURNS TABLE (id bigint, alive boolean, held boolean, stopped boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    WITH lease AS (
        SELECT i.lease_until > now() + make_interval(secs => lease_margin) AS covers
        FROM sendd.instance i
        WHERE i.id = instance AND i.stopped_at IS NULL AND i.lease_until > now()
    ), ours AS (
        SELECT count(*) = cardinality(message_ids) AS all_ours FROM sendd.message m
        WHERE m.id = ANY (message_ids) AND m.lease_owner = instance
    ), campaign AS (
        SELECT c.status FROM sendd.campaign c WHERE c.id = ANY (campaign_ids) FOR KEY SHARE
    ), campaigns_stopped AS (
        SELECT coalesce(bool_or(c.status IN ('cancelled', 'paused')), false) AS any_stopped
        FROM campaign c
    ), mark AS (
        INSERT INTO sendd.submission (instance_id, account, message_ids)
        SELECT instance, account, message_ids
        WHERE (SELECT l.covers FROM lease l) AND (SELECT o.all_ours FROM ours o)
          AND NOT (SELECT s.any_stopped FROM campaigns_stopped s)
        RETURNING sendd.submission.id
    )
    SELECT (SELECT k.id FROM mark k), EXISTS (SELECT 1 FROM lease),
           (SELECT o.all_ours FROM ours o), (SELECT s.any_stopped FROM campaigns_stopped s);
END $$;

-- --- The express lane -----------------------------------------------------------------------

-- The express lane's claim, one server-side call in autocommit (the transaction, and with it the
-- locks, end with the call; committed synchronously, so the marks are on disk when it returns):
-- the due transactional messages of every tenant that has some, claimed with the steps above,
-- cut into batches and marked submitted. One round trip and one commit from ready to go, where
-- a claim transaction and then a mark took seven round trips, each waiting for the daemon's
-- busy event loop under a saturating campaign.
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
CREATE OR REPLACE FUNCTION sendd.claim_express(
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
