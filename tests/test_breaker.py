"""The accounts' circuit breakers (sendd.core.breaker): pure bookkeeping, so exact."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sendd.core.breaker import OPEN_AFTER, Admission, Breakers, State

TIMEOUT = 10.0


def fail_in_a_row(breakers: Breakers, now: float) -> bool:
    """OPEN_AFTER requests admitted together, all unavailable; True if that opened it."""
    tickets = [breakers.admit("a", now, TIMEOUT) for _ in range(OPEN_AFTER)]
    return [breakers.unavailable("a", t, "connection refused", now) for t in tickets][-1]


def test_one_unavailable_answer_among_answers_does_not_open_it() -> None:
    breakers = Breakers()
    for _ in range(5):
        tickets = [breakers.admit("a", 0.0, TIMEOUT) for _ in range(OPEN_AFTER)]
        for ticket in tickets[:-1]:
            assert not breakers.unavailable("a", ticket, "503", 0.0)
        breakers.answered("a", tickets[-1])
    assert breakers.get("a").state is State.CLOSED
    assert fail_in_a_row(breakers, 0.0)
    assert breakers.get("a").state is State.OPEN


def test_an_unreachable_provider_holds_the_account_back_and_probes_with_backoff() -> None:
    breakers = Breakers(probe_cap=8.0)
    assert breakers.admit("a", 0.0, TIMEOUT).admission is Admission.SEND
    assert fail_in_a_row(breakers, 0.5)
    assert breakers.get("a").state is State.OPEN
    assert not breakers.may_claim("a", 1.0)
    assert breakers.admit("a", 1.0, TIMEOUT).admission is Admission.HOLD
    waits = []
    now = 0.5
    for _ in range(6):  # probes fail: 1, 2, 4, 8, 8, 8 s apart (capped)
        retry_at = breakers.get("a").retry_at
        waits.append(retry_at - now)
        now = retry_at
        assert breakers.may_claim("a", now)
        probe = breakers.admit("a", now, TIMEOUT)
        assert probe.admission is Admission.PROBE
        assert not breakers.may_claim("a", now)  # the probe is on the wire
        assert breakers.admit("a", now, TIMEOUT).admission is Admission.HOLD
        assert breakers.unavailable("a", probe, "connection refused", now)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    probe = breakers.admit("a", breakers.get("a").retry_at, TIMEOUT)
    assert breakers.answered("a", probe)
    assert breakers.get("a").state is State.CLOSED
    assert breakers.get("a").failing_since is None
    assert breakers.admit("a", now, TIMEOUT).admission is Admission.SEND


def test_requests_on_the_wire_when_it_opened_neither_close_nor_lengthen_it() -> None:
    breakers = Breakers()
    second = breakers.admit("a", 0.0, TIMEOUT)
    assert fail_in_a_row(breakers, 1.0)
    assert not breakers.unavailable("a", second, "503", 1.0)  # the same news: no escalation
    assert breakers.get("a").failures == 1
    assert not breakers.answered("a", second)  # an old answer does not vouch for now
    assert breakers.get("a").state is State.OPEN


def test_an_ambiguous_answer_makes_the_next_batch_a_probe() -> None:
    breakers = Breakers()
    ticket = breakers.admit("a", 0.0, TIMEOUT)
    assert breakers.ambiguous("a", ticket, "no answer within 3 s", 3.0)
    assert breakers.get("a").state is State.HALF_OPEN
    assert breakers.may_claim("a", 3.0)
    probe = breakers.admit("a", 3.0, TIMEOUT)
    assert probe.admission is Admission.PROBE
    assert breakers.admit("a", 3.0, TIMEOUT).admission is Admission.HOLD
    assert breakers.ambiguous("a", probe, "no answer within 3 s", 6.0)  # still slow: back off
    assert breakers.get("a").state is State.OPEN
    assert breakers.get("a").retry_at == 7.0


def test_a_probe_that_never_reports_back_lets_another_go() -> None:
    breakers = Breakers()
    breakers.ambiguous("a", breakers.admit("a", 0.0, TIMEOUT), "slow", 0.0)
    lost = breakers.admit("a", 1.0, TIMEOUT)
    assert lost.admission is Admission.PROBE
    assert breakers.admit("a", 1.0 + TIMEOUT - 0.1, TIMEOUT).admission is Admission.HOLD
    assert breakers.admit("a", 1.0 + TIMEOUT, TIMEOUT).admission is Admission.PROBE


def test_an_abandoned_probe_hands_over_at_once() -> None:
    breakers = Breakers()
    breakers.ambiguous("a", breakers.admit("a", 0.0, TIMEOUT), "slow", 0.0)
    probe = breakers.admit("a", 1.0, TIMEOUT)
    breakers.abandoned("a", probe)
    assert breakers.admit("a", 1.0, TIMEOUT).admission is Admission.PROBE


def test_campaigns_are_paused_once_per_period_of_unreachability() -> None:
    breakers = Breakers()
    fail_in_a_row(breakers, 100.0)
    assert breakers.due_for_pause(100.0 + 3599, 3600) == []
    assert breakers.due_for_pause(100.0 + 3600, 3600) == ["a"]
    assert breakers.due_for_pause(100.0 + 3700, 3600) == []
    assert breakers.due_for_pause(100.0 + 7200, 3600) == ["a"]
    breakers.answered("a", breakers.admit("a", 8000.0, TIMEOUT))
    assert breakers.due_for_pause(20_000.0, 3600) == []


events = st.lists(st.tuples(st.sampled_from(["admit", "ok", "down", "slow", "drop"]),
                            st.floats(0, 5)), max_size=60)


@given(events)
def test_at_most_one_probe_is_on_the_wire_and_only_closed_sends_whole_batches(steps) -> None:
    breakers, now, tickets = Breakers(probe_cap=4.0), 0.0, []
    for action, elapsed in steps:
        now += elapsed
        if action == "admit":
            ticket = breakers.admit("a", now, TIMEOUT)
            state = breakers.get("a").state
            if ticket.admission is Admission.SEND:
                assert state is State.CLOSED
            if ticket.admission is not Admission.HOLD:
                tickets.append(ticket)
            live_probes = [t for t in tickets if t.probe and t.epoch == breakers.get("a").epoch]
            assert len(live_probes) <= 1
        elif tickets:
            ticket = tickets.pop(0)
            if action == "ok":
                breakers.answered("a", ticket)
            elif action == "down":
                breakers.unavailable("a", ticket, "refused", now)
            elif action == "slow":
                breakers.ambiguous("a", ticket, "slow", now)
            else:
                breakers.abandoned("a", ticket)
        breaker = breakers.get("a")
        assert (breaker.state is State.CLOSED) == (breaker.failing_since is None) or (
            breaker.state is State.PROBING and breaker.failing_since is None)
        if breaker.state is State.OPEN:
            assert breaker.retry_at - now <= 4.0
