"""State the actors share: configuration, the database pool, providers, pauses, counters.

Actors still talk to each other only through channels; this is the read-mostly context they
are started with, and what status and metrics read.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from sendd.config import Config
from sendd.core.breaker import Breakers
from sendd.core.ratelimit import Governor
from sendd.http.metrics import Metrics
from sendd.providers.base import Provider
from sendd.unserved import UnservedWatch

# Longer than the longest retry backoff (5 s), so a problem stays visible between attempts.
PROBLEM_MEMORY = 12.0


def new_instance_id(configured: str = "") -> str:
    """A fresh id per start, so a restarted daemon never mistakes old leases for its own."""
    base = configured or f"{socket.gethostname()}-{os.getpid()}"
    return f"{base}-{secrets.token_hex(3)}"


@dataclass
class Runtime:
    config: Config
    instance_id: str
    pool: Any
    governor: Governor
    providers: dict[str, Provider]
    log: Any = field(default_factory=structlog.get_logger)
    # Accounts whose provider cannot be reached are held back by their breaker (sendd.core.breaker).
    breakers: Breakers = field(init=False)
    # Messages whose account no daemon serves (sendd.unserved), kept by the lead poller.
    unserved: UnservedWatch = field(default_factory=UnservedWatch)
    # Accounts suspended by the provider (401/403/402): account -> reason.
    suspended: dict[str, str] = field(default_factory=dict)
    # Operator pauses (control socket).
    paused_accounts: set[str] = field(default_factory=set)
    paused_tenants: set[str] = field(default_factory=set)
    # Accounts whose provider refused a batch as too large: account -> the size that fits.
    batch_cap: dict[str, int] = field(default_factory=dict)
    # Work in progress per actor (see `working`), to tell a wedged actor from an idle one.
    busy_since: dict[tuple[str, object], float] = field(default_factory=dict)
    # Messages queued in the database, refreshed every few seconds (sendd.http.metrics), or None.
    backlog: int | None = None
    # A reload that needs a new pipeline sets `rebuild` after putting the config in `next_config`.
    rebuild: trio.Event = field(default_factory=trio.Event)
    next_config: Config | None = None
    # Recent trouble per actor (reason, trio time), for status and health.
    problems: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Trio time until which this instance's lease surely lasts (kept by the heartbeat).
    lease_valid_until: float = 0.0
    # Set (and replaced) by wake_poller to wake the campaign pollers early (new work was queued, a
    # pause was lifted): a poller takes the current event before it claims and waits on that
    # one, so a wake-up that came during its claim is not missed.
    wakeup: trio.Event = field(default_factory=trio.Event)
    # Each tenant's budget as the last claim read it: which claim slots the next claim takes.
    budgets: dict[str, int] = field(default_factory=dict)
    # --- read by the control socket (sendd.control.server); daemon.py fills these in -------------
    # Operator pause of everything: the poller claims nothing while it is set.
    paused_all: bool = False
    # Trio time the daemon started, for the uptime.
    started: float = field(default_factory=trio.current_time)
    # "Please stop": set by SIGTERM/SIGINT or the `drain` command.
    drain: trio.Event = field(default_factory=trio.Event)
    # Supervised actors by name, and the supervisor's restart counts (shared, not copied).
    actors: list[str] = field(default_factory=list)
    restarts: Counter[str] = field(default_factory=Counter)
    # The pipeline's memory channels by name (either end: `statistics()` reads the shared state).
    channels: dict[str, Any] = field(default_factory=dict)
    # --- read by the HTTP server (sendd.http) ---
    # Messages by (outcome, account, tenant), counted by the writer as it stores them.
    outcomes_by: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # Trio time each actor last crashed (the supervisor's record), for /healthz.
    crashed_at: dict[str, float] = field(default_factory=dict)
    # This daemon's Prometheus registry and instruments (made in __post_init__).
    metrics: Metrics = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)
        self.breakers = Breakers()  # its probe_cap is the configuration's (sendd.daemon)

    @property
    def outcomes(self) -> Counter[str]:
        """Stored outcomes by status (derived from the per-account and tenant counts)."""
        by_status: Counter[str] = Counter()
        for (status, _account, _tenant), count in self.outcomes_by.items():
            by_status[status] += count
        return by_status

    def excluded_accounts(self) -> list[str]:
        """Accounts the poller must not claim for: suspended, paused, or held back by their
        breaker (the provider cannot be reached; a probe is on the wire)."""
        now = trio.current_time()
        unreachable = {a for a in self.breakers.unavailable_accounts()
                       if not self.breakers.may_claim(a, now)}
        return sorted(set(self.suspended) | self.paused_accounts | unreachable)

    def max_batch(self, account: str, tenant: str | None) -> int:
        """The largest batch for an account and tenant: provider limit, 413s and rate limits
        (`tenant` None: those of the account alone)."""
        settings = self.config.accounts[account]
        cap = self.batch_cap.get(account, settings.max_batch)
        governed = self.governor.max_batch(account, tenant, settings.single)
        return max(1, min(settings.max_batch, cap, governed))

    def wake_poller(self) -> None:
        self.wakeup.set()
        self.wakeup = trio.Event()

    @contextmanager
    def working(self, actor: str) -> Iterator[None]:
        """Mark `actor` busy on one piece of work (not waiting on a channel or a timer); an actor
        busy longer than `daemon.stall_seconds` is wedged."""
        token = (actor, object())  # several senders share a name
        self.busy_since[token] = trio.current_time()
        try:
            yield
        finally:
            del self.busy_since[token]

    def stalled(self) -> dict[str, float]:
        """Wedged actors and how long each has been busy."""
        now, limit = trio.current_time(), self.config.daemon.stall_seconds
        wedged: dict[str, float] = {}
        for (actor, _), since in self.busy_since.items():
            if now - since >= limit:
                wedged[actor] = max(wedged.get(actor, 0.0), now - since)
        return wedged

    def report_problem(self, actor: str, reason: str) -> None:
        """An actor cannot do its work right now (e.g. the database is away)."""
        self.problems[actor] = (reason, trio.current_time())

    def current_problems(self) -> dict[str, str]:
        """Problems reported recently: an actor that retries reports again on every attempt,
        so one not heard of for PROBLEM_MEMORY seconds has recovered."""
        now = trio.current_time()
        return {actor: reason for actor, (reason, at) in self.problems.items()
                if now - at < PROBLEM_MEMORY}
