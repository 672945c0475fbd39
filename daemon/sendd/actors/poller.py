"""The poller: claims due messages in chunks and hands them to the batcher.

Claims use `FOR UPDATE SKIP LOCKED`, so any number of daemons share one database. Each claim
takes a share from every sending campaign (fairness: a 1,000,000-message campaign does not hold
back a 1,000-message one) and transactional messages first. It only claims what each tenant's
credits can pay for, counting what is already in flight, so no tenant is ever overspent.
Backpressure: `send` on the bounded claims channel blocks while the pipeline is full, and then
nothing more is claimed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import trio

from sendd.db import keep_connected, listening
from sendd.model import Message
from sendd.runtime import Runtime

# Claimers of one tenant must not spend the same budget twice, yet one claimer at a time
# caps a daemon at one claim statement's speed. So a tenant has CLAIM_SLOTS claim slots
# (sendd.lock_claim_slots, migration 0003): with a budget of at least CLAIM_SLOTS shares, a
# claimer takes any one slot and spends at most one share; with less, it shuts the tenant's
# gate on every slot and spends the exact budget alone. Advisory locks, not a row lock on the
# tenant, because the writer's trigger locks that row for every flush and must not wait for a
# claim in progress.
CLAIM_SLOTS = 4
CAMPAIGN_SLOTS = (0, 2)  # campaign claims take one of slots 0..2; the express lane, slot 3
EXPRESS_SLOTS = (3, 3)
# One share, in segments: the same for every daemon (a daemon spending a larger share than its
# peers assume could overspend), and larger than any claim needs, so it never limits a claim;
# tenants with less than CLAIM_SLOTS shares left are claimed one claimer at a time.
CLAIM_SHARE = 100_000
CLAIM_LOCK_SPACE = 0x434C4149  # "CLAI": first key of the slot locks (two-key form, + slot)

# The whole claim is one server-side call (sendd.claim, migration 0006): the active campaigns,
# the slot locks, the budgets read under them (credits minus segments in flight) and the
# claim itself, fair per campaign, transactional messages first, within each tenant's budget,
# fenced by this daemon's live lease. Autocommitted, without waiting for the fsync.
CLAIM = "SELECT * FROM sendd.claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"

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


@dataclass
class Claim:
    messages: list[Message]
    unserved: dict[str, int]  # tenant -> budget, for tenants that got nothing this time


async def claim_due(conn: Any, runtime: Runtime, *, campaigns: bool = True,
                    transactional: bool = True) -> Claim:
    """One claim: up to about `claim_chunk` messages, fairly shared, from campaigns,
    transactional messages (first), or both."""
    if runtime.paused_all:  # operator pause (control socket): claim nothing until resumed
        return Claim([], {})
    accounts = [a for a in runtime.config.accounts if a not in runtime.excluded_accounts()]
    if not accounts:
        return Claim([], {})
    # Slot or alone is guessed from the budgets this daemon saw last (a tenant it has not seen
    # yet is claimed alone once); the budget is read again under the locks.
    known = runtime.budgets
    rows = await conn.fetch(
        CLAIM, runtime.instance_id, accounts, sorted(runtime.paused_tenants),
        runtime.config.pipeline.claim_chunk, campaigns, transactional, list(known),
        list(known.values()), CLAIM_SHARE, CLAIM_SLOTS, CLAIM_LOCK_SPACE,
        *(CAMPAIGN_SLOTS if campaigns else EXPRESS_SLOTS),
    )
    messages, unserved = [], {}
    for row in rows:
        known[row[1]] = row[9]  # every row carries its tenant's budget
        if row[0] is None:
            unserved[row[1]] = row[9]
        else:
            messages.append(Message(*row[:9]))
    return Claim(messages, unserved)


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
            # Transactional messages take the express lane (sendd.actors.express).
            claim = await claim_due(conn, runtime, transactional=False)
            if housekeeping and claim.unserved:
                await pause_starved(conn, runtime, claim.unserved)
        if claim.messages:
            await claims.send(claim.messages)
            continue  # more may be due right away
        with trio.move_on_after(interval):
            await wakeup.wait()


async def housekeep(conn: Any, runtime: Runtime) -> None:
    """Start scheduled campaigns that are due; pick up tenants' rate limits."""
    await conn.execute(START_SCHEDULED)
    for row in await conn.fetch("SELECT id, rate_msgs_per_s FROM sendd.tenant"):
        runtime.governor.set_tenant(row["id"], row["rate_msgs_per_s"])
