"""The sender, batcher and settler run in-process under trio's MockClock against the in-memory
provider (sendd.dev.memprovider): timings are exact and no real time passes.

Express batches come marked by their claim, so a sender given one never touches the database;
the batcher and the settler never do.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from parts import account, claim_config, make_parts
from sendd.actors.batcher import run_batcher
from sendd.actors.settler import settle
from sendd.core.breaker import State
from sendd.core.ratelimit import GUARD_WINDOW
from sendd.dev.memprovider import (
    MemoryProvider,
    ambiguous,
    ok,
    throttled,
    unavailable,
)
from sendd.model import (
    FAILED,
    RELEASE,
    RETRY,
    SENT,
    UNKNOWN,
    Batch,
    BatchResult,
    Message,
    Unsettled,
)
from sendd.pipeline import Parts
from sendd.providers.base import LookupResult
from sendd.state.scheduler import Scheduler

MARKED = 1  # a submission id: the batch comes marked, as the express lane's do
LEASE = 10_000.0  # trio seconds the test lease lasts


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _messages(count: int, start: int = 1, tenant: str = "shop") -> list[Message]:
    return [Message(i, tenant, None, "main", None, f"+3069{i:08d}", "hi", 1, 0)
            for i in range(start, start + count)]


def _parts(provider: MemoryProvider, msgs_per_s: int = 0, **settings: Any) -> Parts:
    parts = make_parts(claim_config([account("main", **settings)]), providers={"main": provider},
                       lease_until=LEASE, now=trio.current_time())
    parts.accounts.governor.set_account("main", msgs_per_s, 0)
    return parts


async def _send(parts: Parts, messages: list[Message]) -> list[Any]:
    return await parts.sender().send_batch(Batch("main", "shop", messages, MARKED))


def _statuses(results: list[Any]) -> list[str]:
    return [o.status for r in results if isinstance(r, BatchResult) for o in r.outcomes]


async def test_the_rate_limit_spaces_requests_exactly(clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    parts = _parts(provider, msgs_per_s=100)
    for n in range(4):
        assert _statuses(await _send(parts, _messages(100, 1 + 100 * n))) == [SENT] * 100
    starts = [r.at for r in provider.requests]
    # 100 messages a second in batches of 100: one request per (guarded) window.
    assert starts[0] == 0.0
    assert all(later - earlier >= 1.0 for earlier, later in zip(starts, starts[1:], strict=False))
    assert starts[-1] < 3 * 1.05 + 0.1


async def test_a_batch_late_for_its_grant_takes_a_new_one(clock: trio.testing.MockClock) -> None:
    """A scheduled batch whose grant passed more than GRANT_SLACK ago (its mark or the event
    loop made it late) does not go on it: it waits for a new grant, the window being full."""
    provider = MemoryProvider()
    parts = _parts(provider, msgs_per_s=100)
    granted = parts.accounts.governor.reserve("main", "shop", 100)  # the window is full
    await trio.sleep(0.1)  # late for `granted` by 0.1 s
    batch = Batch("main", "shop", _messages(10), MARKED)
    assert _statuses(await parts.sender().send_batch(batch, 0.0, granted)) == [SENT] * 10
    assert provider.requests[0].at == pytest.approx(granted + GUARD_WINDOW)


async def test_a_late_batch_whose_next_grant_is_far_goes_back_unsent(
        clock: trio.testing.MockClock) -> None:
    """Late for its grant while a 429's Retry-After of 5 s came in: put back, not held."""
    provider = MemoryProvider()
    parts = _parts(provider, msgs_per_s=100)
    granted = trio.current_time()
    parts.accounts.governor.penalize("main", 5.0)
    await trio.sleep(0.1)
    batch = Batch("main", "shop", _messages(10), MARKED)
    assert _statuses(await parts.sender().send_batch(batch, 0.0, granted)) == [RELEASE] * 10
    assert not provider.requests and trio.current_time() == pytest.approx(0.1)


async def test_a_429_waits_out_its_retry_after_and_uses_no_attempt(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.01).script(throttled(retry_after=7))
    parts = _parts(provider, msgs_per_s=1000)
    [result] = await _send(parts, _messages(3))
    assert {(o.status, o.retry_in, o.counts_attempt) for o in result.outcomes} == {
        (RETRY, 7, False)}
    assert parts.accounts.governor.effective("main")[0] == 500  # halved
    await _send(parts, _messages(3, start=10))
    assert provider.requests[1].at - provider.requests[0].at >= 7.0


async def test_three_unreachable_answers_open_the_breaker_until_a_probe_gets_through(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider().script(*[unavailable()] * 3)
    parts = _parts(provider)
    for n in range(3):
        results = await _send(parts, _messages(5, start=1 + 5 * n))
        assert {(o.status, o.counts_attempt) for r in results for o in r.outcomes} == {
            (RETRY, False)}
    assert parts.accounts.breakers.get("main").state is State.OPEN
    assert "main" in parts.accounts.held_back()
    # Held back: put back at once, no request.
    assert _statuses(await _send(parts, _messages(5, start=20))) == [RELEASE] * 5
    assert len(provider.requests) == 3
    await trio.sleep(1.0)  # the first probe is due after 1 s
    # (A probe of a larger batch sends its first message alone under a new mark:
    # tests/test_provider_down.py, with the database.)
    assert _statuses(await _send(parts, _messages(1, start=30))) == [SENT]
    assert provider.requests[-1].at == 1.0
    assert parts.accounts.breakers.get("main").state is State.CLOSED
    assert "main" not in parts.accounts.held_back()


async def test_an_ambiguous_answer_goes_to_settlement_after_the_account_timeout(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider().script(ambiguous(accepted=True))
    parts = _parts(provider, timeout=4.0)
    [item] = await _send(parts, _messages(2))
    assert isinstance(item, Unsettled)
    assert item.not_before == trio.current_time() + 4.0
    # The settler finds both by reference (the provider took them): sent, not resent.
    result = await settle(parts.settler(), item, trio.CapacityLimiter(4))
    assert {o.status for o in result.outcomes} == {SENT}
    assert trio.current_time() >= item.not_before
    assert provider.duplicates() == {}


def test_a_too_large_batch_shrinks_the_account_s_batches() -> None:
    parts = make_parts(claim_config([account("main", max_batch=1000)]))
    assert parts.accounts.shrink_batches("main", 500) == 500
    assert parts.accounts.shrink_batches("main", 800) == 500  # never grows back
    assert parts.accounts.max_batch(parts.controls.account("main"), "shop") == 500


async def test_rejections_fail_their_messages_only(clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider().script(ok(reject={"2"}))
    parts = _parts(provider)
    results = await _send(parts, _messages(3))
    assert _statuses(results) == [SENT, FAILED, SENT]


async def test_the_settler_leaves_unknown_what_it_cannot_look_up_within_the_window(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider().script_lookups(
        *[LookupResult(None, error="HTTP 500")] * 1000)
    parts = _parts(provider)
    [message] = _messages(1)
    started = trio.current_time()
    result = await settle(parts.settler(), Unsettled(MARKED, "main", [message], started),
                          trio.CapacityLimiter(1))
    [outcome] = result.outcomes
    assert (outcome.status, outcome.error_code) == (UNKNOWN, "UNSETTLED")
    # The provider answered (a 500): the 60 s settlement window, not the outage patience.
    assert 59.0 <= trio.current_time() - started <= 61.0


async def test_the_batcher_lingers_exactly_then_flushes(clock: trio.testing.MockClock) -> None:
    parts = _parts(MemoryProvider(), max_batch=10)
    config = claim_config([account("main", max_batch=10)], linger_ms=50)
    claims_send, claims_recv = trio.open_memory_channel[Any](4)
    scheduler = Scheduler(parts.accounts, parts.controls, capacity=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_batcher, parts.accounts, parts.controls, config.pipeline,
                            scheduler, claims_recv)
        await claims_send.send(_messages(13))
        full = await scheduler.take()
        assert (len(full.batch.messages), trio.current_time()) == (10, 0.0)  # full: at once
        rest = await scheduler.take()
        assert (len(rest.batch.messages), trio.current_time()) == (3, 0.05)  # after the linger
        await claims_send.aclose()
    assert await scheduler.take() is None  # closed once the claims ended
