"""The control commands: what a request does to the running daemon, and the reply it gets.

`status` reads memory only; the commands that need the database (campaign pause/resume,
tenant checks and rates, `watch`) go through the server's limiter of DB_CONCURRENCY and give
up after DB_TIMEOUT, so no client can slow the pipeline down.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import trio

from sendd.commands import campaigns
from sendd.config import AccountConfig, ConfigError
from sendd.control.protocol import Request, error_reply, show
from sendd.control.reload import reload_config
from sendd.db import pauses
from sendd.db.connection import CONNECTION_ERRORS
from sendd.errors import UserError, describe
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease

if TYPE_CHECKING:
    from sendd.control.server import Connection

DB_TIMEOUT = 10.0
DB_CONCURRENCY = 2  # pool connections the control socket may hold at once
WATCH_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class RunningDaemon:
    """The running daemon as the control commands see it: what they read for status and
    what they steer (pauses, rates, the configuration)."""

    pool: Any
    lease: Lease
    accounts: Accounts
    controls: Controls
    health: Health


Handler = Callable[[RunningDaemon, trio.CapacityLimiter, dict[str, Any]],
                   Awaitable[dict[str, Any]]]


async def status(daemon: RunningDaemon, db: trio.CapacityLimiter,
                 args: dict[str, Any]) -> dict[str, Any]:
    """Everything from memory: never waits for the database or the pipeline."""
    controls, health = daemon.controls, daemon.health
    return {
        "ok": True,
        "instance_id": daemon.lease.instance_id,
        "pid": os.getpid(),
        "uptime_s": round(trio.current_time() - health.started, 1),
        "config": controls.config.source,
        "draining": controls.drain.is_set(),
        "actors": {name: {"restarts": health.restarts[name]} for name in health.actors},
        "channels": {name: _fill(end) for name, end in health.channels.items()},
        "waiting": health.waiting(),
        "accounts": {name: _account_status(daemon, name) for name in controls.config.accounts},
        "suspended": dict(daemon.accounts.suspended),
        "unserved_accounts": dict(health.unserved.accounts),
        "problems": health.current_problems(),
        "paused": _paused(controls),
        "outcomes": dict(health.outcomes),
        # The fleet's limits: null without `redis.url`.
        "redis": daemon.accounts.fleet.status() if daemon.accounts.fleet else None,
    }


def _fill(end: Any) -> dict[str, int]:
    stats = end.statistics()
    return {"used": stats.current_buffer_used, "capacity": stats.max_buffer_size,
            "senders_waiting": stats.tasks_waiting_send,
            "receivers_waiting": stats.tasks_waiting_receive}


def _account_status(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    account = daemon.controls.account(name)
    live = daemon.accounts
    msgs, reqs = live.governor.effective(name)
    return {
        "msgs_per_s": msgs, "reqs_per_s": reqs,  # effective: lower while backing off a 429
        "configured_msgs_per_s": account.msgs_per_s, "configured_reqs_per_s": account.reqs_per_s,
        "max_batch": min(account.max_batch, live.batch_cap.get(name, account.max_batch)),
        "paused": name in daemon.controls.paused_accounts, "suspended": live.suspended.get(name),
        "breaker": live.breakers.describe(name, trio.current_time()),
    }


def _paused(controls: Controls) -> dict[str, Any]:
    return {"all": controls.paused_all, "tenants": sorted(controls.paused_tenants),
            "accounts": sorted(controls.paused_accounts)}


async def pause(daemon: RunningDaemon, db: trio.CapacityLimiter,
                args: dict[str, Any]) -> dict[str, Any]:
    """Stop claiming and marking: once this returns, only requests already marked go out (what
    is claimed but unmarked goes back to the queue). Stored (sendd.db.pauses), so every daemon
    on the database holds back within a housekeeper pass, and after a restart too."""
    scope, ident = args["scope"], args["id"]
    controls = daemon.controls
    if scope == "campaign":
        return {"ok": True, **await _on_database(daemon, db, functools.partial(
            campaigns.pause, campaign_id=ident))}
    await _check_target(daemon, db, scope, ident)
    reason = f"sendd ctl pause through instance {daemon.lease.instance_id}"
    await _on_database(daemon, db, functools.partial(
        pauses.store, scope=scope, target=ident, reason=reason))
    controls.pause_commands += 1
    if scope == "all":
        controls.paused_all = True
    elif scope == "tenant":
        controls.paused_tenants.add(ident)
    else:
        controls.paused_accounts.add(ident)
    return {"ok": True, "scope": scope, "id": ident, "paused": _paused(controls)}


async def resume(daemon: RunningDaemon, db: trio.CapacityLimiter,
                 args: dict[str, Any]) -> dict[str, Any]:
    """Lift a pause (resuming an account also lifts a suspension) and wake the pollers."""
    scope, ident = args["scope"], args["id"]
    controls = daemon.controls
    reply: dict[str, Any] = {"ok": True}
    if scope == "campaign":
        reply |= await _on_database(daemon, db, functools.partial(
            campaigns.resume, campaign_id=ident))
    else:
        await _check_target(daemon, db, scope, ident)
        await _on_database(daemon, db, functools.partial(pauses.lift, scope=scope, target=ident))
        controls.pause_commands += 1
    if scope == "all":
        controls.paused_all = False
    elif scope == "tenant":
        controls.paused_tenants.discard(ident)
    elif scope == "account":
        controls.paused_accounts.discard(ident)
        reason = daemon.accounts.suspended.pop(ident, None)
        if reason is not None:
            reply["cleared_suspension"] = reason
    controls.wake_pollers()
    if scope != "campaign":
        reply |= {"scope": scope, "id": ident, "paused": _paused(controls)}
    return reply


TENANT_EXISTS = "SELECT EXISTS (SELECT 1 FROM sendd.tenant WHERE id = $1)"


async def _check_target(daemon: RunningDaemon, db: trio.CapacityLimiter, scope: str,
                        ident: str | None) -> None:
    if scope == "tenant":
        await _check_tenant(daemon, db, str(ident))
    elif scope == "account":
        _account(daemon.controls, str(ident))


async def _check_tenant(daemon: RunningDaemon, db: trio.CapacityLimiter, tenant: str) -> None:
    """A pause of a tenant that does not exist would silently hold nothing back."""
    found = await _on_database(daemon, db, lambda conn: conn.fetchval(TENANT_EXISTS, tenant))
    if not found:
        raise UserError(f"unknown tenant {show(tenant)}")


SET_TENANT_RATE = """
UPDATE sendd.tenant SET rate_msgs_per_s = $2, updated_at = now() WHERE id = $1 RETURNING id
"""


async def set_rate(daemon: RunningDaemon, db: trio.CapacityLimiter,
                   args: dict[str, Any]) -> dict[str, Any]:
    """Change a limit live. A tenant's is also stored, so the poller's refresh keeps it."""
    msgs = args["msgs_per_s"]
    governor, controls = daemon.accounts.governor, daemon.controls
    if "tenant" in args:
        tenant = args["tenant"]
        found = await _on_database(daemon, db, lambda conn: conn.fetchval(
            SET_TENANT_RATE, tenant, msgs))
        if found is None:
            raise UserError(f"no tenant {show(tenant)}")
        governor.set_tenant(tenant, msgs)
        return {"ok": True, "tenant": tenant, "msgs_per_s": msgs}
    name = args["account"]
    account = _account(controls, name)
    reqs = account.reqs_per_s if args["reqs_per_s"] is None else args["reqs_per_s"]
    governor.set_account(name, msgs, reqs)
    accounts = controls.config.accounts | {
        name: dataclasses.replace(account, msgs_per_s=msgs, reqs_per_s=reqs)}
    controls.config = dataclasses.replace(controls.config, accounts=accounts)
    return {"ok": True, "account": name, **_account_status(daemon, name)}


async def reload(daemon: RunningDaemon, db: trio.CapacityLimiter,
                 args: dict[str, Any]) -> dict[str, Any]:
    """Re-read the configuration file (sendd.control.reload)."""
    return await reload_config(daemon.controls, daemon.accounts)


def _account(controls: Controls, name: str) -> AccountConfig:
    account = controls.config.accounts.get(name)
    if account is None:
        raise UserError(f"unknown account {show(name)} (configured: "
                        f"{', '.join(sorted(controls.config.accounts))})")
    return account


async def _on_database(daemon: RunningDaemon, db: trio.CapacityLimiter,
                       work: Callable[[Any], Awaitable[Any]]) -> Any:
    async with db:
        with trio.fail_after(DB_TIMEOUT):
            async with daemon.pool.acquire() as conn:
                return await work(conn)


_HANDLERS: dict[str, Handler] = {
    "status": status, "pause": pause, "resume": resume, "set-rate": set_rate, "reload": reload,
}
# What a command that needs the database tells the client when the database fails it.
_DATABASE_FAILURES = (trio.TooSlowError, *CONNECTION_ERRORS, asyncpg.PostgresError)


def _database_failure(error: BaseException) -> dict[str, Any]:
    if isinstance(error, trio.TooSlowError):
        return error_reply(f"the database did not answer within {DB_TIMEOUT:g}s")
    return error_reply(f"database error: {describe(error)}")


async def answer(daemon: RunningDaemon, db: trio.CapacityLimiter,
                 request: Request) -> dict[str, Any]:
    """The reply to one request; a failure the operator can act on becomes an error reply."""
    try:
        return await _HANDLERS[request.cmd](daemon, db, request.args)
    except (UserError, ConfigError) as error:
        return error_reply(str(error))
    except _DATABASE_FAILURES as error:
        return _database_failure(error)


WATCH_QUERY = """
SELECT id, tenant_id, name, status, total, sent, failed, unknown, cancelled
FROM sendd.campaign WHERE status IN ('sending', 'paused') ORDER BY id
"""


def campaign_progress(rows: list[Any], previous: dict[int, int],
                      elapsed: float) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Progress per campaign from WATCH_QUERY rows, with the rate since the `previous` sample
    (campaign -> processed) `elapsed` seconds ago; returns it and the sample for next time."""
    progress, sample = [], {}
    for row in rows:
        processed = row["sent"] + row["failed"] + row["unknown"] + row["cancelled"]
        sample[row["id"]] = processed
        before = previous.get(row["id"])
        rate = None
        if before is not None and elapsed > 0:
            rate = round(max(0, processed - before) / elapsed, 1)
        remaining = max(0, row["total"] - processed)
        progress.append({
            "id": row["id"], "tenant": row["tenant_id"], "name": row["name"],
            "status": row["status"], "total": row["total"], "sent": row["sent"],
            "failed": row["failed"], "processed": processed, "msgs_per_s": rate,
            "eta_s": round(remaining / rate, 1) if rate else None,
        })
    return progress, sample


async def watch(daemon: RunningDaemon, db: trio.CapacityLimiter,
                send: Callable[[dict[str, Any]], Awaitable[None]],
                connection: Connection) -> None:
    """A progress line every WATCH_INTERVAL until the client hangs up (a send then fails) or
    the connection is evicted to make room for a new one."""
    previous: dict[int, int] = {}
    sampled = trio.current_time()
    next_line = sampled
    controls = daemon.controls
    while True:
        try:
            rows = await _on_database(daemon, db, lambda conn: conn.fetch(WATCH_QUERY))
        except _DATABASE_FAILURES as error:
            reply = _database_failure(error)
        else:
            now = trio.current_time()
            progress, previous = campaign_progress(rows, previous, now - sampled)
            sampled = now
            reply = {"ok": True, "at": datetime.now(UTC).isoformat(timespec="seconds"),
                     "campaigns": progress, "paused": _paused(controls),
                     "suspended": dict(daemon.accounts.suspended),
                     "waiting": daemon.health.waiting(),
                     "draining": controls.drain.is_set(),
                     "outcomes": dict(daemon.health.outcomes)}
        await send(reply)
        next_line += WATCH_INTERVAL
        with connection.interruptible():
            await trio.sleep_until(next_line)
        if connection.evicted:
            return
