"""How the daemon is doing, for status, /healthz, metrics and the systemd watchdog: actors busy
too long, problems they reported, crashes, the channels' fill, and what has been stored.

Each record has one writer: actors report their own work and problems, the supervisor its
crashes and restarts, the writer the outcomes it stored, the gauges the backlog.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from sendd.state.unserved import UnservedWatch

# Longer than the longest retry backoff (5 s), so a problem stays visible between attempts.
PROBLEM_MEMORY = 12.0


@dataclass
class Health:
    # An actor busy on one piece of work longer than this is wedged (daemon.stall_seconds).
    stall_seconds: float
    started: float = field(default_factory=trio.current_time)
    # Supervised actors by name, and the supervisor's records (shared, not copied).
    actors: list[str] = field(default_factory=list)
    restarts: Counter[str] = field(default_factory=Counter)
    crashed_at: dict[str, float] = field(default_factory=dict)
    # The pipeline's memory channels by name (either end: `statistics()` reads the shared state).
    channels: dict[str, Any] = field(default_factory=dict)
    # Where the campaign batches wait (sendd.state.scheduler), while a pipeline runs.
    scheduler: Any = None
    # Messages by (outcome, account, tenant), counted by the writer as it stores them.
    outcomes_by: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    # Messages queued in the database, refreshed every few seconds (actors.gauges), or None.
    backlog: int | None = None
    # Messages whose account no daemon serves (sendd.state.unserved), kept by the lead poller.
    unserved: UnservedWatch = field(default_factory=UnservedWatch)
    _busy_since: dict[tuple[str, object], float] = field(default_factory=dict)
    _problems: dict[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def outcomes(self) -> Counter[str]:
        """Stored outcomes by status (derived from the per-account and tenant counts)."""
        by_status: Counter[str] = Counter()
        for (status, _account, _tenant), count in self.outcomes_by.items():
            by_status[status] += count
        return by_status

    def waiting(self) -> list[dict[str, Any]]:
        """Per account and tenant with campaign messages waiting to be sent: how many, and what
        the next of them waits for (rate, backoff, breaker, pause, concurrency, sender)."""
        if self.scheduler is None:
            return []
        # "*": the tenants without a rate limit, whose messages share batches.
        return [{"account": account, "tenant": tenant or "*", "for": why, "messages": count}
                for (account, tenant), (why, count) in sorted(self.scheduler.waiting_for().items())]

    @contextmanager
    def working(self, actor: str) -> Iterator[None]:
        """Mark `actor` busy on one piece of work (not waiting on a channel or a timer)."""
        token = (actor, object())  # several senders share a name
        self._busy_since[token] = trio.current_time()
        try:
            yield
        finally:
            del self._busy_since[token]

    def stalled(self) -> dict[str, float]:
        """Wedged actors and how long each has been busy."""
        now = trio.current_time()
        wedged: dict[str, float] = {}
        for (actor, _), since in self._busy_since.items():
            if now - since >= self.stall_seconds:
                wedged[actor] = max(wedged.get(actor, 0.0), now - since)
        return wedged

    def report_problem(self, actor: str, reason: str) -> None:
        """An actor cannot do its work right now (e.g. the database is away)."""
        self._problems[actor] = (reason, trio.current_time())

    def problem_solved(self, actor: str) -> None:
        """The actor's problem is over (no need to wait for it to age out)."""
        self._problems.pop(actor, None)

    def current_problems(self) -> dict[str, str]:
        """Problems reported recently: an actor that retries reports again on every attempt,
        so one not heard of for PROBLEM_MEMORY seconds has recovered."""
        now = trio.current_time()
        return {actor: reason for actor, (reason, at) in self._problems.items()
                if now - at < PROBLEM_MEMORY}
