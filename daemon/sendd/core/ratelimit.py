"""Exact rate limits: never more than ``limit`` units in ANY half-open window ``[t, t + window)``.

Why not GCRA (or a token bucket): GCRA spaces single units evenly and lets a burst through as
long as the theoretical arrival time allows it. When one request carries ``n`` units at once (a
bulk batch of ``n`` messages), the bucket can be full at the end of one window and full again
right after, so a window straddling the two can see up to ``2 * limit - 1`` units. The provider
counts every message, so that would be a 429.

What is used instead is a sliding-window log with reservations in the future: every grant is an
entry ``(time, units)``, the entries are in non-decreasing time order, and a new grant of ``u``
units goes at the earliest time ``t >= max(now, last entry)`` at which the units already in
``(t - window, t]`` plus ``u`` fit in ``limit``. Since every entry is at or before ``t``, that sum
is the busiest window containing ``t``, so the invariant holds for every window. Grants are
FIFO (times never decrease), so no caller waits behind later ones.

Waiting bound: a grant is never placed more than one ``window`` after the previous one (by then
the previous entries have all left the window). With unit-size grants the queue drains at
``limit`` per window. With mixed sizes, FIFO packing can waste up to about half of each window
(a 1-unit grant then a ``limit``-unit grant cannot share a window), so the worst case is about
``2 * ceil(queued_units / limit)`` windows; no FIFO scheme that keeps the exact limit does better.

Time comparisons use ``entry_time + window`` consistently (never ``t - window``), so a grant
placed at ``entry_time + window`` is exactly at the edge of that entry's window in floating
point as well.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

# max_batch() when no message limit applies.
UNLIMITED_BATCH = sys.maxsize
# The governor's windows are a little longer than a second: requests reach the provider a few
# milliseconds after their grant, not always equally late, and the provider counts arrivals.
GUARD_WINDOW = 1.05


class WindowLimit:
    """At most ``limit`` units in any half-open window of ``window`` seconds; ``limit <= 0`` means
    unlimited."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.limit = limit
        self.window = window
        # Entries live in two parallel lists from index _head on (cheap pruning and bisecting);
        # _cum[i] is the running total of units up to and including entry i, and _base the
        # total of the entries already compacted away.
        self._times: list[float] = []
        self._cum: list[int] = []
        self._head = 0
        self._base = 0

    def set_limit(self, limit: int) -> None:
        """Change the limit live; the log is kept, so a lower limit waits for it to drain."""
        self.limit = limit

    def earliest(self, units: int, now: float) -> float:
        """Earliest time ``>= now`` (and ``>=`` the last grant) at which ``units`` fit."""
        if self.limit > 0 and units > self.limit:
            raise ValueError(f"{units} units can never fit in a limit of {self.limit}")
        return self._earliest(units, now)

    def reserve(self, units: int, now: float) -> float:
        """Grant ``units`` at the earliest time they fit, record the grant and return its time."""
        at = self.earliest(units, now)
        self._record(at, units)
        return at

    def entries(self) -> list[tuple[float, int]]:
        """The recorded ``(time, units)`` grants still kept (for status and tests)."""
        out, previous = [], self._cum_before(self._head)
        for at, cum in zip(self._times[self._head :], self._cum[self._head :], strict=True):
            out.append((at, cum - previous))
            previous = cum
        return out

    def _earliest(self, units: int, now: float) -> float:
        """As ``earliest`` but an oversized grant is placed alone in its window instead of
        raising (used by the governor after a limit was lowered under an in-flight batch)."""
        if units < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        if self.limit <= 0:
            return now
        self._prune(now)
        if self._head == len(self._times):
            return now
        start = max(now, self._times[-1])
        capacity = max(self.limit, units)
        # Entries from index `first` on are still inside the window ending at `start`.
        first = bisect.bisect_right(self._times, start, lo=self._head, key=self._expiry)
        total = self._cum[-1]
        if total - self._cum_before(first) + units <= capacity:
            return start
        # Entries up to the first index whose running total reaches `need` must leave the window.
        need = total + units - capacity
        gone = bisect.bisect_left(self._cum, need, lo=first)
        return self._expiry(self._times[gone])

    def _record(self, at: float, units: int) -> None:
        if self.limit <= 0:
            return  # unlimited: nothing to remember (and `at` may precede the last entry)
        total = self._cum[-1] if self._cum else self._base
        self._times.append(at)
        self._cum.append(total + units)

    def _expiry(self, at: float) -> float:
        return at + self.window

    def _cum_before(self, index: int) -> int:
        return self._cum[index - 1] if index > 0 else self._base

    def _prune(self, now: float) -> None:
        """Forget entries whose window ended at or before ``now``; compact now and then."""
        self._head = bisect.bisect_right(self._times, now, lo=self._head, key=self._expiry)
        if self._head > 64 and self._head * 2 > len(self._times):
            self._base = self._cum[self._head - 1]
            del self._times[: self._head]
            del self._cum[: self._head]
            self._head = 0


@dataclass
class _Account:
    msgs: int  # configured limits; the WindowLimits hold the effective (backed-off) ones
    reqs: int
    window: float
    msg_log: WindowLimit = field(init=False)
    req_log: WindowLimit = field(init=False)
    not_before: float = float("-inf")  # from a 429's Retry-After

    def __post_init__(self) -> None:
        self.msg_log = WindowLimit(self.msgs, self.window)
        self.req_log = WindowLimit(self.reqs, self.window)


class Governor:
    """Per-account message and request limits plus per-tenant message limits, all exact.

    One grant satisfies all three at once: the latest of the three earliest times works for
    every limit, because once a limit's earliest time has passed its window only empties.
    Tenants the governor does not know are unlimited; unknown accounts raise ``KeyError``.
    """

    def __init__(self, clock: Callable[[], float] = trio.current_time,
                 window: float = GUARD_WINDOW) -> None:
        self._clock = clock
        self._window = window
        self._accounts: dict[str, _Account] = {}
        self._tenants: dict[str, WindowLimit] = {}
        self._tenant_limits: dict[str, int] = {}  # configured
        # Daemons sharing each limit (sendd.shared.limits: Redis away): each gets 1/share.
        self._share = 1

    def set_account(self, name: str, msgs_per_s: int, reqs_per_s: int) -> None:
        """Add or reconfigure an account (0 = unlimited); a back-off in progress is kept."""
        account = self._accounts.get(name)
        if account is None:
            account = self._accounts[name] = _Account(msgs_per_s, reqs_per_s, self._window)
            account.msg_log.set_limit(self._part(msgs_per_s))
            account.req_log.set_limit(self._part(reqs_per_s))
            return
        account.msg_log.set_limit(_reconfigured(self._part(account.msgs), account.msg_log.limit,
                                                self._part(msgs_per_s)))
        account.req_log.set_limit(_reconfigured(self._part(account.reqs), account.req_log.limit,
                                                self._part(reqs_per_s)))
        account.msgs, account.reqs = msgs_per_s, reqs_per_s

    def set_tenant(self, tenant: str, msgs_per_s: int) -> None:
        """Add or change a tenant's message limit (0 = unlimited)."""
        self._tenant_limits[tenant] = msgs_per_s
        log = self._tenants.get(tenant)
        if log is None:
            self._tenants[tenant] = WindowLimit(self._part(msgs_per_s), self._window)
        else:
            log.set_limit(self._part(msgs_per_s))

    def set_share(self, daemons: int) -> None:
        """Keep every limit at 1/`daemons` of its configured value (at least 1), as each of
        that many daemons does while they cannot share a count; 1: the whole limit. A back-off
        in progress is dropped (the share is lower than any)."""
        self._share = max(1, daemons)
        for account in self._accounts.values():
            account.msg_log.set_limit(self._part(account.msgs))
            account.req_log.set_limit(self._part(account.reqs))
        for tenant, log in self._tenants.items():
            log.set_limit(self._part(self._tenant_limits.get(tenant, log.limit)))

    def configured(self, account: str, tenant: str) -> tuple[int, int, int]:
        """The configured (account messages/s, account requests/s, tenant messages/s)."""
        entry = self._accounts[account]
        return entry.msgs, entry.reqs, self._tenant_limits.get(tenant, 0)

    def follow(self, account: str, msgs_per_s: int, reqs_per_s: int) -> None:
        """Take the fleet's effective (backed-off) limits of the account, as Redis keeps them."""
        entry = self._accounts[account]
        for log, configured, shared in ((entry.msg_log, entry.msgs, msgs_per_s),
                                        (entry.req_log, entry.reqs, reqs_per_s)):
            target = shared if 0 < shared < configured else configured
            if log.limit != target:
                log.set_limit(target)

    def defer(self, account: str, seconds: float) -> None:
        """Grant nothing for the account for `seconds` (a Retry-After another daemon got)."""
        entry = self._accounts[account]
        entry.not_before = max(entry.not_before, self._clock() + seconds)

    def defer_all(self, seconds: float) -> None:
        for name in self._accounts:
            self.defer(name, seconds)

    def _part(self, configured: int) -> int:
        return share_of(configured, self._share)

    def max_batch(self, account: str, tenant: str | None, single: bool = False) -> int:
        """Largest unit count one grant can take now: the smallest message limit that applies
        (and the request limit, when every message is its own request); `tenant` None: the
        account's limits alone."""
        entry = self._accounts[account]
        limits = [entry.msg_log.limit]
        if tenant is not None:
            limits.append(self._tenant_log(tenant).limit)
        if single:
            limits.append(entry.req_log.limit)
        positive = [limit for limit in limits if limit > 0]
        return min(positive) if positive else UNLIMITED_BATCH

    def tenant_limits(self) -> dict[str, int]:
        """The tenants whose message limit is in force, and that limit."""
        return {tenant: log.limit for tenant, log in self._tenants.items() if log.limit > 0}

    def reserve(self, account: str, tenant: str, units: int, requests: int = 1) -> float:
        """Grant ``units`` messages in ``requests`` requests (one, or one per message for a
        single-message account); returns the time the requests may go out.

        A batch sized under an older, higher limit (a 429 or a live change came in between) is
        still granted, alone in its window, rather than failing in flight.
        """
        grants = self._grants(account, tenant, units, requests)
        at = self._earliest(account, grants, self._clock())
        for log, n in grants:
            log._record(at, n)
        return at

    def earliest(self, account: str, tenant: str, units: int, requests: int = 1,
                 now: float | None = None) -> float:
        """The time `reserve` would grant at `now` (default: the clock's), without reserving
        anything: `now` itself when the units may go at once."""
        grants = self._grants(account, tenant, units, requests)
        return self._earliest(account, grants, self._clock() if now is None else now)

    def _grants(self, account: str, tenant: str, units: int,
                requests: int) -> list[tuple[WindowLimit, int]]:
        entry = self._accounts[account]
        return [(entry.msg_log, units), (entry.req_log, requests),
                (self._tenant_log(tenant), units)]

    def _earliest(self, account: str, grants: list[tuple[WindowLimit, int]],
                  now: float) -> float:
        return max(now, self._accounts[account].not_before,
                   *(log._earliest(n, now) for log, n in grants))

    def backing_off(self, account: str) -> float:
        """Seconds left of a 429's Retry-After for the account (0 when none)."""
        return max(0.0, self._accounts[account].not_before - self._clock())

    def tenant_limit(self, tenant: str) -> int:
        """The tenant's message limit (0: unlimited)."""
        return self._tenant_log(tenant).limit

    async def acquire(self, account: str, tenant: str, units: int, requests: int = 1) -> float:
        """Reserve, then sleep until the grant's time; returns the seconds waited.

        If cancelled while waiting the grant stays recorded: capacity is wasted, never exceeded.
        """
        start = self._clock()
        at = self.reserve(account, tenant, units, requests)
        await trio.sleep_until(at)
        return max(0.0, at - start)

    def penalize(self, account: str, retry_after: float | None) -> None:
        """On a 429: halve the effective limits (never below 1) and honour ``Retry-After``."""
        entry = self._accounts[account]
        for log in (entry.msg_log, entry.req_log):
            if log.limit > 0:
                log.set_limit(max(1, log.limit // 2))
        if retry_after is not None and retry_after > 0:
            self.defer(account, retry_after)

    def reward(self, account: str) -> None:
        """On a success: grow the effective limits back by 10% of the configured ones."""
        entry = self._accounts[account]
        entry.msg_log.set_limit(_grown(entry.msg_log.limit, self._part(entry.msgs)))
        entry.req_log.set_limit(_grown(entry.req_log.limit, self._part(entry.reqs)))

    def effective(self, account: str) -> tuple[int, int]:
        """The account's current (messages/s, requests/s) limits; 0 means unlimited."""
        entry = self._accounts[account]
        return entry.msg_log.limit, entry.req_log.limit

    def _tenant_log(self, tenant: str) -> WindowLimit:
        log = self._tenants.get(tenant)
        return log if log is not None else _UNLIMITED


def share_of(limit: int, daemons: int) -> int:
    """One of `daemons` daemons' share of a limit that they cannot count together: at least 1
    (0: unlimited stays unlimited)."""
    if limit <= 0 or daemons <= 1:
        return limit
    return max(1, limit // daemons)


# Shared stand-in for unknown tenants: unlimited logs record nothing, so sharing is safe.
_UNLIMITED = WindowLimit(0)


def _grown(effective: int, configured: int) -> int:
    """Additive increase by 10% of the configured limit, rounded up so that ten successes
    always undo any back-off."""
    if configured <= 0:
        return configured
    return min(configured, effective + math.ceil(configured / 10))


def _reconfigured(old_configured: int, effective: int, new_configured: int) -> int:
    """New effective limit after a live change: keep a back-off, but never exceed the new limit."""
    backed_off = 0 < old_configured and 0 < effective < old_configured
    if backed_off and new_configured > 0:
        return min(effective, new_configured)
    return new_configured
