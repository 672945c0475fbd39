"""The reaper: adopts the work of daemons whose lease ended, hands marks nobody holds to the
settler, and reports this daemon's marks held far too long.

Rule for this daemon's own marks: the settler gets a mark once no actor holds it, that is a dead
daemon's (its lease ended) or one the writer handed over (it could not store the outcomes:
adopted_at set), each once per reaper. Age alone proves nothing: an express batch's mark is
written with its claim, before the rate governor's wait (a 429 can ask for minutes), and a
request under a mark may be on the wire; a lookup that says "not found" then would queue a
message its sender is about to send: a duplicate. So a mark held longer than
`leases.stale_after` is reported (health, metric, log), not taken; a restart settles it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from sendd.db import leases
from sendd.db.retry import keep_connected
from sendd.metrics import Metrics
from sendd.model import Message, Unsettled
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease

log = structlog.get_logger()


@dataclass
class Reaper:
    lease: Lease
    controls: Controls
    health: Health
    metrics: Metrics
    handed: set[int] = field(default_factory=set)  # adopted marks already with the settler
    logged_stale: set[int] = field(default_factory=set)  # logged once each, not every pass

    async def run_once(self, conn: Any, unsettled: trio.MemorySendChannel[Unsettled]) -> None:
        """One pass: adopt, hand over, tidy the in-flight counters, report stale marks."""
        instance = self.lease.instance_id
        while (adopted := await leases.adopt_expired(conn, instance)):
            log.warning("instance_adopted", dead=adopted.instance_id,
                        released=adopted.released, marks=adopted.marks)
            if adopted.released:
                self.controls.wake_pollers()
        for mark in await leases.adopted_marks(conn, instance, self.handed):
            rows = await leases.messages_of_mark(conn, mark["message_ids"], instance)
            item = Unsettled(mark["id"], mark["account"], [Message(*r) for r in rows],
                             trio.current_time())
            await unsettled.send(item)
            self.handed.add(mark["id"])
        # Tidy the in-flight counters: fold the rows of server processes that have ended.
        await conn.execute("SELECT sendd.fold_in_flight()")
        await self.report_stale(conn)

    async def report_stale(self, conn: Any) -> None:
        """This daemon's marks held far longer than any request and its settlement take: their
        messages are stuck in `sending`."""
        limit = leases.stale_after(self.controls.config)
        marks = await leases.stale_marks(conn, self.lease.instance_id, limit)
        self.metrics.stale_marks.set(len(marks))
        ids = {mark["id"] for mark in marks}
        if marks:
            messages = sum(mark["messages"] for mark in marks)
            oldest = max(mark["age"] for mark in marks)
            self.health.report_problem(
                "reaper", f"{len(marks)} submission mark(s) ({messages} messages) held in "
                f"'sending' for more than {limit:g} s, the oldest for {oldest:.0f} s")
            if ids - self.logged_stale:
                log.error("marks_stale", marks=sorted(ids - self.logged_stale),
                          open_marks=len(marks), messages=messages,
                          oldest_s=round(oldest), limit_s=limit)
        self.logged_stale = ids


async def run_reaper(
    pool: Any,
    reaper: Reaper,
    unsettled: trio.MemorySendChannel[Unsettled],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A pass now and every few seconds (a third of the lease, at most 5 s)."""
    interval = min(5.0, reaper.controls.config.pipeline.lease_seconds / 3)
    async with unsettled:
        task_status.started()
        while True:
            await keep_connected(pool, reaper.health, "reaper",
                                 lambda conn: reaper.run_once(conn, unsettled))
            await trio.sleep(interval)
