"""The housekeeper: what the daemon does once a second besides claiming, and the NOTIFY wake-ups.

Each pass (`run_once`) reads the operator's pauses as stored (sendd.db.pauses: set through any
daemon; read once before the pipeline first claims), starts scheduled campaigns that are due,
picks up tenants' rate limits and weights (set by `sendd tenant` or another daemon), pauses
the campaigns that have waited too long for an unreachable provider, and looks for messages no
daemon serves. It holds a connection that LISTENs for `sendd_queued`, so a message queued anywhere
wakes the pollers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import trio

from sendd.db import pauses
from sendd.db.connection import listening
from sendd.db.retry import keep_connected
from sendd.state import unserved
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health

log = structlog.get_logger()

INTERVAL = 1.0  # seconds between passes

START_SCHEDULED = """
UPDATE sendd.campaign SET status = 'sending', started_at = now()
WHERE status = 'scheduled' AND scheduled_at <= now()
"""

TENANT_SETTINGS = "SELECT id, rate_msgs_per_s, weight FROM sendd.tenant"

# Campaigns with messages waiting for an account whose provider has been unreachable for
# `retry.provider_down_pause`: paused with the reason instead of waiting on unseen (an operator
# resumes them once the provider is back, or moves the messages to another account).
PAUSE_FOR_PROVIDER = """
UPDATE sendd.campaign c SET status = 'paused', pause_reason = $2
WHERE c.status = 'sending' AND EXISTS (
    SELECT 1 FROM sendd.message m
    WHERE m.campaign_id = c.id AND m.status = 'queued' AND m.account = $1)
RETURNING c.id
"""


@dataclass
class Housekeeper:
    accounts: Accounts
    controls: Controls
    health: Health

    async def run_once(self, conn: Any) -> None:
        await self.refresh_pauses(conn)
        started = await conn.execute(START_SCHEDULED)
        if started != "UPDATE 0":
            self.controls.wake_pollers()
        await self.refresh_tenants(conn)
        await self.pause_for_unreachable(conn)
        await unserved.check(conn, self.health.unserved, trio.current_time(), log)

    async def refresh_pauses(self, conn: Any) -> None:
        """The stored pauses become this daemon's (a lifted one wakes the pollers), unless a
        pause or resume command came in during the read."""
        commands = self.controls.pause_commands
        stored = await pauses.load(conn)
        if commands == self.controls.pause_commands:
            self.controls.apply_pauses(stored)
            # A suspension is a stored pause of its account: resumed through any daemon.
            for account in set(self.accounts.suspended) - stored.accounts:
                del self.accounts.suspended[account]

    async def refresh_tenants(self, conn: Any) -> None:
        """The tenants' rate limits go to the governor; their weights replace
        `controls.tenant_weights` whole (only those that are not 1: a tenant not there weighs 1,
        so a weight set back to 1, or a tenant deleted, drops out)."""
        weights = {}
        for row in await conn.fetch(TENANT_SETTINGS):
            self.accounts.governor.set_tenant(row["id"], row["rate_msgs_per_s"])
            if row["weight"] != 1:
                weights[row["id"]] = float(row["weight"])
        self.controls.tenant_weights = weights

    async def pause_for_unreachable(self, conn: Any) -> None:
        after = self.controls.config.retry.provider_down_pause
        breakers = self.accounts.breakers
        for account in breakers.due_for_pause(trio.current_time(), after):
            reason = (f"account {account} unreachable for {after:g} s: "
                      f"{breakers.get(account).reason}")[:500]
            for row in await conn.fetch(PAUSE_FOR_PROVIDER, account, reason):
                log.warning("campaign_paused", campaign=row["id"], account=account,
                            reason=reason)


async def run_housekeeper(
    pool: Any, housekeeper: Housekeeper,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A pass now and every INTERVAL seconds, on a connection that LISTENs for new messages."""
    def on_notify(*_: object) -> None:
        housekeeper.controls.wake_pollers()

    async def session(conn: Any) -> None:
        nonlocal task_status
        async with listening(conn, "sendd_queued", on_notify):
            await housekeeper.refresh_pauses(conn)  # before the pipeline starts claiming
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED  # ready once, not on every reconnect
            while True:
                with housekeeper.health.working("housekeeper"):
                    await housekeeper.run_once(conn)
                await trio.sleep(INTERVAL)

    await keep_connected(pool, housekeeper.health, "housekeeper", session)
