"""The gauges: the backlog and the live leases, read from the database every few seconds for
/metrics and the systemd STATUS line (never on the scrape path, and apart from the HTTP server,
so the STATUS backlog stays when the HTTP port cannot be bound)."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.metrics import Metrics
from sendd.state.health import Health

log = structlog.get_logger()

INTERVAL = 5.0  # seconds between backlog/lease queries
TIMEOUT = 4.0

# The backlog without counting message rows (a count over millions of rows every few seconds
# in every daemon would cost more than the sending): campaigns' unfinished messages from their
# trigger-kept counters, plus queued transactional messages through their partial index.
QUEUED = """
SELECT (SELECT coalesce(sum(total - sent - failed - unknown - cancelled), 0)
        FROM sendd.campaign WHERE status IN ('scheduled', 'sending', 'paused'))
     + (SELECT count(*) FROM sendd.message WHERE status = 'queued' AND campaign_id IS NULL)
"""
ACTIVE_LEASES = ("SELECT count(*) FROM sendd.instance "
                 "WHERE stopped_at IS NULL AND lease_until > now()")


async def refresh_once(pool: Any, health: Health, metrics: Metrics) -> None:
    """Read both gauges; a failed query leaves the last values."""
    with trio.move_on_after(TIMEOUT):
        try:
            async with pool.acquire() as conn:
                queued = await conn.fetchval(QUEUED)
                leases = await conn.fetchval(ACTIVE_LEASES)
            metrics.queued.set(queued)
            health.backlog = queued
            metrics.active_leases.set(leases)
        except RETRYABLE_ERRORS as error:
            log.debug("metrics_refresh_failed", error=describe(error))


async def run_gauges(pool: Any, health: Health, metrics: Metrics,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    next_at = trio.current_time()
    while True:
        await refresh_once(pool, health, metrics)
        next_at += INTERVAL  # drift-free
        await trio.sleep_until(max(next_at, trio.current_time()))
