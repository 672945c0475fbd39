"""The heartbeat: keeps this daemon's lease fresh, and ends the daemon once the lease ended."""

from __future__ import annotations

from typing import Any

import structlog
import trio

from sendd.db import leases
from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.state.health import Health
from sendd.state.lease import Lease, LeaseLost

log = structlog.get_logger()

# Renewing often keeps the lease's remaining life well above what a request needs.
HEARTBEATS_PER_LEASE = 6


async def renew_once(pool: Any, lease: Lease, health: Health, seconds: float) -> None:
    """One renewal. A failure while the lease still runs is reported and ridden out; once it
    has ended (or the database says another daemon took it) raise LeaseLost."""
    issued = trio.current_time()
    try:
        async with pool.acquire() as conn:
            renewed = await leases.renew(conn, lease.instance_id, seconds)
    except RETRYABLE_ERRORS as error:
        health.report_problem("heartbeat", f"cannot renew the lease: {describe(error)}")
        if trio.current_time() < lease.valid_until:
            log.warning("heartbeat_failed", error=describe(error))
            return
        renewed = False
    if not renewed:
        raise LeaseLost(f"lease of instance {lease.instance_id} ended; exiting")
    # A safe lower bound: the database set lease_until from a `now()` after `issued`.
    lease.renew(issued + seconds, live_daemons=renewed)


async def run_heartbeat(
    pool: Any, lease: Lease, health: Health, seconds: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Renew the `seconds`-long lease every sixth of its length.

    A database outage shorter than the lease is ridden out. A longer one means another daemon
    may have adopted our claims, so this daemon stops (and systemd starts a fresh one).
    """
    task_status.started()
    # Renew at once: the lease has been running since registration, and senders need
    # timeout + margin of it left, which a late first renewal would not leave.
    while True:
        await renew_once(pool, lease, health, seconds)
        await trio.sleep(seconds / HEARTBEATS_PER_LEASE)
