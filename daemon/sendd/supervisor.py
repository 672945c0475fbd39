"""The supervisor: starts every actor, restarts one that raises, escalates a crash loop.

Each incarnation of an actor gets fresh clones of its channel ends, so a crash closes only the
clones: its neighbours keep running and the restarted actor picks up where the channel is.
An actor that returns (its input ended) is done and is not restarted.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sendd.core.backoff import retry_delay
from sendd.errors import contains, describe, first_leaf

# Errors that mean the daemon itself must stop (e.g. its lease ended), not just restart one actor.
FATAL: tuple[type[BaseException], ...] = ()


class CrashLoop(Exception):
    """An actor kept crashing: the daemon exits non-zero so systemd starts a fresh one."""


def channel_clone(end: Any) -> Any:
    """A fresh clone of a memory channel end (closing the clone leaves the original open)."""
    return end.clone()


class Supervisor:
    def __init__(self, log: Any, max_restarts: int = 10, window: float = 60.0,
                 fatal: tuple[type[BaseException], ...] = FATAL) -> None:
        self.log = log
        self.max_restarts = max_restarts
        self.window = window
        self.fatal = fatal
        self.restarts: Counter[str] = Counter()
        self.crashed_at: dict[str, float] = {}  # trio time of each actor's last crash
        self._recent: deque[float] = deque()

    async def supervise(
        self,
        name: str,
        actor: Callable[..., Awaitable[None]],
        *args: Any,
        channels: tuple[Any, ...] = (),
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `actor(*args, *clones of channels)` until it returns; restart it when it raises.

        The original channel ends are closed when the actor is done for good, which is what
        tells the next actor downstream that no more is coming.
        """
        try:
            while True:
                clones = tuple(channel_clone(end) for end in channels)
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(_run_started, actor, args, clones)
                        # Ready once, when the first incarnation says it is ready.
                        task_status.started()
                        task_status = trio.TASK_STATUS_IGNORED
                    return
                except Exception as error:  # noqa: BLE001 -- the point of a supervisor
                    if contains(error, self.fatal):
                        raise
                    await self._crashed(name, error)
        finally:
            for end in channels:
                await end.aclose()

    async def _crashed(self, name: str, error: Exception) -> None:
        self.restarts[name] += 1
        now = trio.current_time()
        self.crashed_at[name] = now
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.window:
            self._recent.popleft()
        # The actor's own error, not the nursery's group around it.
        described = describe(first_leaf(error), typed=True)
        self.log.error("actor_crashed", actor=name, error=described,
                       restarts=self.restarts[name], exc_info=error)
        if len(self._recent) > self.max_restarts:
            raise CrashLoop(f"{len(self._recent)} actor restarts within {self.window:g}s "
                            f"(last: {name}: {described})") from error
        await trio.sleep(retry_delay(min(self.restarts[name], 8), base=0.1, cap=10.0))


async def _run_started(actor, args, clones, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await actor(*args, *clones, task_status=task_status)
