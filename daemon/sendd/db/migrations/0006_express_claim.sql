-- The express lane's claim as one server-side call that also writes the submission marks.
-- It was a transaction of six round trips (begin, the tenants with transactional messages
-- queued, the slot locks, the budgets, the claim, the commit) and then a seventh for the mark;
-- under a saturating campaign every round trip waits for the daemon's busy event loop and for
-- a core, and a one-time password paid for each of them. Now it is one call, committed
-- synchronously: the marks are on disk when it returns, so the messages may go straight out.
-- Each statement below takes its own snapshot (plpgsql, READ COMMITTED), so the budgets are
-- read after the slot locks are held and see every earlier claimer's commit.
-- Called in autocommit: the transaction, and with it the locks, end with the call.
--
-- accounts / batch_sizes: the accounts to claim for and the largest batch of each (provider
-- limit, 413 cap, account rate limits); limited_tenants / tenant_limits: tenants with a message
-- rate limit, which caps a batch too. One mark per batch: per account and tenant, at most that
-- many messages. known_tenants / known_budgets: the budgets the caller saw last, to guess slot
-- or alone (unknown: alone). mark_margin: seconds the lease must still have for the marks to
-- be written (a request must end before the lease does); without them the messages come back
-- with no mark and the sender writes one once the heartbeat has renewed the lease.
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
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    tenants text[];
    alone boolean[];
    budgets bigint[];
BEGIN
    SELECT array_agg(t.id ORDER BY t.id) INTO tenants FROM sendd.tenant t
    WHERE t.active AND NOT (t.id = ANY (paused)) AND EXISTS (
        SELECT 1 FROM sendd.message m
        WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued');
    IF tenants IS NULL OR coalesce(cardinality(accounts), 0) = 0 THEN
        RETURN;
    END IF;

    SELECT array_agg(coalesce(k.budget, 0) < slots::bigint * share ORDER BY u.ord) INTO alone
    FROM unnest(tenants) WITH ORDINALITY AS u(t, ord)
    LEFT JOIN unnest(known_tenants, known_budgets) AS k(tenant, budget) ON k.tenant = u.t;
    PERFORM sendd.lock_claim_slots(tenants, alone, first_key, slot, slot);
    -- Credits minus segments in flight; credits and in-flight segments change together in every
    -- writer commit, so their difference is consistent in this statement's snapshot.
    SELECT array_agg(coalesce(t.credits - sendd.in_flight_segments(t.id), 0) ORDER BY u.ord)
    INTO budgets
    FROM unnest(tenants) WITH ORDINALITY AS u(t, ord) LEFT JOIN sendd.tenant t ON t.id = u.t;

    RETURN QUERY
    WITH budget AS (  -- spendable: the rule of sendd.actors.poller.spendable_budget
        SELECT b.tenant_id, b.budget,
               CASE WHEN b.alone THEN b.budget
                    WHEN b.budget >= slots::bigint * share THEN share ELSE 0 END AS spendable
        FROM unnest(tenants, budgets, alone) AS b(tenant_id, budget, alone)
    ), candidate AS (
        SELECT q.id, q.tenant_id, q.segments
        FROM unnest(tenants) AS t(id) CROSS JOIN LATERAL (
            SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
            WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued'
              AND m.next_attempt_at <= now() AND m.account = ANY (accounts)
            ORDER BY m.priority DESC, m.next_attempt_at, m.id LIMIT chunk
            FOR UPDATE SKIP LOCKED) q
    ), affordable AS (
        SELECT c.id FROM (
            SELECT candidate.id, b.spendable, sum(candidate.segments) OVER (
                PARTITION BY candidate.tenant_id ORDER BY candidate.id) AS cost
            FROM candidate JOIN budget b USING (tenant_id)) c
        WHERE c.cost <= c.spendable
    ), lease AS (
        -- Fenced by our own live lease (KEY SHARE: a reaper cannot adopt us mid-claim), so a
        -- daemon whose work was adopted never claims rows that no lease would ever cover.
        SELECT i.lease_until > now() + make_interval(secs => mark_margin) AS markable
        FROM sendd.instance i
        WHERE i.id = instance AND i.stopped_at IS NULL AND i.lease_until > now() FOR KEY SHARE
    ), claimed AS (
        UPDATE sendd.message m SET status = 'sending', lease_owner = instance
        FROM affordable a WHERE m.id = a.id AND sendd.transition_allowed(m.status, 'sending')
          AND EXISTS (SELECT 1 FROM lease)
        RETURNING m.id, m.tenant_id, m.campaign_id, m.account, m.sender, m.recipient, m.body,
                  m.segments, m.attempts
    ), batched AS (
        SELECT c.*, (row_number() OVER (PARTITION BY c.account, c.tenant_id ORDER BY c.id) - 1)
                    / least(s.size, coalesce(l.limit_, s.size)) AS batch
        FROM claimed c JOIN unnest(accounts, batch_sizes) AS s(account, size) USING (account)
        LEFT JOIN unnest(limited_tenants, tenant_limits) AS l(tenant_id, limit_) USING (tenant_id)
    ), marks AS (
        INSERT INTO sendd.submission (instance_id, account, message_ids)
        SELECT instance, b.account, array_agg(b.id ORDER BY b.id) FROM batched b
        WHERE (SELECT markable FROM lease)
        GROUP BY b.account, b.tenant_id, b.batch
        RETURNING sendd.submission.id, message_ids[1] AS first_id
    )
    SELECT b.id, b.tenant_id, b.campaign_id, b.account, b.sender, b.recipient, b.body,
           b.segments, b.attempts, b.batch, k.id, bu.budget
    FROM batched b JOIN budget bu USING (tenant_id)
    -- A batch's mark, by its first message (a data-modifying CTE's rows are seen only through
    -- its RETURNING).
    LEFT JOIN (SELECT b2.account, b2.tenant_id, b2.batch, min(b2.id) AS first_id
               FROM batched b2 GROUP BY 1, 2, 3) f USING (account, tenant_id, batch)
    LEFT JOIN marks k ON k.first_id = f.first_id
    UNION ALL
    SELECT NULL, bu.tenant_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, bu.budget
    FROM budget bu WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.tenant_id = bu.tenant_id)
    ORDER BY 4, 2, 10, 1;
END $$;
