"""The express lane: transactional messages (no campaign) skip the campaign pipeline's queues.

The campaign pipeline is built to be full: at full speed its channels hold thousands of claimed
messages, and a one-time password claimed behind them would wait for all of them. The express
poller claims only transactional messages, as soon as a NOTIFY says one was queued, and hands
them, batched per account and tenant with no linger, to express senders of their own. From
there they share the writer (their outcomes need no hurry once accepted). Claims go through the
tenant's claim slots (one of their own, sendd.actors.poller), so the lanes never overspend
credits between them and a transactional claim never waits for a campaign claim.
"""

from __future__ import annotations

from typing import Any

import trio

from sendd.actors.batcher import group_by_destination
from sendd.actors.poller import claim_due
from sendd.db import keep_connected, listening
from sendd.model import Batch, Message
from sendd.runtime import Runtime

# Concurrent express requests. Transactional traffic is a trickle, but under a saturating
# campaign each batch spends ~50 ms p50 on its mark and request, so with two senders, batches
# queued for a free one (p99 139 ms of waiting at 20 messages/s; with eight, 5 ms).
EXPRESS_SENDERS = 8
EXPRESS_CAPACITY = 4  # batches, express poller -> express senders


async def run_express_poller(
    runtime: Runtime,
    batches: trio.MemorySendChannel[Batch],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Claim transactional messages until cancelled; closes `batches` when done.

    It listens for NOTIFY on its own connection: PostgreSQL delivers a notification only to a
    connection that is idle, and the campaign pollers' are busy claiming most of the time."""
    interval = runtime.config.pipeline.poll_interval
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
                with runtime.working("express"):
                    claim = await claim_due(conn, runtime, campaigns=False)
                for batch in express_batches(runtime, claim.messages):
                    await batches.send(batch)
                if not claim.messages:
                    with trio.move_on_after(interval):
                        await wakeup.wait()

    async with batches:
        await keep_connected(runtime, "express", session)


def express_batches(runtime: Runtime, messages: list[Message]) -> list[Batch]:
    """Claimed messages as provider batches: per account and tenant, at most max_batch each."""
    batches = []
    for (account, tenant), group in group_by_destination(messages).items():
        size = runtime.max_batch(account, tenant)
        batches += [Batch(account, tenant, group[i:i + size]) for i in range(0, len(group), size)]
    return batches
