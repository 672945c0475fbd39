"""Circuit breakers, one per account: a provider that is down holds its messages back.

A refused connection, a 5xx or a timeout before the body went out says that the *provider* is
unavailable, not that the message is bad, so it must not use up messages' attempts; and a
request that timed out after the body went out (ambiguous) must not be followed by more
thousand-message batches that would time out too and all need settling. So:

- **closed**: send as usual.
- **open** (after OPEN_AFTER unavailable answers in a row): claim nothing for the account and
  put back what reaches a sender, until the backoff ends (1 s, doubling, capped at `probe_cap`).
- **half-open** (the backoff ended, or right after an ambiguous answer): the next batch is a
  *probe*: its first message alone is sent, the rest put back.
- **probing** (the probe is on the wire): everything else is put back, nothing claimed.

Any answer from the provider (accepted, rejected, 400, 429, 401...) closes the breaker; a probe
that fails opens it again with the next backoff. A request that was already on the wire when the
breaker changed state neither closes it nor lengthens the backoff: only a request admitted in the
current state (its ticket's epoch) tells about the provider now.

Pure bookkeeping: times are passed in, nothing here awaits.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PROBE_BASE = 1.0  # seconds of the first backoff
# Unavailable answers in a row (none answered in between) that open a closed breaker: one 503
# among many answers is a hiccup, retried on its own; an outage fails every request in flight
# within milliseconds.
OPEN_AFTER = 3


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    PROBING = "probing"


class Admission(StrEnum):
    SEND = "send"  # the whole batch
    PROBE = "probe"  # its first message alone; put the rest back
    HOLD = "hold"  # put it all back


@dataclass(frozen=True, slots=True)
class Ticket:
    """A sender's admission, kept until the answer: which state it was admitted in."""

    admission: Admission
    epoch: int

    @property
    def probe(self) -> bool:
        return self.admission is Admission.PROBE


@dataclass
class AccountBreaker:
    state: State = State.CLOSED
    epoch: int = 0  # bumped on every change of state
    retry_at: float = 0.0  # OPEN: when the next probe may go; PROBING: when to give it up
    failures: int = 0  # failed probes in a row (backoff exponent)
    in_a_row: int = 0  # CLOSED: unavailable answers since the last answer
    failing_since: float | None = None  # first failure since the last answer
    reason: str = ""  # the last failure, for status, health and logs
    campaigns_paused_at: float | None = None  # when its waiting campaigns were last paused


class Breakers:
    """The breakers of every account; `probe_cap` bounds the backoff between probes."""

    def __init__(self, probe_cap: float = 60.0) -> None:
        self.probe_cap = probe_cap
        self._accounts: dict[str, AccountBreaker] = {}

    def get(self, account: str) -> AccountBreaker:
        return self._accounts.setdefault(account, AccountBreaker())

    def may_claim(self, account: str, now: float) -> bool:
        """Claim for the account? Yes while closed, and once a probe is due (it needs a
        message); no while open or while a probe is on the wire."""
        breaker = self.get(account)
        if breaker.state in (State.OPEN, State.PROBING):
            return now >= breaker.retry_at
        return True

    def admit(self, account: str, now: float, probe_timeout: float) -> Ticket:
        """What a sender may do with a batch for the account right now. A probe that has not
        reported back within `probe_timeout` (its sender crashed, say) lets another go."""
        breaker = self.get(account)
        if breaker.state is State.CLOSED:
            return Ticket(Admission.SEND, breaker.epoch)
        if breaker.state in (State.OPEN, State.PROBING) and now < breaker.retry_at:
            return Ticket(Admission.HOLD, breaker.epoch)
        breaker.retry_at = now + probe_timeout
        self._change(breaker, State.PROBING)
        return Ticket(Admission.PROBE, breaker.epoch)

    def abandoned(self, account: str, ticket: Ticket) -> None:
        """The probe never went out (its claim was undone, its campaign stopped): the next
        batch probes instead."""
        breaker = self.get(account)
        if ticket.probe and ticket.epoch == breaker.epoch:
            self._change(breaker, State.HALF_OPEN)

    def answered(self, account: str, ticket: Ticket) -> bool:
        """The provider answered the request; True if that closed the breaker (the account
        recovered)."""
        breaker = self.get(account)
        if breaker.state is State.CLOSED:
            breaker.in_a_row = 0
            return False
        if ticket.epoch != breaker.epoch:
            return False
        self._change(breaker, State.CLOSED)
        breaker.failures, breaker.failing_since, breaker.reason = 0, None, ""
        breaker.campaigns_paused_at = None
        return True

    def unavailable(self, account: str, ticket: Ticket, reason: str, now: float) -> bool:
        """The provider could not be reached (refused, 5xx, timeout before the body went
        out); True if that opened the breaker or lengthened its backoff."""
        return self._failed(account, ticket, reason, now, wait=True)

    def ambiguous(self, account: str, ticket: Ticket, reason: str, now: float) -> bool:
        """A request timed out after the body went out: probe before sending more (a probe
        that times out backs off like an unavailable one)."""
        return self._failed(account, ticket, reason, now, wait=ticket.probe)

    def due_for_pause(self, now: float, after: float) -> list[str]:
        """Accounts unreachable for `after` seconds whose waiting campaigns should be paused
        (again `after` seconds later if an operator resumed them and it is still down); each
        is returned once per such period."""
        due = []
        for name, breaker in self.unavailable_accounts().items():
            last = breaker.campaigns_paused_at
            since = breaker.failing_since if last is None else last
            if since is not None and now - since >= after:
                breaker.campaigns_paused_at = now
                due.append(name)
        return due

    def describe(self, account: str, now: float) -> dict[str, object]:
        """The breaker as status shows it."""
        breaker = self.get(account)
        if breaker.state is State.CLOSED:
            return {"state": breaker.state.value}
        down = None if breaker.failing_since is None else round(now - breaker.failing_since, 1)
        return {"state": breaker.state.value, "reason": breaker.reason, "failing_for_s": down,
                "failed_probes": max(0, breaker.failures - 1),
                "next_probe_in_s": round(max(0.0, breaker.retry_at - now), 1)}

    def problems(self, now: float) -> list[str]:
        """One line per account held back, for health reasons."""
        lines = []
        for name, breaker in sorted(self.unavailable_accounts().items()):
            down = 0.0 if breaker.failing_since is None else now - breaker.failing_since
            lines.append(f"account {name}: provider unreachable for {down:.0f}s, held back "
                         f"({breaker.state.value}): {breaker.reason}")
        return lines

    def unavailable_accounts(self) -> dict[str, AccountBreaker]:
        """Accounts whose breaker is not closed."""
        return {name: b for name, b in self._accounts.items() if b.state is not State.CLOSED}

    def _failed(self, account: str, ticket: Ticket, reason: str, now: float,
                wait: bool) -> bool:
        breaker = self.get(account)
        if ticket.epoch != breaker.epoch:
            return False  # sent before the last change: it says nothing new
        if breaker.state is State.CLOSED and wait:
            breaker.in_a_row += 1
            if breaker.in_a_row < OPEN_AFTER:
                return False
        if breaker.failing_since is None:
            breaker.failing_since = now
        breaker.reason = reason
        if not wait:
            self._change(breaker, State.HALF_OPEN)
            return True
        breaker.failures += 1
        breaker.retry_at = now + min(self.probe_cap, PROBE_BASE * 2.0 ** (breaker.failures - 1))
        self._change(breaker, State.OPEN)
        return True

    @staticmethod
    def _change(breaker: AccountBreaker, state: State) -> None:
        breaker.state = state
        breaker.epoch += 1
        breaker.in_a_row = 0
