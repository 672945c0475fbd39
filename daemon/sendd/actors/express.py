"""The express lane: transactional messages (no campaign) skip the campaign pipeline's queues.

The campaign pipeline is built to be full: at full speed its channels hold thousands of claimed
messages, and a one-time password claimed behind them would wait for all of them. The express
poller claims only transactional messages, as soon as a NOTIFY says one was queued, and hands
them, batched per account and tenant with no linger, to express senders of their own. From
there they share the writer (their outcomes need no hurry once accepted). Claims go through the
tenant's claim slots (one of their own, sendd.actors.poller), so the lanes never overspend
credits between them and a transactional claim never waits for a campaign claim.

The claim is one server-side call that also writes the batches' submission marks
(`sendd.claim_express`, migration 0006): one round trip and one commit from NOTIFY to a batch
ready to go, where a claim transaction and then a mark took seven, each of them waiting for
this busy event loop and a core while a campaign saturates the machine.
"""

from __future__ import annotations

from typing import Any

import trio

from sendd.actors import poller
from sendd.actors.poller import Claimer
from sendd.db.claims import CLAIM_EXPRESS
from sendd.db.connection import listening
from sendd.db.leases import LEASE_MARGIN
from sendd.db.retry import keep_connected
from sendd.model import Batch, Message

# Concurrent express requests. Transactional traffic is a trickle, but under a saturating
# campaign each batch spends ~50 ms p50 on its mark and request, so with two senders, batches
# queued for a free one (p99 139 ms of waiting at 20 messages/s; with eight, 5 ms).
EXPRESS_SENDERS = 8
EXPRESS_CAPACITY = 4  # batches, express poller -> express senders

async def run_express_poller(
    pool: Any,
    claimer: Claimer,
    batches: trio.MemorySendChannel[Batch],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Claim transactional messages until cancelled; closes `batches` when done.

    It listens for NOTIFY on its own connection: PostgreSQL delivers a notification only to a
    connection that is idle, and the campaign pollers' are busy claiming most of the time."""
    interval = claimer.controls.config.pipeline.poll_interval
    wakeup = trio.Event()

    def on_notify(*_: object) -> None:
        wakeup.set()

    async def session(conn: Any) -> None:
        nonlocal task_status, wakeup
        async with listening(conn, "sendd_queued", on_notify):
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED  # ready once, not on every reconnect
            while True:
                wakeup = trio.Event()  # before the claim: a NOTIFY during it is not missed
                with claimer.health.working("express"):
                    claimed = await claim_express(conn, claimer)
                for batch in claimed:
                    await batches.send(batch)
                if not claimed:
                    with trio.move_on_after(interval):
                        await wakeup.wait()

    async with batches:
        await keep_connected(pool, claimer.health, "express", session)


async def claim_express(conn: Any, claimer: Claimer) -> list[Batch]:
    """One express claim: the due transactional messages this daemon may send, as provider
    batches (per account and tenant, at most max_batch each), marked submitted when the lease
    allowed it."""
    accounts = claimer.claimable_accounts()
    if claimer.controls.paused_all or not accounts:
        return []
    limits = claimer.accounts.governor.tenant_limits()
    known = claimer.budgets
    # The marks need the lease to outlive the slowest of these accounts' requests.
    margin = max(claimer.controls.account(a).timeout for a in accounts) + LEASE_MARGIN
    sizes = [claimer.accounts.max_batch(claimer.controls.account(a), None) for a in accounts]
    rows = await conn.fetch(
        CLAIM_EXPRESS, claimer.lease.instance_id, accounts,
        sizes, sorted(claimer.controls.paused_tenants),
        claimer.controls.config.pipeline.claim_chunk, list(limits), list(limits.values()),
        list(known), list(known.values()), poller.CLAIM_SHARE, poller.CLAIM_SLOTS,
        poller.CLAIM_LOCK_SPACE, poller.EXPRESS_SLOT, margin)
    claimer.budgets.update({row["tenant_id"]: row["budget"] for row in rows})
    # The function has cut the claim into batches; a batch without a mark (the lease is due
    # for renewal) is marked by its sender.
    batches: dict[tuple[str, str, int], Batch] = {}
    for row in rows:
        if row["id"] is None:
            continue  # a tenant that got nothing: only its budget
        message = Message(*row[:9])
        key = (message.account, message.tenant_id, row["batch"])
        if key not in batches:
            batches[key] = Batch(message.account, message.tenant_id, [], row["submission_id"])
        batches[key].messages.append(message)
    return list(batches.values())
