"""The poller: claims due campaign messages in chunks and hands them to the batcher.

Claims use `FOR UPDATE SKIP LOCKED`, so any number of daemons share one database. Each claim
takes a share from every sending campaign (fairness: a 1,000,000-message campaign does not hold
back a 1,000-message one); transactional messages take the express lane
(sendd.actors.express). It only claims what each tenant's
credits can pay for, counting what is already in flight, so no tenant is ever overspent.
Backpressure: `send` on the bounded claims channel blocks while the pipeline is full, and then
nothing more is claimed.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import trio

from sendd import unserved
from sendd.db.connection import keep_connected, listening
from sendd.model import Message
from sendd.runtime import Runtime

ACTIVE_CAMPAIGNS = """
SELECT c.id, c.tenant_id FROM sendd.campaign c JOIN sendd.tenant t ON t.id = c.tenant_id
WHERE c.status = 'sending' AND t.active AND NOT (t.id = ANY($1::text[]))
ORDER BY c.id
"""

# Claimers of one tenant must not spend the same budget twice, yet one claimer at a time
# caps a daemon at one claim statement's speed. So a tenant has CLAIM_SLOTS claim slots
# (sendd.lock_claim_slots, migration 0003): with a budget of at least CLAIM_SLOTS shares, a
# claimer takes any one slot and spends at most one share; with less, it shuts the tenant's
# gate on every slot and spends the exact budget alone. Advisory locks, not a row lock on the
# tenant, because the writer's trigger locks that row for every flush and must not wait for a
# claim in progress.
CLAIM_SLOTS = 4
CAMPAIGN_SLOTS = (0, 2)  # campaign claims take one of slots 0..2; the express lane, slot 3
EXPRESS_SLOT = 3
# One share, in segments: the same for every daemon (a daemon spending a larger share than its
# peers assume could overspend), and larger than any claim needs, so it never limits a claim;
# tenants with less than CLAIM_SLOTS shares left are claimed one claimer at a time.
CLAIM_SHARE = 100_000
CLAIM_LOCK_SPACE = 0x434C4149  # "CLAI": first key of the slot locks (two-key form, + slot)
# The claim transaction does not wait for its commit to reach the disk (synchronous_commit off
# for this transaction only): nothing claimed is sent before its submission mark commits, which
# is synchronous, and WAL is flushed in order, so the mark's flush makes the claim durable too;
# a crash before that loses a claim of messages nobody sent, which are simply queued again.
# That spares every claim an fsync wait. (In this statement to save a round trip.)
LOCK_SLOTS = """
SELECT sendd.lock_claim_slots($1::text[], $2::boolean[], $3, $4, $5),
       set_config('synchronous_commit', 'off', true)
"""

# What each tenant can still pay for: credits minus the segments in flight (kept per tenant by
# the message triggers, migration 0005). Read after the slot locks, in its own statement, so its
# snapshot includes the previous claimers' commits; credits and in-flight segments change
# together in every writer commit, so their difference is consistent in any one snapshot.
TENANT_BUDGETS = """
SELECT t.id, t.credits - sendd.in_flight_segments(t.id) AS budget
FROM sendd.tenant t WHERE t.id = ANY($1::text[]) ORDER BY t.id
"""

CLAIM = """
WITH budget AS (
    SELECT * FROM unnest($1::text[], $2::bigint[]) AS b(tenant_id, budget)
), candidate AS (
    SELECT q.id, q.tenant_id, q.segments
    FROM unnest($3::bigint[]) AS c(id) CROSS JOIN LATERAL (
        SELECT m.id, m.tenant_id, m.segments FROM sendd.message m
        WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.next_attempt_at <= now()
          AND m.account = ANY($5::text[])
        ORDER BY m.next_attempt_at, m.id LIMIT $4
        FOR UPDATE SKIP LOCKED) q
), affordable AS (
    SELECT c.id FROM (
        SELECT candidate.id, b.budget, sum(candidate.segments) OVER (
            PARTITION BY candidate.tenant_id ORDER BY candidate.id) AS cost
        FROM candidate JOIN budget b USING (tenant_id)) c
    WHERE c.cost <= c.budget
), lease AS (
    -- Fenced by our own live lease (KEY SHARE: a reaper cannot adopt us mid-claim), so a
    -- daemon whose work was adopted never claims rows that no lease would ever cover.
    SELECT 1 FROM sendd.instance i
    WHERE i.id = $6 AND i.stopped_at IS NULL AND i.lease_until > now() FOR KEY SHARE
)
UPDATE sendd.message m SET status = 'sending', lease_owner = $6
FROM affordable a WHERE m.id = a.id AND sendd.transition_allowed(m.status, 'sending')
  AND EXISTS (SELECT 1 FROM lease)
RETURNING m.id, m.tenant_id, m.campaign_id, m.account, m.sender, m.recipient, m.body,
          m.segments, m.attempts
"""

HOUSEKEEPING_INTERVAL = 1.0  # seconds between scheduled-campaign starts and credit checks

START_SCHEDULED = """
UPDATE sendd.campaign SET status = 'sending', started_at = now()
WHERE status = 'scheduled' AND scheduled_at <= now()
"""

# The first due message of each of a tenant's sending campaigns: if none fits in the credits
# left (with nothing in flight that could be refunded), the campaigns are paused for credits.
CHEAPEST_NEXT = """
SELECT min(q.segments) FROM sendd.campaign c CROSS JOIN LATERAL (
    SELECT m.segments FROM sendd.message m
    WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.next_attempt_at <= now()
    ORDER BY m.next_attempt_at, m.id LIMIT 1) q
WHERE c.tenant_id = $1 AND c.status = 'sending'
"""

PAUSE_FOR_CREDITS = """
UPDATE sendd.campaign SET status = 'paused', pause_reason = $2
WHERE tenant_id = $1 AND status = 'sending'
RETURNING id
"""


# Campaigns with messages waiting for an account whose provider has been unreachable for
# `retry.provider_down_pause`: paused with the reason instead of waiting on unseen (an operator
# resumes them once the provider is back, or moves the messages to another account).
PAUSE_FOR_PROVIDER = """
UPDATE sendd.campaign c SET status = 'paused', pause_reason = $2
WHERE c.status = 'sending' AND EXISTS (
    SELECT 1 FROM sendd.message m
    WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.account = $1)
RETURNING c.id
"""


@dataclass
class Claim:
    messages: list[Message]
    unserved: dict[str, int]  # tenant -> budget, for tenants that got nothing this time


async def claim_due(conn: Any, runtime: Runtime) -> Claim:
    """One claim transaction of campaign messages: up to about `claim_chunk`, a fair share from
    every sending campaign. (Transactional messages take the express lane: sendd.actors.express.)"""
    if runtime.paused_all:  # operator pause (control socket): claim nothing until resumed
        return Claim([], {})
    chunk = runtime.config.pipeline.claim_chunk
    accounts = [a for a in runtime.config.accounts if a not in runtime.excluded_accounts()]
    paused = sorted(runtime.paused_tenants)
    async with conn.transaction():
        campaign_rows = await conn.fetch(ACTIVE_CAMPAIGNS, paused)
        tenants = sorted({r["tenant_id"] for r in campaign_rows})
        if not tenants or not accounts:
            return Claim([], {})
        share = CLAIM_SHARE
        # A slot or alone, by the budget this daemon saw last (a tenant it has not seen yet is
        # claimed alone once): a guess only, the budget is read again under the locks.
        alone = [runtime.budgets.get(t, 0) < CLAIM_SLOTS * share for t in tenants]
        await conn.execute(LOCK_SLOTS, tenants, alone, CLAIM_LOCK_SPACE, *CAMPAIGN_SLOTS)
        budgets = await _budgets(conn, tenants)
        runtime.budgets.update(budgets)
        spendable = [spendable_budget(budgets.get(t, 0), share, exclusive)
                     for t, exclusive in zip(tenants, alone, strict=True)]
        per_campaign = math.ceil(chunk / len(campaign_rows))
        rows = await conn.fetch(CLAIM, tenants, spendable, [r["id"] for r in campaign_rows],
                                per_campaign, accounts, runtime.instance_id)
    messages = [Message(*row) for row in rows]
    runtime.unserved.saw([r["id"] for r in campaign_rows], {m.campaign_id for m in messages},
                         trio.current_time())
    claimed_tenants = {m.tenant_id for m in messages}
    unserved = {t: b for t, b in budgets.items() if t not in claimed_tenants}
    return Claim(messages, unserved)


async def _budgets(conn: Any, tenants: list[str]) -> dict[str, int]:
    return {r["id"]: r["budget"] for r in await conn.fetch(TENANT_BUDGETS, tenants)}


def spendable_budget(budget: int, share: int, exclusive: bool) -> int:
    """What one claim may spend of a tenant's budget (read after taking its claim locks).

    Alone (the tenant's gate shut): all of it. In one slot: one share, and only while the
    budget still covers a share for every slot; once it does not, nothing this time, and the
    next claim goes alone.
    """
    if exclusive:
        return budget
    return share if budget >= CLAIM_SLOTS * share else 0


async def pause_starved(conn: Any, runtime: Runtime, unserved: dict[str, int]) -> None:
    """Pause the sending campaigns of tenants whose credits cannot pay for their next message."""
    for tenant, budget in unserved.items():
        cheapest = await conn.fetchval(CHEAPEST_NEXT, tenant)
        if cheapest is None or cheapest <= budget:
            continue  # nothing due, or it fits: the claim lost a race, not the credits
        in_flight = await conn.fetchval(
            "SELECT count(*) FROM sendd.message WHERE tenant_id = $1 AND status = 'sending'",
            tenant,
        )
        if in_flight:
            continue  # outcomes pending: a rejection may still give credits back
        reason = f"insufficient credits: {budget} left, the next message needs {cheapest}"
        paused = await conn.fetch(PAUSE_FOR_CREDITS, tenant, reason)
        for row in paused:
            runtime.log.warning("campaign_paused", campaign=row["id"], tenant=tenant, reason=reason)


# Campaign pollers per daemon: while one waits for its claim statement, the other's can run
# (the claim is the pipeline's bottleneck, and PostgreSQL runs each on its own backend).
CAMPAIGN_POLLERS = 2


async def run_poller(
    runtime: Runtime,
    claims: trio.MemorySendChannel[list[Message]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    *,
    name: str = "poller",
    lead: bool = True,
) -> None:
    """Claim campaign messages until cancelled (drain cancels this actor first); closes `claims`
    when done. The lead poller also listens for NOTIFY and does the housekeeping; `name` is the
    actor's, for health and problem reports."""
    interval = runtime.config.pipeline.poll_interval

    def on_notify(*_: object) -> None:
        runtime.wake_poller()

    async def session(conn: Any) -> None:
        nonlocal task_status
        async with listening(conn, "sendd_queued", on_notify) if lead else nullcontext():
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED  # ready once, not on every reconnect
            await _claim_forever(runtime, conn, claims, interval, name, lead)

    async with claims:
        await keep_connected(runtime, name, session)


async def _claim_forever(runtime: Runtime, conn: Any, claims: trio.MemorySendChannel,
                         interval: float, name: str, lead: bool) -> None:
    """Claim, hand over, and wait for work (NOTIFY or the poll interval) when there is none."""
    next_housekeeping = 0.0 if lead else float("inf")
    while True:
        wakeup = runtime.wakeup  # before the claim: a NOTIFY during it is not missed
        with runtime.working(name):
            housekeeping = trio.current_time() >= next_housekeeping
            if housekeeping:
                await housekeep(conn, runtime)
                next_housekeeping = trio.current_time() + HOUSEKEEPING_INTERVAL
            claim = await claim_due(conn, runtime)
            if housekeeping and claim.unserved:
                await pause_starved(conn, runtime, claim.unserved)
        if claim.messages:
            await claims.send(claim.messages)
            continue  # more may be due right away
        with trio.move_on_after(interval):
            await wakeup.wait()


async def housekeep(conn: Any, runtime: Runtime) -> None:
    """Start scheduled campaigns that are due; pick up tenants' rate limits; pause campaigns
    that have waited too long for an unreachable provider."""
    await conn.execute(START_SCHEDULED)
    for row in await conn.fetch("SELECT id, rate_msgs_per_s FROM sendd.tenant"):
        runtime.governor.set_tenant(row["id"], row["rate_msgs_per_s"])
    await pause_for_unreachable(conn, runtime)
    await unserved.check(conn, runtime.unserved, trio.current_time(), runtime.log)


async def pause_for_unreachable(conn: Any, runtime: Runtime) -> None:
    after = runtime.config.retry.provider_down_pause
    for account in runtime.breakers.due_for_pause(trio.current_time(), after):
        breaker = runtime.breakers.get(account)
        reason = (f"account {account} unreachable for {after:g} s: {breaker.reason}")[:500]
        for row in await conn.fetch(PAUSE_FOR_PROVIDER, account, reason):
            runtime.log.warning("campaign_paused", campaign=row["id"], account=account,
                                reason=reason)
