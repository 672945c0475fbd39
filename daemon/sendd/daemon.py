"""`sendd run`: builds the daemon's small state objects, starts the service actors and the
pipeline (sendd.pipeline) under one supervisor, and runs until drained.

Shutdown is layered: a drain cancels only the intake (pollers, reaper); everything downstream
finishes as its input channel ends, under the stop timeout. Then what never left is released.
"""

from __future__ import annotations

import functools
import gc
import signal
from collections.abc import Callable
from typing import Any

import structlog
import trio
import triopg

from sendd.actors.express import EXPRESS_SENDERS
from sendd.actors.gauges import run_gauges
from sendd.actors.heartbeat import run_heartbeat
from sendd.actors.housekeeper import Housekeeper, run_housekeeper
from sendd.actors.poller import CAMPAIGN_POLLERS
from sendd.config import Config, mask_url
from sendd.control.reload import reload_on_signal, switch_config
from sendd.control.server import serve_control
from sendd.db import leases, migrate
from sendd.db.connection import CONNECTION_ERRORS, unavailable
from sendd.errors import UserError, describe, first_leaf
from sendd.http.operators import Observed, serve_http
from sendd.notify import Notifier, watchdog_interval
from sendd.pipeline import Parts, build_parts, provider_connections, run_pipeline
from sendd.shared.limits import FleetLimits, run_redis_watch
from sendd.shared.link import RedisLink
from sendd.state.controls import Controls
from sendd.state.lease import LeaseLost, new_instance_id
from sendd.supervisor import CrashLoop

log = structlog.get_logger()

STATUS_INTERVAL = 5.0  # seconds between STATUS= lines to systemd
# The cyclic garbage collector's first threshold (CPython's default is 700 allocations). A
# running daemon allocates a few objects per message, most of them freed by reference counting
# within milliseconds; at 700 the collector ran every few hundred messages and traversed every
# claimed message still in the pipeline, ~10 % of the daemon's CPU. At 50,000 it runs a few
# times a second; what cycles it finds (trio's cancelled scopes, exceptions) wait that long.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never traverse what start-up left (modules,
    configuration): `gc.freeze()` moves it out of the collector's sight for good."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run_daemon(config: Config, *, ready: trio.Event | None = None,
                     drain: trio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `drain` is set); returns the process exit code."""
    # Senders, express senders, pollers, express poller, writer, heartbeat, reaper, settler,
    # housekeeper, gauges, and one spare.
    pool_size = max(config.database.pool_size,
                    config.pipeline.senders + EXPRESS_SENDERS + CAMPAIGN_POLLERS + 8)
    try:
        pool_cm = triopg.create_pool(config.database.url, min_size=2, max_size=pool_size,
                                     timeout=config.database.connect_timeout)
        pool = await pool_cm.__aenter__()
    except (*CONNECTION_ERRORS, TimeoutError) as error:
        raise unavailable(config.database.url, error) from None
    try:
        parts = await _start(config, pool, trio.Event() if drain is None else drain)
        try:
            return await _serve(parts, ready)
        finally:
            for provider in parts.accounts.providers.values():
                await provider.aclose()
            if parts.accounts.fleet is not None:
                with trio.CancelScope(shield=True):
                    await parts.accounts.fleet.link.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await pool_cm.__aexit__(None, None, None)


async def _start(config: Config, pool: Any, drain: trio.Event) -> Parts:
    """Check the schema, register this instance's lease, and build the state objects."""
    leases.check_runnable(config)
    async with pool.acquire() as conn:
        version = await migrate.schema_version(conn)
        newest = migrate.available_migrations()[-1][0]
        if version < newest:
            raise UserError(f"the database schema is at version {version}, this sendd needs "
                            f"{newest}: run `sendd migrate` first")
        instance_id = new_instance_id(config.daemon.instance_id)
        registered = trio.current_time()
        await leases.register(conn, instance_id, config.pipeline.lease_seconds)
        await leases.serve_accounts(conn, instance_id, list(config.accounts))
    structlog.contextvars.bind_contextvars(instance=instance_id)  # on every log line
    parts = build_parts(config, pool, instance_id, registered + config.pipeline.lease_seconds,
                        drain)
    if config.redis.url:
        parts.accounts.fleet = FleetLimits(RedisLink(config.redis.url), parts.accounts.governor,
                                           parts.health, parts.lease)
        log.info("limits_shared", redis=mask_url(config.redis.url))
    return parts


def _service_actors(parts: Parts) -> list[tuple[str, Callable[..., Any]]]:
    """The actors that run for the daemon's whole life, beside the (rebuildable) pipeline."""
    pool, lease, health = parts.pool, parts.lease, parts.health
    seconds = parts.controls.config.pipeline.lease_seconds
    housekeeper = Housekeeper(parts.accounts, parts.controls, health)
    config = parts.controls.config
    observed = Observed(pool, config.daemon.http_listen, health, lease, parts.accounts,
                        parts.metrics, parts.controls.drain)
    return [
        ("heartbeat", functools.partial(run_heartbeat, pool, lease, health, seconds)),
        ("housekeeper", functools.partial(run_housekeeper, pool, housekeeper)),
        ("gauges", functools.partial(run_gauges, pool, health, parts.metrics)),
        ("control", functools.partial(serve_control, pool=pool, lease=lease,
                                      accounts=parts.accounts, controls=parts.controls,
                                      health=health)),
        ("http", functools.partial(serve_http, observed)),  # /healthz /readyz /metrics
        *([("redis", functools.partial(run_redis_watch, parts.accounts.fleet, pool))]
          if parts.accounts.fleet is not None else []),
    ]


async def _serve(parts: Parts, ready: trio.Event | None) -> int:
    exit_code = 0
    notifier = Notifier.from_environ(log=log)

    def on_ready() -> None:
        log.info("daemon_ready", accounts=sorted(parts.accounts.providers))
        notifier.ready()  # every actor has started and the database has answered
        if ready is not None:
            ready.set()

    try:
        async with trio.open_nursery() as nursery:
            services = _service_actors(parts)
            for name, actor in services:
                await nursery.start(parts.supervisor.supervise, name, actor)
            parts.health.actors += [name for name, _ in services]
            nursery.start_soon(_watch_signals, parts)
            nursery.start_soon(_tell_systemd, parts, notifier)
            with trio.CancelScope() as pipeline_scope:
                nursery.start_soon(_stop_after, parts.controls, pipeline_scope)
                await _run_pipelines(parts, on_ready, tuple(parts.health.actors))
            nursery.cancel_scope.cancel()
    except* (CrashLoop, LeaseLost) as group:
        log.error("daemon_failed", error=describe(first_leaf(group)))
        exit_code = 1
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await _finish(parts)
    return exit_code


async def _tell_systemd(parts: Parts, notifier: Notifier) -> None:
    """STATUS= lines with the send rate; WATCHDOG=1 while the lease heartbeat keeps succeeding and
    no actor is wedged (a wedged actor, a blocked event loop or a lost database stop the pings);
    STOPPING=1 once a drain starts."""
    health, drain = parts.health, parts.controls.drain
    interval = watchdog_interval() or STATUS_INTERVAL
    last_total, last_time = 0, trio.current_time()
    while not drain.is_set():
        with trio.move_on_after(min(interval, STATUS_INTERVAL)):
            await drain.wait()
        now = trio.current_time()
        outcomes = health.outcomes
        total = sum(outcomes.values())
        rate = (total - last_total) / max(now - last_time, 1e-6)
        last_total, last_time = total, now
        backlog = "" if health.backlog is None else f"; backlog {health.backlog:,}"
        notifier.status(f"{rate:,.0f} msgs/s; sent {outcomes['sent']:,}, "
                        f"failed {outcomes['failed']:,}{backlog}")
        if parts.lease.valid_until > now and not health.stalled() and not drain.is_set():
            notifier.watchdog()
    notifier.stopping()
    notifier.status("draining")


async def _stop_after(controls: Controls, scope: trio.CancelScope) -> None:
    """Once a drain starts, give the pipeline the stop timeout, then cancel what is left."""
    await controls.drain.wait()
    timeout = controls.config.daemon.stop_timeout
    log.info("drain_started", timeout=timeout)
    await trio.sleep(timeout)
    log.warning("drain_timeout", timeout=timeout)
    scope.cancel()


async def _watch_signals(parts: Parts) -> None:
    drain = parts.controls.drain
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload_on_signal(parts.controls, parts.accounts)
            elif drain.is_set():
                raise KeyboardInterrupt  # a second signal: stop now, leases settle the rest
            else:
                drain.set()


async def _run_pipelines(parts: Parts, on_ready: Callable[[], None],
                         services: tuple[str, ...]) -> None:
    """Run the pipeline until a drain. A reload that changes what only a new pipeline can take
    (channel capacities, senders, accounts, retries) drains this one the same way — in-flight
    work finishes and is written — then starts the next with the new configuration."""
    controls = parts.controls
    while True:
        stop_intake = trio.Event()
        controls.rebuild = trio.Event()
        async with trio.open_nursery() as watchers:
            for cause in (controls.drain, controls.rebuild):
                watchers.start_soon(_relay, cause, stop_intake)
            await run_pipeline(parts, stop_intake, on_ready, services)
            watchers.cancel_scope.cancel()
        if controls.drain.is_set():
            return
        await switch_config(parts.pool, parts.lease, parts.accounts, controls, parts.health,
                            connections=provider_connections(controls.next_config.pipeline))


async def _relay(cause: trio.Event, effect: trio.Event) -> None:
    await cause.wait()
    effect.set()


async def _finish(parts: Parts) -> None:
    """Release what never reached a provider; open marks are left for settlement."""
    try:
        async with parts.pool.acquire() as conn:
            open_marks = await leases.finish(conn, parts.lease.instance_id)
    except CONNECTION_ERRORS as error:
        log.warning("finish_failed", error=str(error), detail="leases will expire")
        return
    log.info("daemon_stopped", unsettled_batches=open_marks)
