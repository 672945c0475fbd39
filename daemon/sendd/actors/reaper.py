"""The heartbeat and the reaper: keep this daemon's lease fresh, adopt dead daemons' work."""

from __future__ import annotations

from typing import Any

import trio

from sendd import leases
from sendd.actors.sender import LeaseLost
from sendd.db.connection import RETRYABLE_ERRORS, keep_connected
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
    """Adopt the work of every daemon whose lease ended, now and every few seconds.

    Rule for this daemon's own marks: the settler gets a mark once no actor holds it, that is a
    dead daemon's (its lease ended) or one the writer handed over (it could not store the
    outcomes: adopted_at set), each once per reaper. Age alone proves nothing: an express
    batch's mark is written with its claim, before the rate governor's wait (a 429 can ask for
    minutes), and a request under a mark may be on the wire; a lookup that says "not found"
    then would queue a message its sender is about to send: a duplicate. So a mark held longer
    than `leases.stale_after` is reported (health, metric, log), not taken; a restart settles it.
    """
    interval = min(5.0, runtime.config.pipeline.lease_seconds / 3)
    handed: set[int] = set()  # adopted marks already with the settler
    stale = StaleMarks(runtime)

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
        await stale.check(conn)

    async with unsettled:
        task_status.started()
        while True:
            await keep_connected(runtime, "reaper", reap)
            await trio.sleep(interval)


class StaleMarks:
    """Reports this daemon's marks held far longer than any request and its settlement take:
    their messages are stuck in `sending`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.logged: set[int] = set()  # logged once each, not on every pass

    async def check(self, conn: Any) -> None:
        runtime = self.runtime
        limit = leases.stale_after(runtime.config)
        marks = await leases.stale_marks(conn, runtime.instance_id, limit)
        runtime.metrics.stale_marks.set(len(marks))
        ids = {mark["id"] for mark in marks}
        if marks:
            messages = sum(mark["messages"] for mark in marks)
            oldest = max(mark["age"] for mark in marks)
            runtime.report_problem(
                "reaper", f"{len(marks)} submission mark(s) ({messages} messages) held in "
                f"'sending' for more than {limit:g} s, the oldest for {oldest:.0f} s")
            if ids - self.logged:
                runtime.log.error("marks_stale", marks=sorted(ids - self.logged),
                                  open_marks=len(marks), messages=messages,
                                  oldest_s=round(oldest), limit_s=limit)
        self.logged = ids
