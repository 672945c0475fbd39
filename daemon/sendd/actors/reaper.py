"""The heartbeat and the reaper: keep this daemon's lease fresh, adopt dead daemons' work."""

from __future__ import annotations

from typing import Any

import trio

from sendd import leases
from sendd.actors.sender import LeaseLost
from sendd.db import RETRYABLE_ERRORS, keep_connected
from sendd.model import Message, Unsettled
from sendd.runtime import Runtime

# Renewing often keeps the lease's remaining life well above what a request needs.
HEARTBEATS_PER_LEASE = 6


async def run_heartbeat(
    runtime: Runtime, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Renew the lease every sixth of its length; raise LeaseLost once it has ended.

    A database outage shorter than the lease is ridden out. A longer one means another daemon
    may have adopted our claims, so this daemon stops (and systemd starts a fresh one).
    """
    lease = runtime.config.pipeline.lease_seconds
    task_status.started()
    # Renew at once: the lease has been running since registration, and senders need
    # timeout + margin of it left, which a late first renewal would not leave.
    delay = 0.0
    while True:
        await trio.sleep(delay)
        delay = lease / HEARTBEATS_PER_LEASE
        issued = trio.current_time()
        try:
            async with runtime.pool.acquire() as conn:
                renewed = await leases.renew(conn, runtime.instance_id, lease)
        except RETRYABLE_ERRORS as error:
            runtime.report_problem("heartbeat", f"cannot renew the lease: {error}")
            if trio.current_time() < runtime.lease_valid_until:
                runtime.log.warning("heartbeat_failed", error=str(error) or type(error).__name__)
                continue
            renewed = False
        if not renewed:
            raise LeaseLost(f"lease of instance {runtime.instance_id} ended; exiting")
        # A safe lower bound: the database set lease_until from a `now()` after `issued`.
        runtime.lease_valid_until = issued + lease


async def run_reaper(
    runtime: Runtime,
    unsettled: trio.MemorySendChannel[Unsettled],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Adopt the work of every daemon whose lease ended, now and every few seconds."""
    interval = min(5.0, runtime.config.pipeline.lease_seconds / 3)
    handed: set[int] = set()  # adopted marks already with the settler

    async def reap(conn: Any) -> None:
        while (adopted := await leases.adopt_expired(conn, runtime.instance_id)):
            runtime.log.warning("instance_adopted", dead=adopted.instance_id,
                                released=adopted.released, marks=adopted.marks)
            if adopted.released:
                runtime.wake_poller()
        for mark in await leases.adopted_marks(conn, runtime.instance_id, handed):
            rows = await leases.messages_of_mark(conn, mark["message_ids"], runtime.instance_id)
            item = Unsettled(mark["id"], mark["account"], [Message(*r) for r in rows],
                             trio.current_time())
            await unsettled.send(item)
            handed.add(mark["id"])
        # Tidy the in-flight counters: fold the rows of server processes that have ended.
        await conn.execute("SELECT sendd.fold_in_flight()")

    async with unsettled:
        task_status.started()
        while True:
            await keep_connected(runtime, "reaper", reap)
            await trio.sleep(interval)
