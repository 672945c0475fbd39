-- The poller's claim as one server-side call. It was five statements in a transaction (active
-- campaigns, the slot locks, the budgets, the claim, the commit), and under load the claimer's
-- server process spent more time waiting for the daemon's next statement than running them.
-- Each statement below still takes its own snapshot (plpgsql, READ COMMITTED), so the budgets
-- are read after the slot locks are held and see every earlier claimer's commit.
-- Called in autocommit: the transaction, and with it the locks, end with the call.

-- What one claim may spend of a tenant's budget, read under its claim locks. Alone (the tenant's
-- gate shut): all of it. In one slot: one share, and only while the budget still covers a share
-- for every slot; once it does not, nothing this time, and the next claim goes alone.
CREATE FUNCTION sendd.spendable_budget(budget bigint, share bigint, slots integer,
                                       alone boolean) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN alone THEN budget WHEN budget >= slots::bigint * share THEN share ELSE 0 END
$$;

-- Rows: the claimed messages, each with its tenant's budget; and for every tenant that got
-- nothing, one row with only tenant_id and budget (the poller pauses starved campaigns by them).
-- known_*: the budgets the caller saw last, to guess slot or alone (unknown: alone);
-- campaigns / transactional: which queues to claim from.
CREATE FUNCTION sendd.claim(
    instance text, accounts text[], paused text[], chunk integer,
    campaigns boolean, transactional boolean,
    known_tenants text[], known_budgets bigint[],
    share bigint, slots integer, first_key integer, first_slot integer, last_slot integer)
RETURNS TABLE (id bigint, tenant_id text, campaign_id bigint, account text, sender text,
               recipient text, body text, segments integer, attempts integer, budget bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    campaign_ids bigint[];
    per_campaign integer;
    urgent_tenants text[];
    tenants text[];
    alone boolean[];
    budgets bigint[];
BEGIN
    -- Claims need no fsync wait: nothing claimed is sent before its submission mark commits,
    -- synchronously, and WAL is flushed in order, so the mark makes the claim durable too.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF campaigns THEN
        SELECT array_agg(c.id ORDER BY c.id), array_agg(DISTINCT c.tenant_id)
        INTO campaign_ids, tenants
        FROM sendd.campaign c JOIN sendd.tenant t ON t.id = c.tenant_id
        WHERE c.status = 'sending' AND t.active AND NOT (t.id = ANY (paused));
    END IF;
    IF transactional THEN
        SELECT array_agg(t.id) INTO urgent_tenants FROM sendd.tenant t
        WHERE t.active AND NOT (t.id = ANY (paused)) AND EXISTS (
            SELECT 1 FROM sendd.message m
            WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued');
    END IF;
    SELECT array_agg(DISTINCT u.t ORDER BY u.t) INTO tenants
    FROM unnest(coalesce(tenants, '{}') || coalesce(urgent_tenants, '{}')) AS u(t);
    IF tenants IS NULL OR coalesce(cardinality(accounts), 0) = 0 THEN
        RETURN;
    END IF;

    per_campaign := ceil(chunk::numeric / greatest(1, cardinality(campaign_ids)));
    SELECT array_agg(coalesce(k.budget, 0) < slots::bigint * share ORDER BY u.ord) INTO alone
    FROM unnest(tenants) WITH ORDINALITY AS u(t, ord)
    LEFT JOIN unnest(known_tenants, known_budgets) AS k(tenant, budget) ON k.tenant = u.t;
    PERFORM sendd.lock_claim_slots(tenants, alone, first_key, first_slot, last_slot);
    -- Credits minus segments in flight; credits and in-flight segments change together in every
    -- writer commit, so their difference is consistent in this statement's snapshot.
    SELECT array_agg(coalesce(t.credits - sendd.in_flight_segments(t.id), 0) ORDER BY u.ord)
    INTO budgets
    FROM unnest(tenants) WITH ORDINALITY AS u(t, ord) LEFT JOIN sendd.tenant t ON t.id = u.t;

    RETURN QUERY
    WITH budget AS (
        SELECT b.tenant_id, b.budget, sendd.spendable_budget(b.budget, share, slots, b.alone)
                   AS spendable
        FROM unnest(tenants, budgets, alone) AS b(tenant_id, budget, alone)
    ), candidate AS (
        SELECT q.id, q.tenant_id, q.segments, 0 AS urgent
        FROM unnest(campaign_ids) AS c(id) CROSS JOIN LATERAL (
            SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
            WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.next_attempt_at <= now()
              AND m.account = ANY (accounts)
            ORDER BY m.next_attempt_at, m.id
            LIMIT per_campaign
            FOR UPDATE SKIP LOCKED) q
        UNION ALL
        SELECT q.id, q.tenant_id, q.segments, 1 AS urgent
        FROM unnest(urgent_tenants) AS t(id) CROSS JOIN LATERAL (
            SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
            WHERE m.tenant_id = t.id AND m.campaign_id IS NULL AND m.status = 'queued'
              AND m.next_attempt_at <= now() AND m.account = ANY (accounts)
            ORDER BY m.priority DESC, m.next_attempt_at, m.id LIMIT chunk
            FOR UPDATE SKIP LOCKED) q
    ), affordable AS (
        SELECT c.id FROM (
            SELECT candidate.id, b.spendable, sum(candidate.segments) OVER (
                PARTITION BY candidate.tenant_id ORDER BY candidate.urgent DESC, candidate.id)
                AS cost
            FROM candidate JOIN budget b USING (tenant_id)) c
        WHERE c.cost <= c.spendable
    ), lease AS (
        -- Fenced by our own live lease (KEY SHARE: a reaper cannot adopt us mid-claim), so a
        -- daemon whose work was adopted never claims rows that no lease would ever cover.
        SELECT 1 FROM sendd.instance i
        WHERE i.id = instance AND i.stopped_at IS NULL AND i.lease_until > now() FOR KEY SHARE
    ), claimed AS (
        UPDATE sendd.message m SET status = 'sending', lease_owner = instance
        FROM affordable a WHERE m.id = a.id AND sendd.transition_allowed(m.status, 'sending')
          AND EXISTS (SELECT 1 FROM lease)
        RETURNING m.id, m.tenant_id, m.campaign_id, m.account, m.sender, m.recipient, m.body,
                  m.segments, m.attempts
    )
    SELECT c.id, c.tenant_id, c.campaign_id, c.account, c.sender, c.recipient, c.body,
           c.segments, c.attempts, b.budget
    FROM claimed c JOIN budget b USING (tenant_id)
    UNION ALL
    SELECT NULL, b.tenant_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, b.budget
    FROM budget b WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.tenant_id = b.tenant_id);
END $$;
