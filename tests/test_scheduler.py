"""The scheduler and its senders in-process under trio's MockClock, against in-memory providers:
a limited, slow, paused or busy tenant or account never holds back another (issue 15).

The batches come marked (as the express lane's do), so the senders never touch a database.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from parts import account, claim_config, make_parts
from sendd.actors.sender import run_scheduled_sender
from sendd.dev.memprovider import MemoryProvider
from sendd.model import RELEASE, SENT, Batch, BatchResult, Message
from sendd.pipeline import Parts
from sendd.state.scheduler import CONCURRENCY, RATE, Scheduler

MARKED = 1
LEASE = 10_000.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Rig:
    """A scheduler, `senders` senders and the results they hand on, by tenant and time."""

    def __init__(self, parts: Parts, senders: int) -> None:
        self.parts = parts
        self.scheduler = Scheduler(parts.accounts, parts.controls, capacity=1000)
        self.senders = senders
        self.done: list[tuple[float, str, str]] = []  # (time, tenant, status) per message
        self._ids = 0

    def batch(self, account: str, tenant: str, size: int, campaign: int | None = None) -> Batch:
        messages = []
        for _ in range(size):
            self._ids += 1
            messages.append(Message(self._ids, tenant, campaign, account, None,
                                    f"+3069{self._ids:08d}", "hi", 1, 0))
        self.scheduler.claimed(messages)
        return Batch(account, tenant, messages, MARKED)

    async def run(self, nursery: trio.Nursery) -> None:
        results_send, results_recv = trio.open_memory_channel[Any](1000)
        unsettled_send, _unsettled_recv = trio.open_memory_channel[Any](1000)
        sender = self.parts.sender()
        for _ in range(self.senders):
            nursery.start_soon(run_scheduled_sender, sender, self.scheduler,
                               results_send.clone(), unsettled_send.clone())
        await results_send.aclose()
        nursery.start_soon(self._collect, results_recv)

    async def _collect(self, results: trio.MemoryReceiveChannel[Any]) -> None:
        async for result in results:
            assert isinstance(result, BatchResult)
            for outcome in result.outcomes:
                self.done.append((trio.current_time(), outcome.message.tenant_id, outcome.status))

    def finished(self, tenant: str, status: str = SENT) -> list[float]:
        return [at for at, t, s in self.done if t == tenant and s == status]


def _parts(providers: dict[str, MemoryProvider], senders: int = 8, **accounts: Any) -> Parts:
    config = claim_config([account(name, **accounts.get(name, {})) for name in providers],
                          senders=senders)
    return make_parts(config, providers=providers, lease_until=LEASE, now=trio.current_time())


async def test_a_rate_limited_tenant_does_not_hold_back_an_unlimited_one(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    parts = _parts({"main": provider})
    parts.accounts.governor.set_tenant("slow", 50)
    rig = Rig(parts, senders=8)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        for _ in range(20):  # 20 s of the slow tenant's rate, queued first
            await rig.scheduler.put(rig.batch("main", "slow", 50))
        for _ in range(50):
            await rig.scheduler.put(rig.batch("main", "fast", 1000))
        rig.scheduler.close()
    fast = rig.finished("fast")
    assert len(fast) == 50_000
    # Every fast batch went while the slow tenant waited for its rate: 50 batches over 8
    # senders at 20 ms each, about 0.14 s (before the scheduler: one 50-message batch a second
    # in front of them, so 20 s).
    assert max(fast) < 0.2
    slow = sorted(rig.finished("slow"))
    assert len(slow) == 1000
    assert slow[-1] >= 19 * 1.05  # its limit held: 50 a (guarded) second


async def test_a_slow_account_holds_only_its_share_of_the_senders(
        clock: trio.testing.MockClock) -> None:
    slow, fast = MemoryProvider(latency=10.0), MemoryProvider(latency=0.02)
    parts = _parts({"slow": slow, "fast": fast}, senders=8)
    rig = Rig(parts, senders=8)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        for _ in range(20):
            await rig.scheduler.put(rig.batch("slow", "a", 100))
        await trio.sleep(0.001)  # the slow account's requests are on the wire
        assert rig.scheduler.in_flight["slow"] == 4  # half of the 8 senders, not all
        assert rig.scheduler.waiting_for()[("slow", "a")] == (CONCURRENCY, 1600)
        for _ in range(40):
            await rig.scheduler.put(rig.batch("fast", "b", 100))
        rig.scheduler.close()
    fast_done = rig.finished("b")
    assert len(fast_done) == 4000
    assert max(fast_done) < 0.5  # 40 requests of 20 ms on the 4 free senders
    assert max(r.at for r in slow.requests) >= 40.0  # 20 requests, 4 at a time, 10 s each


async def test_unlimited_tenants_take_equal_turns(clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    rig = Rig(_parts({"main": provider}), senders=1)
    for tenant, batches in (("a", 30), ("b", 10), ("c", 10)):
        for _ in range(batches):
            await rig.scheduler.put(rig.batch("main", tenant, 10))
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        rig.scheduler.close()
    order = [t for _, t, _ in rig.done][::10]  # one entry per batch, in send order
    # While all three have backlog, each has had its turn within every three batches.
    for start in range(0, 30, 3):
        assert sorted(order[start:start + 3]) == ["a", "b", "c"]
    assert order[30:] == ["a"] * 20


async def test_a_weighted_tenant_gets_its_weight(clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    rig = Rig(_parts({"main": provider}), senders=1)
    rig.parts.controls.tenant_weights.update({"heavy": 3.0})
    for tenant in ("heavy", "light"):
        for _ in range(40):
            await rig.scheduler.put(rig.batch("main", tenant, 10))
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        rig.scheduler.close()
    first = Counter(t for _, t, _ in rig.done[:400])
    assert first == {"heavy": 300, "light": 100}


async def test_a_tenant_coming_back_gets_no_credit_for_its_idle_time(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    rig = Rig(_parts({"main": provider}), senders=1)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        for _ in range(100):
            await rig.scheduler.put(rig.batch("main", "busy", 10))
        await trio.sleep(0.5)  # "busy" has sent about 25 batches alone
        for _ in range(10):
            await rig.scheduler.put(rig.batch("main", "back", 10))
        rig.scheduler.close()
    after = [t for at, t, _ in rig.done if at > 0.5][::10]  # one entry per batch
    # The two alternate: "back" does not get its ten batches in a row for the time it was away.
    assert after[:21].count("back") == 10  # (the first was on the wire already)
    assert "back" not in after[21:]
    assert "back,back,back" not in ",".join(after)


async def test_a_paused_tenant_s_waiting_batches_are_released_not_sent(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    parts = _parts({"main": provider})
    parts.accounts.governor.set_tenant("slow", 10)
    rig = Rig(parts, senders=2)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        for _ in range(5):
            await rig.scheduler.put(rig.batch("main", "slow", 10))
        await trio.sleep(0.5)
        assert rig.scheduler.waiting_for()[("main", "slow")] == (RATE, 40)
        parts.health.scheduler = rig.scheduler  # what status, watch and /metrics read
        assert parts.health.waiting() == [
            {"account": "main", "tenant": "slow", "for": RATE, "messages": 40}]
        exposed = {(s.labels["tenant"], s.labels["reason"]): s.value
                   for family in parts.metrics.registry.collect() for s in family.samples
                   if s.name == "sendd_waiting_messages"}
        assert exposed == {("slow", RATE): 40}
        parts.controls.paused_tenants.add("slow")
        rig.scheduler.wake()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.scheduler.waiting_for() == {}
        rig.scheduler.close()
    assert len(rig.finished("slow", SENT)) == 10  # the first batch, before the pause
    assert len(rig.finished("slow", RELEASE)) == 40
    assert max(rig.finished("slow", RELEASE)) == 0.5  # at once, not at their rate time


async def test_a_stopped_campaign_s_batches_are_released_at_once(
        clock: trio.testing.MockClock) -> None:
    provider = MemoryProvider(latency=0.02)
    parts = _parts({"main": provider})
    parts.accounts.governor.set_tenant("t", 10)
    rig = Rig(parts, senders=2)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        for campaign in (1, 2, 1, 2):
            await rig.scheduler.put(rig.batch("main", "t", 10, campaign))
        await trio.sleep(0.1)
        assert rig.scheduler.campaigns() == {1, 2}
        rig.scheduler.stop_campaigns({2})
        await trio.testing.wait_all_tasks_blocked()
        assert {k: v[0] for k, v in rig.scheduler.waiting_for().items()} == {("main", "t"): RATE}
        rig.scheduler.close()
    assert len(rig.finished("t", RELEASE)) == 20
    assert len(rig.finished("t", SENT)) == 20


async def test_room_for_claims_is_about_a_second_of_the_limit(
        clock: trio.testing.MockClock) -> None:
    parts = _parts({"main": MemoryProvider()}, senders=8)
    parts.accounts.governor.set_tenant("slow", 50)
    scheduler = Scheduler(parts.accounts, parts.controls, capacity=8)
    assert scheduler.room_for_tenant("fast", 1000) is None
    assert scheduler.room_for_tenant("slow", 50) == 100  # a second, and the next batch
    scheduler.waiting_tenant["slow"] = 30
    assert scheduler.room_for_tenant("slow", 50) == 70
    assert scheduler.room_for_tenant("slow", 100) == 170  # at least one batch, and the next
    # Unlimited account: what its requests on the wire can carry, twice (8 senders, one account).
    assert scheduler.room_for_account("main", 1000) == 16_000
    parts.accounts.governor.set_account("main", 200, 0)
    assert scheduler.room_for_account("main", 200) == 200
    parts.accounts.governor.penalize("main", retry_after=5.0)
    assert scheduler.room_for_account("main", 100) == 0  # backing off a 429: nothing



async def test_a_batch_that_may_go_is_taken_at_once_on_a_real_clock() -> None:
    """On a clock that moves between two readings, "may go now" still means now."""
    parts = _parts({"main": MemoryProvider()})
    scheduler = Scheduler(parts.accounts, parts.controls, capacity=8)
    message = Message(1, "shop", None, "main", None, "+306900000001", "hi", 1, 0)
    await scheduler.put(Batch("main", "shop", [message], MARKED))
    with trio.fail_after(1):
        taken = await scheduler.take()
    assert taken is not None and not taken.release


def test_tenants_without_a_limit_share_batches_and_a_limited_one_has_its_own() -> None:
    from sendd.actors.batcher import group_by_destination
    from sendd.model import ANY_TENANT

    messages = [Message(i, tenant, 1, "main", None, "+306900000001", "hi", 1, 0)
                for i, tenant in enumerate(["a", "b", "slow", "c", "slow", "a"])]
    groups = group_by_destination(messages, limited={"slow"})
    assert {key: [m.id for m in ms] for key, ms in groups.items()} == {
        ("main", ANY_TENANT): [0, 1, 3, 5], ("main", "slow"): [2, 4]}
