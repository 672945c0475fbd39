"""The in-memory provider (sendd.dev.memprovider) that in-process actor tests send to: its
scripted answers, its record of requests and acceptances, and its latency in trio time."""

from __future__ import annotations

import trio
import trio.testing

from sendd.dev.memprovider import (
    MemoryProvider,
    ambiguous,
    failed,
    ok,
    respond,
    suspend,
    throttled,
    too_large,
    unavailable,
)
from sendd.model import Message
from sendd.providers import base
from sendd.providers.base import LookupResult, Provider, SendResponse


def messages(*ids: int) -> list[Message]:
    return [Message(id=i, tenant_id="acme", campaign_id=1, account="main", sender=None,
                    recipient=f"+30690000{i:04d}", body="hi", segments=1, attempts=0)
            for i in ids]


def test_it_is_a_provider() -> None:
    provider: Provider = MemoryProvider()  # the type checker's view; and at run time:
    for name in ("send", "send_each", "lookup", "aclose"):
        assert callable(getattr(provider, name))


async def test_by_default_every_message_is_accepted_with_its_own_id() -> None:
    provider = MemoryProvider()
    response = await provider.send(messages(1, 2, 3))
    assert response.kind == base.OK and response.bulk_id
    assert [(r.reference, r.accepted) for r in response.results] == [
        ("1", True), ("2", True), ("3", True)]
    ids = [r.message_id for r in response.results]
    assert len(set(ids)) == 3 and all(ids)
    assert provider.accepted == {"1": ids[0], "2": ids[1], "3": ids[2]}
    assert [(r.references, r.single) for r in provider.requests] == [(["1", "2", "3"], False)]
    assert provider.requests[0].response is response


async def test_scripted_answers_are_used_in_order_then_the_default() -> None:
    provider = MemoryProvider().script(
        throttled(retry_after=2.5), unavailable(), ambiguous(), failed(), suspend(), too_large())
    kinds = []
    for _ in range(7):
        response = await provider.send(messages(1))
        kinds.append(response.kind)
        if response.kind == base.THROTTLED:
            assert response.retry_after == 2.5
        if response.kind != base.OK:
            assert response.error and not response.results
    assert kinds == [base.THROTTLED, base.UNAVAILABLE, base.AMBIGUOUS, base.FAILED,
                     base.SUSPEND, base.TOO_LARGE, base.OK]
    assert provider.scripted == 0
    # Only the last request was accepted; the others sent nothing.
    assert dict(provider.sends) == {"1": 1}


async def test_ok_answers_per_message() -> None:
    provider = MemoryProvider().script(
        ok(reject={"2": "BLOCKED"}, unlisted={"3"}, without_ids={"4"}, bulk_id="B1"),
        ok(reject={"1"}))
    response = await provider.send(messages(1, 2, 3, 4))
    assert response.bulk_id == "B1"
    by_ref = {r.reference: r for r in response.results}
    assert set(by_ref) == {"1", "2", "4"}  # 3 was accepted but left out of the answer
    assert by_ref["1"].accepted and by_ref["1"].message_id
    assert not by_ref["2"].accepted and by_ref["2"].error_code == "BLOCKED"
    assert by_ref["4"].accepted and by_ref["4"].message_id is None
    assert set(provider.accepted) == {"1", "3", "4"}
    second = await provider.send(messages(1))
    assert second.results[0].error_code == "INVALID_NUMBER"


async def test_duplicates_are_counted() -> None:
    provider = MemoryProvider()
    first = await provider.send(messages(1, 2))
    await provider.send(messages(2))
    assert provider.duplicates() == {"2": 2}
    # The first acceptance's id is what a lookup finds.
    found = await provider.lookup("2")
    assert found == LookupResult(True, message_id=first.results[1].message_id, status="Sent")


async def test_lookups_find_what_was_accepted_even_when_the_answer_was_lost() -> None:
    provider = MemoryProvider().script(ambiguous(accepted=True), ambiguous())
    assert (await provider.send(messages(1))).kind == base.AMBIGUOUS
    assert (await provider.send(messages(2))).kind == base.AMBIGUOUS
    assert (await provider.lookup("1")).found is True
    assert (await provider.lookup("2")).found is False
    assert provider.lookups == ["1", "2"]


async def test_scripted_lookups_come_first() -> None:
    provider = MemoryProvider()
    await provider.send(messages(1))
    provider.script_lookups(LookupResult(None, error="lookup failed: HTTP 500"),
                            LookupResult(None, error="down", reachable=False))
    assert (await provider.lookup("1")).error == "lookup failed: HTTP 500"
    assert (await provider.lookup("1")).reachable is False
    assert (await provider.lookup("1")).found is True


async def test_send_each_is_one_request_per_message_each_with_its_answer() -> None:
    provider = MemoryProvider().script(ok(), throttled(1), ok(reject={"3"}))
    responses = await provider.send_each(messages(1, 2, 3))
    assert [r.kind for r in responses] == [base.OK, base.THROTTLED, base.OK]
    assert responses[2].results[0].accepted is False
    assert [(r.references, r.single) for r in provider.requests] == [
        (["1"], True), (["2"], True), (["3"], True)]
    assert set(provider.accepted) == {"1"}


async def test_over_max_batch_is_too_large_and_keeps_the_script() -> None:
    provider = MemoryProvider(max_batch=2).script(throttled())
    assert (await provider.send(messages(1, 2, 3))).kind == base.TOO_LARGE
    assert (await provider.send(messages(1, 2))).kind == base.THROTTLED
    assert not provider.accepted


async def test_respond_gives_a_fresh_copy_each_time() -> None:
    result = base.MessageResult("1", True, "X")
    provider = MemoryProvider(default=respond(SendResponse(base.OK, results=[result])))
    first = await provider.send(messages(1))
    first.results.clear()
    assert (await provider.send(messages(1))).results == [result]


async def test_latency_is_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.5).script(ok(delay=2.0))
    start = trio.current_time()
    await provider.send(messages(1))
    assert trio.current_time() - start == 2.5
    start = trio.current_time()
    await provider.send_each(messages(1, 2, 3, 4))  # concurrently: one latency, not four
    assert trio.current_time() - start == 0.5
    assert [r.at for r in provider.requests[1:]] == [start] * 4  # recorded on arrival


async def test_requests_are_recorded_on_arrival_and_can_be_waited_for(
        autojump_clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.send, messages(1))
        nursery.start_soon(provider.send, messages(2))
        requests = await provider.wait_requests(2)
        assert trio.current_time() < 10.0  # before either answer
        assert [r.response for r in requests] == [None, None]
        assert set(provider.accepted) == {"1", "2"}
    assert all(r.response is not None for r in provider.requests)


async def test_aclose() -> None:
    provider = MemoryProvider()
    await provider.aclose()
    assert provider.closed
