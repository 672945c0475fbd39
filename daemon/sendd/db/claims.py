"""The daemon's claim and mark statements, in one place.

The rules they follow live once, in the schema (migration 0011, db/schema.sql): what a tenant
can still pay for (`sendd.tenant_budget`), what one claim may spend of it
(`sendd.spendable`), the claim locks and the budgets read under them
(`sendd.claim_budgets`), the claim of what the budgets pay for, fenced by the lease
(`sendd.claim_affordable`) and a request's submission mark (`sendd.mark_submitted`). The
campaign pollers (sendd.actors.poller) and the express lane (`sendd.claim_express`,
sendd.actors.express) call the same functions, with named parameters.
"""

from __future__ import annotations

# Claim locks, then each tenant's budget and what this claim may spend of it, one row per tenant
# in the order given. The campaign claim's transaction does not wait for its commit to reach the
# disk (synchronous_commit off for this transaction only): nothing claimed is sent before its
# submission mark commits, which is synchronous, and WAL is flushed in order, so the mark's flush
# makes the claim durable too; a crash before that loses a claim of messages nobody sent, which
# are simply queued again. That spares every claim an fsync wait. (In this statement to save a
# round trip.)
CLAIM_BUDGETS = """
SELECT b.tenant_id, b.budget, b.spendable
FROM sendd.claim_budgets(
         tenants => $1::text[], seen_tenants => $1::text[], seen_budgets => $2::bigint[],
         share => $3, slots => $4, first_key => $5, first_slot => $6, last_slot => $7) b,
     set_config('synchronous_commit', 'off', true)
"""

# Due messages of the sending campaigns $3, at most $4[i] from campaign $3[i] (each campaign's
# share: a 1,000,000-message campaign does not hold back a 1,000-message one), for the accounts
# $5, claimed for instance $6 within what each tenant ($1) may spend ($2, from CLAIM_BUDGETS).
CLAIM_CAMPAIGN_MESSAGES = """
SELECT * FROM sendd.claim_affordable(
    instance => $6,
    candidates => ARRAY(
        SELECT (q.id, q.tenant_id, q.segments)::sendd.claim_candidate
        FROM unnest($3::bigint[], $4::int[]) AS c(id, share) CROSS JOIN LATERAL (
            SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
            WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.next_attempt_at <= now()
              AND m.account = ANY($5::text[])
            ORDER BY m.next_attempt_at, m.id LIMIT c.share
            FOR UPDATE SKIP LOCKED) q),
    tenants => $1::text[], spendable => $2::bigint[])
"""

# Each tenant's budget as a claim reads it (credits minus segments in flight).
TENANT_BUDGETS = """
SELECT t.id, sendd.tenant_budget(t.id) AS budget
FROM sendd.tenant t WHERE t.id = ANY($1::text[]) ORDER BY t.id
"""

# The express lane's claim: one call that claims, cuts batches and marks them (autocommit).
CLAIM_EXPRESS = """
SELECT * FROM sendd.claim_express(
    instance => $1, accounts => $2, batch_sizes => $3, paused => $4, chunk => $5,
    limited_tenants => $6, tenant_limits => $7, known_tenants => $8, known_budgets => $9,
    share => $10, slots => $11, first_key => $12, slot => $13, mark_margin => $14)
"""

# A request's submission mark, before it goes out: $1 instance, $2 account, $3 message ids,
# $4 seconds the lease must still have, $5 the messages' campaigns. Columns: id (NULL: not
# written), alive (the lease is live), held (every message still ours), stopped (a campaign is
# cancelled or paused, or a pause), paused (an operator pause of its tenant, account or all:
# sendd.pause, migration 0012).
MARK_SUBMITTED = """
SELECT * FROM sendd.mark_submitted(
    instance => $1, account => $2, message_ids => $3::bigint[], lease_margin => $4,
    campaign_ids => $5::bigint[])
"""
