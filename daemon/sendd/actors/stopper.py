"""The stopper: campaigns paused or cancelled while their messages wait in the scheduler.

A pause or cancel is a database write (`sendd campaign pause`, any daemon, or a direct UPDATE),
and the submission mark refuses a stopped campaign's batches, so nothing of it is sent after
the command returns. What still waits in this daemon's scheduler, though, would be put back only
when its turn came (for a slow tenant, after its rate wait); twice a second this looks up the
campaigns waiting there and has their batches released at once, so a paused campaign's messages
are queued again (a cancelled one's cancelled) within a second.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.state.scheduler import Scheduler

log = structlog.get_logger()

INTERVAL = 0.5  # seconds between looks
TIMEOUT = 2.0

STOPPED = """
SELECT id FROM sendd.campaign WHERE id = ANY($1::bigint[]) AND status <> 'sending'
"""


async def check_once(pool: Any, scheduler: Scheduler) -> None:
    """Tell the scheduler which of its campaigns are stopped; a failed query changes nothing
    (the marks refuse them anyway)."""
    waiting = scheduler.campaigns()
    if not waiting:
        scheduler.stop_campaigns(set())
        return
    with trio.move_on_after(TIMEOUT):
        try:
            async with pool.acquire() as conn:
                rows = await conn.fetch(STOPPED, sorted(waiting))
            scheduler.stop_campaigns({row["id"] for row in rows})
        except RETRYABLE_ERRORS as error:
            log.debug("stopped_check_failed", error=describe(error))
    scheduler.wake()  # an operator pause of a tenant or account, too, is released now


async def run_stopper(pool: Any, scheduler: Scheduler,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Look until the scheduler is closed and empty (the pipeline drained)."""
    task_status.started()
    while not (scheduler.closed and not scheduler.queues):
        await check_once(pool, scheduler)
        await trio.sleep(INTERVAL)
