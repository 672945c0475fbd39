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
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from sendd.db.claims import CLAIM_BUDGETS, CLAIM_CAMPAIGN_MESSAGES
from sendd.db.retry import keep_connected
from sendd.model import Message
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease
from sendd.state.scheduler import Scheduler

log = structlog.get_logger()

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
STARVED_CHECK_INTERVAL = 1.0  # seconds between checks for tenants out of credits
TENANTS_PER_CLAIM = 100  # beyond this many tenants with messages due, they take turns

# Of the tenants given with their budgets ($1, $2), those whose credits cannot pay for the first
# due message of any of their sending campaigns, with nothing in flight that a rejection could
# refund: their campaigns are paused for credits. One statement for all of them (a claim split
# between a thousand tenants leaves most of them with nothing now and then).
STARVED_TENANTS = """
WITH u AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS u(tenant, budget)),
next AS (
    SELECT c.tenant_id, min(q.segments) AS cheapest
    FROM sendd.campaign c JOIN u ON u.tenant = c.tenant_id
    CROSS JOIN LATERAL (
        SELECT m.segments FROM sendd.message m
        WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.next_attempt_at <= now()
        ORDER BY m.next_attempt_at, m.id LIMIT 1) q
    WHERE c.status = 'sending'
    GROUP BY c.tenant_id)
SELECT u.tenant, u.budget, n.cheapest FROM u JOIN next n ON n.tenant_id = u.tenant
WHERE n.cheapest > u.budget
  AND NOT EXISTS (SELECT 1 FROM sendd.message m
                  WHERE m.tenant_id = u.tenant AND m.status = 'sending')
"""

PAUSE_FOR_CREDITS = """
UPDATE sendd.campaign SET status = 'paused', pause_reason = $2
WHERE tenant_id = $1 AND status = 'sending'
RETURNING id
"""


@dataclass
class Claimer:
    """What the campaign pollers and the express poller claim with: this instance's lease
    (claims are fenced by it), the accounts held back and the operator's pauses, health, and
    each tenant's budget as the last claim read it (which claim slots the next claim takes)."""

    lease: Lease
    accounts: Accounts
    controls: Controls
    health: Health
    # Where claimed batches wait (the campaign pipeline's): claims are sized to what it can let
    # out soon. None (the express lane, tests): no sizing.
    scheduler: Scheduler | None = None
    budgets: dict[str, int] = field(default_factory=dict)
    rotation: int = 0  # where the next claim's tenants start, when they take turns

    def claimable_accounts(self) -> list[str]:
        """Accounts messages may be claimed for: not paused by the operator, not suspended by
        the provider, not held back by their breaker."""
        held = self.controls.paused_accounts | self.accounts.held_back()
        return [a for a in self.controls.config.accounts if a not in held]

    def account_rooms(self) -> dict[str, int]:
        """The claimable accounts with room in the scheduler, and how many messages each."""
        rooms = {}
        for name in self.claimable_accounts():
            if self.scheduler is None:
                rooms[name] = CLAIM_SHARE
                continue
            one_batch = self.accounts.max_batch(self.controls.account(name), None)
            room = self.scheduler.room_for_account(name, one_batch)
            if room > 0:
                rooms[name] = room
        return rooms

    def next_tenants(self, tenants: set[str]) -> list[str]:
        """The tenants this claim serves: all of them, or when there are more than
        TENANTS_PER_CLAIM, the tenants with a rate limit (each claim takes only about a second
        of their rate, so they must not wait for their turn as well) and the others in turn up
        to TENANTS_PER_CLAIM. (Each tenant's budget is read under its claim lock, which costs
        about 0.2 ms a tenant: a claim over a thousand tenants would take 200 ms.)"""
        if len(tenants) <= TENANTS_PER_CLAIM:
            return sorted(tenants)
        limits = self.accounts.governor.tenant_limits()
        limited = sorted(t for t in tenants if t in limits)[:TENANTS_PER_CLAIM]
        others = sorted(t for t in tenants if t not in limits)
        turn = max(0, TENANTS_PER_CLAIM - len(limited))
        if not others or not turn:
            return limited
        start = self.rotation % len(others)
        self.rotation = start + turn
        return limited + (others + others)[start:start + min(turn, len(others))]

    def tenant_room(self, tenant: str, accounts: list[str]) -> int | None:
        """Messages a claim may take for a limited tenant (None: no limit)."""
        if self.scheduler is None:
            return None
        one_batch = max(self.accounts.max_batch(self.controls.account(a), tenant)
                        for a in accounts)
        return self.scheduler.room_for_tenant(tenant, one_batch)


def campaign_shares(campaigns: list[tuple[int, str]], chunk: int,
                    rooms: dict[str, int | None], weights: dict[str, float]) -> list[int]:
    """How many messages a claim takes from each campaign (in the order given): the chunk split
    between the tenants by weight (a limited tenant's share at most its room), and each
    tenant's share between its campaigns; at least one each."""
    by_tenant: dict[str, int] = {}
    for _, tenant in campaigns:
        by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
    total_weight = sum(weights.get(t, 1.0) for t in by_tenant)
    shares = []
    for _, tenant in campaigns:
        share = chunk * weights.get(tenant, 1.0) / total_weight
        room = rooms.get(tenant)
        if room is not None:
            share = min(share, room)
        shares.append(max(1, math.ceil(share / by_tenant[tenant])))
    return shares


@dataclass
class Claim:
    messages: list[Message]
    unserved: dict[str, int]  # tenant -> budget, for tenants that got nothing this time


async def claim_due(conn: Any, claimer: Claimer) -> Claim:
    """One claim transaction of campaign messages: up to about `claim_chunk`, a fair share from
    every sending campaign. (Transactional messages take the express lane: sendd.actors.express.)"""
    if claimer.controls.paused_all:  # operator pause (control socket): claim nothing until resumed
        return Claim([], {})
    rooms = claimer.account_rooms()
    accounts = sorted(rooms)
    if not accounts:
        return Claim([], {})
    chunk = min(claimer.controls.config.pipeline.claim_chunk, sum(rooms.values()))
    paused = sorted(claimer.controls.paused_tenants)
    async with conn.transaction():
        active = await conn.fetch(ACTIVE_CAMPAIGNS, paused)
        tenant_rooms = {t: claimer.tenant_room(t, accounts)
                        for t in claimer.next_tenants({r["tenant_id"] for r in active})}
        # A limited tenant with a second of its rate (and a batch) unsent gets nothing now.
        campaign_rows = [r for r in active if r["tenant_id"] in tenant_rooms
                         and _has_room(tenant_rooms[r["tenant_id"]])]
        tenants = sorted({r["tenant_id"] for r in campaign_rows})
        if not tenants:
            return Claim([], {})
        # A slot or alone, by the budget this daemon saw last (a tenant it has not seen yet is
        # claimed alone once): a guess only, the budget is read again under the locks, with
        # what this claim may spend of it (sendd.claim_budgets).
        seen = [claimer.budgets.get(t) for t in tenants]
        rows = await conn.fetch(CLAIM_BUDGETS, tenants, seen, CLAIM_SHARE, CLAIM_SLOTS,
                                CLAIM_LOCK_SPACE, *CAMPAIGN_SLOTS)
        budgets = {r["tenant_id"]: r["budget"] for r in rows}
        claimer.budgets.update(budgets)
        # What each may spend, in the order of `tenants`; a limited tenant no more segments
        # than its room (a message is at least one segment).
        spendable = [_at_most(r["spendable"], tenant_rooms[r["tenant_id"]]) for r in rows]
        shares = campaign_shares([(r["id"], r["tenant_id"]) for r in campaign_rows], chunk,
                                 tenant_rooms, claimer.controls.tenant_weights)
        campaigns = [r["id"] for r in campaign_rows]
        rows = await conn.fetch(CLAIM_CAMPAIGN_MESSAGES, tenants, spendable, campaigns,
                                shares, accounts, claimer.lease.instance_id)
    messages = [Message(*row) for row in rows]
    if claimer.scheduler is not None:
        claimer.scheduler.claimed(messages)
    claimer.health.unserved.saw([r["id"] for r in campaign_rows],
                                {m.campaign_id for m in messages}, trio.current_time())
    claimed_tenants = {m.tenant_id for m in messages}
    unserved = {t: b for t, b in budgets.items() if t not in claimed_tenants}
    return Claim(messages, unserved)


def _has_room(room: int | None) -> bool:
    return room is None or room > 0


def _at_most(value: int, room: int | None) -> int:
    return value if room is None else min(value, room)


async def pause_starved(conn: Any, unserved: dict[str, int]) -> None:
    """Pause the sending campaigns of tenants whose credits cannot pay for their next message."""
    starved = await conn.fetch(STARVED_TENANTS, list(unserved), list(unserved.values()))
    for row in starved:
        reason = (f"insufficient credits: {row['budget']} left, the next message needs "
                  f"{row['cheapest']}")
        paused = await conn.fetch(PAUSE_FOR_CREDITS, row["tenant"], reason)
        for campaign in paused:
            log.warning("campaign_paused", campaign=campaign["id"], tenant=row["tenant"],
                        reason=reason)


# Campaign pollers per daemon: while one waits for its claim statement, the other's can run
# (the claim is the pipeline's bottleneck, and PostgreSQL runs each on its own backend).
CAMPAIGN_POLLERS = 2


async def run_poller(
    pool: Any,
    claimer: Claimer,
    claims: trio.MemorySendChannel[list[Message]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    *,
    name: str = "poller",
) -> None:
    """Claim campaign messages until cancelled (drain cancels this actor first); closes `claims`
    when done. `name` is the actor's, for health and problem reports. (NOTIFY wake-ups come
    through the housekeeper: sendd.actors.housekeeper.)"""
    interval = claimer.controls.config.pipeline.poll_interval

    async def session(conn: Any) -> None:
        nonlocal task_status
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED  # ready once, not on every reconnect
        await _claim_forever(claimer, conn, claims, interval, name)

    async with claims:
        await keep_connected(pool, claimer.health, name, session)


async def _claim_forever(claimer: Claimer, conn: Any, claims: trio.MemorySendChannel,
                         interval: float, name: str) -> None:
    """Claim, hand over, and wait for work (a wake-up or the poll interval) when there is none;
    every STARVED_CHECK_INTERVAL, pause the campaigns of tenants that could pay for nothing."""
    next_starved_check = 0.0
    while True:
        wakeup = claimer.controls.wakeup  # before the claim: a NOTIFY during it is not missed
        with claimer.health.working(name):
            claim = await claim_due(conn, claimer)
            if claim.unserved and trio.current_time() >= next_starved_check:
                await pause_starved(conn, claim.unserved)
                next_starved_check = trio.current_time() + STARVED_CHECK_INTERVAL
        if claim.messages:
            await claims.send(claim.messages)
            continue  # more may be due right away
        with trio.move_on_after(interval):
            await wakeup.wait()
