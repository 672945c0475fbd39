-- Claim slots: up to N claims of one tenant's messages may run at once (several pollers,
-- several daemons), each spending at most an equal share of a budget that was at least
-- N shares when it was read, so together they can never overspend. A tenant with less
-- budget than that is claimed by one claimer alone, against its exact budget.
--
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
