"""Group items into per-key batches that flush when full or after a linger.

The linger trades a little latency for fewer, fuller provider requests: a lone message waits at
most ``linger`` seconds for company. ``max_size`` is a callable, read on every call, so a live
change of an account's ``max_batch`` (or of its rate limit) takes effect without a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class _Pending(Generic[T]):
    items: list[T] = field(default_factory=list)
    added: list[float] = field(default_factory=list)  # add time per item, for exact deadlines


class BatchBuilder(Generic[K, T]):
    """Pending batches per key; nothing here awaits or reads a clock (callers pass ``now``)."""

    def __init__(self, max_size: Callable[[K], int], linger: float) -> None:
        self._max_size = max_size
        self._linger = linger
        self._pending: dict[K, _Pending[T]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: K, item: T, now: float) -> list[tuple[K, list[T]]]:
        """Queue an item; returns the batches of ``key`` that are now full."""
        return self.add_many(key, [item], now)

    def add_many(self, key: K, items: list[T], now: float) -> list[tuple[K, list[T]]]:
        """Queue items that arrived together; the same batches as adding them one by one, with
        the per-key work done once per call instead of once per item."""
        if not items:
            return []
        pending = self._pending.setdefault(key, _Pending())
        pending.items += items
        pending.added += [now] * len(items)
        self._count += len(items)
        return self._take_full(key)

    def due(self, now: float) -> list[tuple[K, list[T]]]:
        """Remove and return every batch whose first item has lingered long enough, plus full
        batches left behind by a lowered ``max_size``."""
        out: list[tuple[K, list[T]]] = []
        for key in list(self._pending):
            out += self._take_full(key)
            pending = self._pending.get(key)
            if pending is not None and pending.added[0] + self._linger <= now:
                out += self._take_all(key)
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which ``due`` will return something, if anything is pending.

        A batch left full by a lowered ``max_size`` is due since its last needed item came in.
        """
        deadlines = [self._deadline(key, pending) for key, pending in self._pending.items()]
        return min(deadlines) if deadlines else None

    def drain(self) -> list[tuple[K, list[T]]]:
        """Remove and return everything pending (on shutdown), split to ``max_size``."""
        out: list[tuple[K, list[T]]] = []
        for key in list(self._pending):
            out += self._take_all(key)
        return out

    def _deadline(self, key: K, pending: _Pending[T]) -> float:
        lingered = pending.added[0] + self._linger
        size = self._size(key)
        return min(lingered, pending.added[size - 1]) if len(pending.items) >= size else lingered

    def _size(self, key: K) -> int:
        return max(1, self._max_size(key))  # a batch always holds at least one item

    def _take_full(self, key: K) -> list[tuple[K, list[T]]]:
        """Cut full batches off the front of ``key``'s pending items."""
        pending, size = self._pending[key], self._size(key)
        out: list[tuple[K, list[T]]] = []
        while len(pending.items) >= size:
            out.append((key, self._cut(key, pending, size)))
        return out

    def _take_all(self, key: K) -> list[tuple[K, list[T]]]:
        pending, size = self._pending[key], self._size(key)
        out: list[tuple[K, list[T]]] = []
        while key in self._pending:
            out.append((key, self._cut(key, pending, size)))
        return out

    def _cut(self, key: K, pending: _Pending[T], size: int) -> list[T]:
        """Remove up to ``size`` items from the front; forget the key once it is empty."""
        batch = pending.items[:size]
        del pending.items[:size], pending.added[:size]
        self._count -= len(batch)
        if not pending.items:
            del self._pending[key]
        return batch
