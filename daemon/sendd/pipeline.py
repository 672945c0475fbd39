"""The pipeline: its channels, and its actors started tail first with the state each one uses.

    poller × 2 ─[claims]─► batcher ─[scheduler]─► sender × N ─[results]─► writer
    express poller ─[express]─► express sender × 8 ─┤   (transactional; marked by the claim)
      reaper ─[unsettled]─► settler ─[results]─┘   (senders hand ambiguous batches to the settler)

The scheduler (sendd.state.scheduler) is where campaign batches wait for their limits, so that
senders only take what may go now. A drain (or a rebuild) cancels only the intake (pollers,
express poller, reaper); everything downstream finishes as its input ends.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from sendd.actors.batcher import run_batcher
from sendd.actors.express import EXPRESS_CAPACITY, EXPRESS_SENDERS, run_express_poller
from sendd.actors.poller import CAMPAIGN_POLLERS, Claimer, run_poller
from sendd.actors.reaper import Reaper, run_reaper
from sendd.actors.sender import Sender, run_scheduled_sender, run_sender
from sendd.actors.settler import LOOKUP_CONCURRENCY, Settler, run_settler
from sendd.actors.stopper import run_stopper
from sendd.actors.writer import Store, run_writer
from sendd.config import AccountConfig, Config, PipelineConfig
from sendd.core.breaker import Breakers
from sendd.core.ratelimit import Governor
from sendd.metrics import Metrics
from sendd.providers import open_provider
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease, LeaseLost
from sendd.state.scheduler import Scheduler
from sendd.supervisor import Supervisor

log = structlog.get_logger()

UNSETTLED_CAPACITY = 64


def provider_connections(pipeline: PipelineConfig) -> int:
    """HTTP connections per provider: one per sender and express sender, plus the settler's
    concurrent lookups."""
    return pipeline.senders + EXPRESS_SENDERS + LOOKUP_CONCURRENCY


@dataclass(frozen=True)
class Parts:
    """The daemon's state objects, and what each actor gets of them."""

    pool: Any
    lease: Lease
    accounts: Accounts
    controls: Controls
    health: Health
    metrics: Metrics
    supervisor: Supervisor

    def claimer(self, scheduler: Scheduler | None = None) -> Claimer:
        return Claimer(self.lease, self.accounts, self.controls, self.health, scheduler)

    def sender(self) -> Sender:
        return Sender(self.pool, self.lease, self.accounts, self.controls, self.health,
                      self.metrics)

    def store(self) -> Store:
        return Store(self.pool, self.lease.instance_id, self.health, self.metrics)

    def reaper(self) -> Reaper:
        return Reaper(self.lease, self.controls, self.health, self.metrics)

    def settler(self) -> Settler:
        return Settler(self.accounts, self.controls)


def governor_for(accounts: Iterable[AccountConfig]) -> Governor:
    """A rate governor with each account's configured limits."""
    governor = Governor()
    for account in accounts:
        governor.set_account(account.name, account.msgs_per_s, account.reqs_per_s)
    return governor


def build_parts(config: Config, pool: Any, instance_id: str, lease_until: float,
                drain: trio.Event | None = None) -> Parts:
    """The state objects of a daemon running `config` (providers opened, limits set)."""
    governor = governor_for(config.accounts.values())
    connections = provider_connections(config.pipeline)
    providers = {name: open_provider(account, connections)
                 for name, account in config.accounts.items()}
    accounts = Accounts(providers, governor, Breakers(probe_cap=config.retry.probe_cap))
    supervisor = Supervisor(log, fatal=(LeaseLost,))
    # The supervisor keeps the restart and crash records; health reads them (not copies).
    health = Health(config.daemon.stall_seconds, restarts=supervisor.restarts,
                    crashed_at=supervisor.crashed_at)
    controls = Controls(config, drain=trio.Event() if drain is None else drain)
    return Parts(pool, Lease(instance_id, lease_until), accounts, controls, health,
                 Metrics(health, accounts), supervisor)


class Channels:
    """The pipeline's memory channels; status and metrics read their fill (`health.channels`)."""

    def __init__(self, cfg: PipelineConfig, health: Health, scheduler: Scheduler) -> None:
        self.claims_send, self.claims_recv = trio.open_memory_channel[Any](cfg.claim_capacity)
        self.results_send, self.results_recv = trio.open_memory_channel[Any](cfg.result_capacity)
        self.unsettled_send, self.unsettled_recv = trio.open_memory_channel[Any](
            UNSETTLED_CAPACITY)
        self.express_send, self.express_recv = trio.open_memory_channel[Any](EXPRESS_CAPACITY)
        # statistics() of either end reads the shared buffer.
        health.channels = {"claims": self.claims_recv, "batches": scheduler,
                           "results": self.results_recv, "unsettled": self.unsettled_recv,
                           "express": self.express_recv}


async def run_pipeline(parts: Parts, stop_intake: trio.Event, on_ready: Any,
                       service_actors: tuple[str, ...]) -> None:
    """Start the actors tail first, report ready, and return once drained."""
    cfg = parts.controls.config.pipeline
    health = parts.health
    health.actors = [a for a in health.actors if a in service_actors]
    scheduler = Scheduler(parts.accounts, parts.controls, cfg.batch_capacity)
    parts.health.scheduler = scheduler
    ch = Channels(cfg, health, scheduler)

    def start(nursery: trio.Nursery, name: str, actor: Any, *channels: Any) -> Any:
        health.actors.append(name)
        run = functools.partial(parts.supervisor.supervise, name, actor, channels=channels)
        return nursery.start(run)

    sender, claimer = parts.sender(), parts.claimer(scheduler)
    async with trio.open_nursery() as tail:
        await start(tail, "writer", functools.partial(run_writer, parts.store(), cfg),
                    ch.results_recv)
        await start(tail, "settler", functools.partial(run_settler, parts.settler()),
                    ch.unsettled_recv, ch.results_send.clone())
        for number in range(cfg.senders):
            await start(tail, f"sender-{number}",
                        functools.partial(run_scheduled_sender, sender, scheduler),
                        ch.results_send.clone(), ch.unsettled_send.clone())
        for number in range(EXPRESS_SENDERS):
            await start(tail, f"express-sender-{number}", functools.partial(run_sender, sender),
                        ch.express_recv.clone(), ch.results_send.clone(),
                        ch.unsettled_send.clone())
        await start(tail, "stopper", functools.partial(run_stopper, parts.pool, scheduler))
        await start(tail, "batcher",
                    functools.partial(run_batcher, parts.accounts, parts.controls, cfg,
                                      scheduler),
                    ch.claims_recv)
        # Only the clones handed out keep these open now, so the ends propagate downstream.
        for end in (ch.express_recv, ch.results_send):
            await end.aclose()
        async with trio.open_nursery() as intake:
            for number in range(1, CAMPAIGN_POLLERS + 1):
                name = "poller" if number == 1 else f"poller-{number}"
                await start(intake, name,
                            functools.partial(run_poller, parts.pool, claimer, name=name),
                            ch.claims_send.clone())
            await ch.claims_send.aclose()  # the pollers' clones keep the channel open
            await start(intake, "express",
                        functools.partial(run_express_poller, parts.pool, claimer),
                        ch.express_send)
            await start(intake, "reaper", functools.partial(run_reaper, parts.pool,
                                                            parts.reaper()),
                        ch.unsettled_send)
            on_ready()
            await stop_intake.wait()
            intake.cancel_scope.cancel()
    log.info("drain_finished")
