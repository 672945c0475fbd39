"""The one way actors ride out a database that went away: retry the work on a fresh pooled
connection with backoff, report the trouble (health, log), and keep a result that was committed
even when giving the connection back failed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
import trio

from sendd.core.backoff import retry_delay
from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.state.health import Health

T = TypeVar("T")
log = structlog.get_logger()
_UNSET: Any = object()
# A session that ran this long before failing was healthy: its failure starts a new outage.
SESSION_HEALTHY = 30.0


def backoff(failures: int) -> float:
    return retry_delay(min(failures, 6), base=0.2, cap=5.0)


async def retrying(pool: Any, work: Callable[[Any], Awaitable[T]], *, health: Health,
                   actor: str, trouble: str, event: str) -> T:
    """`work(conn)`'s result, retried until the database answers. `trouble` says what cannot be
    done ("cannot store results"), for health; `event` names the log line of each retry."""
    failures = 0
    while True:
        result = _UNSET
        started = trio.current_time()
        try:
            async with pool.acquire() as conn:
                result = await work(conn)
            return result
        except RETRYABLE_ERRORS as error:
            if result is not _UNSET:
                return result  # committed; only giving the connection back failed
            if trio.current_time() - started > SESSION_HEALTHY:
                failures = 0  # a new outage, not the same one going on
            failures += 1
            delay = backoff(failures)
            health.report_problem(actor, f"{trouble}: {describe(error)}")
            log.warning(event, actor=actor, error=describe(error), retry_in=round(delay, 2))
            await trio.sleep(delay)


async def keep_connected(pool: Any, health: Health, actor: str,
                         session: Callable[[Any], Awaitable[None]]) -> None:
    """Run `session(conn)` on a pooled connection until it returns. When the database goes
    away (a restart, dropped connections) start it again on a fresh connection after a
    backoff, so an outage delays the actor instead of crashing it."""
    await retrying(pool, session, health=health, actor=actor,
                   trouble="database unavailable", event="database_unavailable")
