"""`sendd run`: wires the actors together and runs them until drained.

    poller ─[claims]─► batcher ─[batches]─► sender × N ─[results]─► writer
    express poller ─[express]─► express sender × 8 ─┤   (transactional; marked by the claim)
      reaper ─[unsettled]─► settler ─[results]─┘   (senders hand ambiguous batches to the settler)

Shutdown is layered: a drain cancels only the intake (poller, reaper); everything downstream
finishes as its input channel ends, under the stop timeout. Then what never left is released.
"""

from __future__ import annotations

import functools
import gc
import signal
from collections.abc import Callable
from typing import Any

import trio
import triopg

from sendd import leases
from sendd.actors.batcher import run_batcher
from sendd.actors.express import EXPRESS_CAPACITY, EXPRESS_SENDERS, run_express_poller
from sendd.actors.poller import CAMPAIGN_POLLERS, run_poller
from sendd.actors.reaper import run_heartbeat, run_reaper
from sendd.actors.sender import LeaseLost, run_sender
from sendd.actors.settler import LOOKUP_CONCURRENCY, run_settler
from sendd.actors.writer import run_writer
from sendd.config import Config, PipelineConfig
from sendd.control.server import reload_on_signal, serve_control
from sendd.core.ratelimit import Governor
from sendd.db import migrate
from sendd.db.connection import CONNECTION_ERRORS, unavailable
from sendd.errors import UserError
from sendd.http.operators import serve_http
from sendd.notify import Notifier, watchdog_interval
from sendd.providers import open_provider
from sendd.runtime import Runtime, new_instance_id
from sendd.supervisor import CrashLoop, Supervisor, first_leaf

UNSETTLED_CAPACITY = 64
# What this daemon sends for, so every daemon can tell messages no daemon serves (sendd.unserved).
SERVED_ACCOUNTS = "UPDATE sendd.instance SET accounts = $2 WHERE id = $1"
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


# Actors that run for the daemon's whole life, beside the (rebuildable) pipeline.
SERVICE_ACTORS = ("heartbeat", "control", "http")


async def run_daemon(config: Config, *, ready: trio.Event | None = None,
                     drain: trio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `drain` is set); returns the process exit code."""
    pipeline = config.pipeline
    # Senders, express senders, pollers, express poller, writer, heartbeat, reaper, settler,
    # the metrics refresh, and one spare.
    pool_size = max(config.database.pool_size,
                    pipeline.senders + EXPRESS_SENDERS + CAMPAIGN_POLLERS + 7)
    try:
        pool_cm = triopg.create_pool(config.database.url, min_size=2, max_size=pool_size,
                                     timeout=config.database.connect_timeout)
        pool = await pool_cm.__aenter__()
    except (*CONNECTION_ERRORS, TimeoutError) as error:
        raise unavailable(config.database.url, error) from None
    try:
        runtime = await _start_runtime(config, pool)
        try:
            return await _serve(runtime, ready, drain or trio.Event())
        finally:
            for provider in runtime.providers.values():
                await provider.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await pool_cm.__aexit__(None, None, None)


def provider_connections(pipeline: PipelineConfig) -> int:
    """HTTP connections per provider: one per sender and express sender, plus the settler's
    concurrent lookups."""
    return pipeline.senders + EXPRESS_SENDERS + LOOKUP_CONCURRENCY


async def _start_runtime(config: Config, pool: Any) -> Runtime:
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
        await conn.execute(SERVED_ACCOUNTS, instance_id, sorted(config.accounts))
    governor = Governor()
    for account in config.accounts.values():
        governor.set_account(account.name, account.msgs_per_s, account.reqs_per_s)
    connections = provider_connections(config.pipeline)
    providers = {name: open_provider(account, connections)
                 for name, account in config.accounts.items()}
    runtime = Runtime(config, instance_id, pool, governor, providers,
                      lease_valid_until=registered + config.pipeline.lease_seconds)
    runtime.log = runtime.log.bind(instance=instance_id)
    runtime.breakers.probe_cap = config.retry.probe_cap
    return runtime


async def _serve(runtime: Runtime, ready: trio.Event | None, drain: trio.Event) -> int:
    supervisor = Supervisor(runtime.log, fatal=(LeaseLost,))
    exit_code = 0
    # Control socket: status reads the drain event and restart counts through the runtime.
    runtime.drain = drain
    runtime.restarts = supervisor.restarts
    runtime.crashed_at = supervisor.crashed_at  # for /healthz

    notifier = Notifier.from_environ(log=runtime.log)

    def on_ready() -> None:
        runtime.log.info("daemon_ready", accounts=sorted(runtime.providers))
        notifier.ready()  # every actor has started and the database has answered
        if ready is not None:
            ready.set()

    try:
        async with trio.open_nursery() as nursery:
            for name, actor in zip(SERVICE_ACTORS, (run_heartbeat, serve_control, serve_http),
                                   strict=True):  # http: /healthz /readyz /metrics
                await nursery.start(supervisor.supervise, name, actor, runtime)
            runtime.actors += list(SERVICE_ACTORS)
            nursery.start_soon(_watch_signals, runtime, drain)
            nursery.start_soon(_tell_systemd, runtime, notifier, drain)
            with trio.CancelScope() as pipeline_scope:
                nursery.start_soon(_stop_after, runtime, drain, pipeline_scope)
                await _run_pipelines(runtime, supervisor, drain, on_ready)
            nursery.cancel_scope.cancel()
    except* (CrashLoop, LeaseLost) as group:
        runtime.log.error("daemon_failed", error=str(first_leaf(group)))
        exit_code = 1
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await _finish(runtime)
    return exit_code


async def _tell_systemd(runtime: Runtime, notifier: Notifier, drain: trio.Event) -> None:
    """STATUS= lines with the send rate; WATCHDOG=1 while the lease heartbeat keeps succeeding and
    no actor is wedged (a wedged actor, a blocked event loop or a lost database stop the pings);
    STOPPING=1 once a drain starts."""
    interval = watchdog_interval() or STATUS_INTERVAL
    last_total, last_time = 0, trio.current_time()
    while not drain.is_set():
        with trio.move_on_after(min(interval, STATUS_INTERVAL)):
            await drain.wait()
        now = trio.current_time()
        total = sum(runtime.outcomes.values())
        rate = (total - last_total) / max(now - last_time, 1e-6)
        last_total, last_time = total, now
        backlog = "" if runtime.backlog is None else f"; backlog {runtime.backlog:,}"
        notifier.status(f"{rate:,.0f} msgs/s; sent {runtime.outcomes['sent']:,}, "
                        f"failed {runtime.outcomes['failed']:,}{backlog}")
        if runtime.lease_valid_until > now and not runtime.stalled() and not drain.is_set():
            notifier.watchdog()
    notifier.stopping()
    notifier.status("draining")


async def _stop_after(runtime: Runtime, drain: trio.Event, scope: trio.CancelScope) -> None:
    """Once a drain starts, give the pipeline the stop timeout, then cancel what is left."""
    await drain.wait()
    runtime.log.info("drain_started", timeout=runtime.config.daemon.stop_timeout)
    await trio.sleep(runtime.config.daemon.stop_timeout)
    runtime.log.warning("drain_timeout", timeout=runtime.config.daemon.stop_timeout)
    scope.cancel()


async def _watch_signals(runtime: Runtime, drain: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload_on_signal(runtime)
            elif drain.is_set():
                raise KeyboardInterrupt  # a second signal: stop now, leases settle the rest
            else:
                drain.set()


async def _run_pipelines(runtime: Runtime, supervisor: Supervisor, drain: trio.Event,
                         on_ready: Callable[[], None]) -> None:
    """Run the pipeline until a drain. A reload that changes what only a new pipeline can take
    (channel capacities, senders, accounts, retries) drains this one the same way — in-flight
    work finishes and is written — then starts the next with the new configuration."""
    while True:
        stop_intake = trio.Event()
        runtime.rebuild = trio.Event()
        async with trio.open_nursery() as watchers:
            for cause in (drain, runtime.rebuild):
                watchers.start_soon(_relay, cause, stop_intake)
            await _run_pipeline(runtime, supervisor, stop_intake, on_ready)
            watchers.cancel_scope.cancel()
        if drain.is_set():
            return
        await _apply_rebuild(runtime)


async def _relay(cause: trio.Event, effect: trio.Event) -> None:
    await cause.wait()
    effect.set()


async def _apply_rebuild(runtime: Runtime) -> None:
    """Between two pipelines: put back the claims the stopped intake held, then switch the
    configuration, providers and rate limits."""
    old, new = runtime.config, runtime.next_config
    async with runtime.pool.acquire() as conn:
        released = await leases.release_unsubmitted(conn, runtime.instance_id)
        await conn.execute(SERVED_ACCOUNTS, runtime.instance_id, sorted(new.accounts))
    connections = provider_connections(new.pipeline)
    for name, account in new.accounts.items():
        if old.accounts.get(name) != account or name not in runtime.providers:
            if name in runtime.providers:
                await runtime.providers[name].aclose()
            runtime.providers[name] = open_provider(account, connections)
        runtime.governor.set_account(name, account.msgs_per_s, account.reqs_per_s)
    for name in set(runtime.providers) - set(new.accounts):
        await runtime.providers.pop(name).aclose()
    runtime.config = new
    runtime.breakers.probe_cap = new.retry.probe_cap
    runtime.log.info("pipeline_rebuilt", released=released, accounts=sorted(new.accounts))


async def _run_pipeline(runtime: Runtime, supervisor: Supervisor, drain: trio.Event,
                        on_ready: Callable[[], None]) -> None:
    """Start the actors tail first, report ready, and return once drained."""
    cfg = runtime.config.pipeline
    runtime.actors = [a for a in runtime.actors if a in SERVICE_ACTORS]
    claims_send, claims_recv = trio.open_memory_channel(cfg.claim_capacity)
    batches_send, batches_recv = trio.open_memory_channel(cfg.batch_capacity)
    results_send, results_recv = trio.open_memory_channel(cfg.result_capacity)
    unsettled_send, unsettled_recv = trio.open_memory_channel(UNSETTLED_CAPACITY)
    express_send, express_recv = trio.open_memory_channel(EXPRESS_CAPACITY)
    # For status (control socket): statistics() of either end reads the shared buffer.
    runtime.channels = {"claims": claims_recv, "batches": batches_send,
                        "results": results_recv, "unsettled": unsettled_recv,
                        "express": express_recv}

    def start(nursery: trio.Nursery, name: str, actor: Any, *channels: Any) -> Any:
        runtime.actors.append(name)
        run = functools.partial(supervisor.supervise, name, actor, runtime, channels=channels)
        return nursery.start(run)

    async with trio.open_nursery() as tail:
        await start(tail, "writer", run_writer, results_recv)
        await start(tail, "settler", run_settler, unsettled_recv, results_send.clone())
        for number in range(cfg.senders):
            await start(tail, f"sender-{number}", run_sender, batches_recv.clone(),
                        results_send.clone(), unsettled_send.clone())
        for number in range(EXPRESS_SENDERS):
            await start(tail, f"express-sender-{number}", run_sender, express_recv.clone(),
                        results_send.clone(), unsettled_send.clone())
        await start(tail, "batcher", run_batcher, claims_recv, batches_send)
        # Only the clones handed out keep these open now, so the ends propagate downstream.
        await batches_recv.aclose()
        await express_recv.aclose()
        await results_send.aclose()
        async with trio.open_nursery() as intake:
            await start(intake, "poller", run_poller, claims_send.clone())
            for number in range(2, CAMPAIGN_POLLERS + 1):
                name = f"poller-{number}"
                await start(intake, name, functools.partial(run_poller, name=name, lead=False),
                            claims_send.clone())
            await claims_send.aclose()  # the pollers' clones keep the channel open
            await start(intake, "express", run_express_poller, express_send)
            await start(intake, "reaper", run_reaper, unsettled_send)
            on_ready()
            await drain.wait()
            intake.cancel_scope.cancel()
    runtime.log.info("drain_finished")


async def _finish(runtime: Runtime) -> None:
    """Release what never reached a provider; open marks are left for settlement."""
    try:
        async with runtime.pool.acquire() as conn:
            open_marks = await leases.finish(conn, runtime.instance_id)
    except CONNECTION_ERRORS as error:
        runtime.log.warning("finish_failed", error=str(error), detail="leases will expire")
        return
    runtime.log.info("daemon_stopped", unsettled_batches=open_marks)
