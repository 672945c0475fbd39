"""Reloading the configuration (the `reload` command and SIGHUP), in three steps:

1. `plan_reload` (pure): account rates and max_batch apply live, at once;
2. what only a new pipeline can take (pipeline, retry, accounts, drain and stall times) goes
   to `Controls.next_config` (`rebuilt_config`), and `Controls.rebuild` asks the daemon to drain
   this pipeline the same way as a stop: in-flight work finishes and is written;
3. between the two pipelines the daemon calls `switch_config`: the stopped intake's claims go
   back, and the configuration, providers and rate limits switch.

The rest (database, sockets, logging, the lease length) needs a restart and is only listed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import structlog
import trio

from sendd.config import DEFAULTS_SOURCE, AccountConfig, Config, ConfigError, load_config
from sendd.db import leases
from sendd.providers import open_provider
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease

log = structlog.get_logger()

# Account settings a reload applies live, at once.
LIVE_ACCOUNT_KEYS = ("msgs_per_s", "reqs_per_s", "max_batch")
# Settings a reload applies by draining the pipeline and starting a new one (in-flight work
# finishes first). The rest (database, sockets, logging, the lease length) need a restart.
REBUILDABLE = ("pipeline.", "retry.", "accounts.", "daemon.stop_timeout", "daemon.stall_seconds")


def plan_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload runs with: the old configuration with the live account settings of the new
    one. Returns it, the keys applied and the keys that need a restart (names, never values)."""
    pending = [key for key in sorted(_sections(old) | _sections(new))
               if _sections(old).get(key) != _sections(new).get(key)]
    applied: list[str] = []
    accounts = dict(old.accounts)
    for name in sorted(old.accounts.keys() | new.accounts.keys()):
        if name not in old.accounts or name not in new.accounts:
            pending.append(f"accounts.{name}")
            continue
        was, now = old.accounts[name], new.accounts[name]
        for f in dataclasses.fields(AccountConfig):
            if getattr(was, f.name) != getattr(now, f.name):
                live = f.name in LIVE_ACCOUNT_KEYS
                (applied if live else pending).append(f"accounts.{name}.{f.name}")
        accounts[name] = dataclasses.replace(
            was, **{key: getattr(now, key) for key in LIVE_ACCOUNT_KEYS})
    return dataclasses.replace(old, accounts=accounts), applied, pending


def _sections(config: Config) -> dict[str, Any]:
    return {f"{section.name}.{f.name}": getattr(getattr(config, section.name), f.name)
            for section in dataclasses.fields(config) if section.name not in ("accounts", "source")
            for f in dataclasses.fields(getattr(config, section.name))}


def _rebuildable(key: str) -> bool:
    return key.startswith(REBUILDABLE) and key != "pipeline.lease_seconds"


def rebuilt_config(running: Config, new: Config) -> Config:
    """What the next pipeline runs with: the new pipeline, retry and accounts settings (and
    the drain and stall times); what only a restart can change stays as it runs now."""
    daemon = dataclasses.replace(running.daemon, stop_timeout=new.daemon.stop_timeout,
                                 stall_seconds=new.daemon.stall_seconds)
    pipeline = dataclasses.replace(new.pipeline,
                                   lease_seconds=running.pipeline.lease_seconds)
    return dataclasses.replace(running, daemon=daemon, pipeline=pipeline, retry=new.retry,
                               accounts=new.accounts)


async def reload_config(controls: Controls, accounts: Accounts) -> dict[str, Any]:
    """The `reload` command: re-read the configuration file the daemon started with and apply
    what can change live (account rate limits and max_batch); ask for a new pipeline for what
    only that can take. A file that does not load raises ConfigError and changes nothing."""
    running = controls.config
    path = None if running.source == DEFAULTS_SOURCE else running.source
    # The running database URL is kept, also when it came from --database-url.
    load = functools.partial(load_config, path, database_url=running.database.url)
    new = await trio.to_thread.run_sync(load)
    config, applied, pending = plan_reload(controls.config, new)
    rebuild = [key for key in pending if _rebuildable(key)]
    restart = [key for key in pending if not _rebuildable(key)]
    if rebuild:
        target = rebuilt_config(controls.config, new)
        leases.check_runnable(target)  # refused before anything changes
        controls.next_config = target
        controls.rebuild.set()  # the daemon drains this pipeline and starts one with `target`
    controls.config = config
    for name, account in config.accounts.items():
        accounts.governor.set_account(name, account.msgs_per_s, account.reqs_per_s)
    log.info("config_reloaded", source=new.source, applied=applied, rebuilt=rebuild,
             restart_required=restart)
    return {"ok": True, "source": new.source, "applied": applied, "rebuilt": rebuild,
            "restart_required": restart}


async def reload_on_signal(controls: Controls, accounts: Accounts) -> None:
    """SIGHUP: as the `reload` command; a bad file is logged and the old configuration kept."""
    try:
        await reload_config(controls, accounts)
    except ConfigError as error:
        log.error("reload_failed", error=str(error), detail="the old configuration stays")


async def switch_config(pool: Any, lease: Lease, accounts: Accounts, controls: Controls,
                        health: Health, *, connections: int) -> None:
    """Between two pipelines: put back the claims the stopped intake held, then switch to
    `controls.next_config`: configuration, providers (`connections` HTTP connections each, for
    the new pipeline), rate limits, the breakers' probe cap and the stall time."""
    old, new = controls.config, controls.next_config
    assert new is not None, "a rebuild without a configuration to switch to"
    async with pool.acquire() as conn:
        released = await leases.release_unsubmitted(conn, lease.instance_id)
        await leases.serve_accounts(conn, lease.instance_id, list(new.accounts))
    providers = accounts.providers
    for name, account in new.accounts.items():
        if old.accounts.get(name) != account or name not in providers:
            if name in providers:
                await providers[name].aclose()
            providers[name] = open_provider(account, connections)
        accounts.governor.set_account(name, account.msgs_per_s, account.reqs_per_s)
    for name in set(providers) - set(new.accounts):
        await providers.pop(name).aclose()
    controls.config = new
    accounts.breakers.probe_cap = new.retry.probe_cap
    health.stall_seconds = new.daemon.stall_seconds
    log.info("pipeline_rebuilt", released=released, accounts=sorted(new.accounts))
