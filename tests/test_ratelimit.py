import math
from collections import defaultdict

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import busiest_window
from sendd.core.ratelimit import UNLIMITED_BATCH, Governor, WindowLimit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- WindowLimit, examples


def test_window_is_half_open() -> None:
    limit = WindowLimit(3, window=1.0)
    assert [limit.reserve(1, 10.0) for _ in range(3)] == [10.0, 10.0, 10.0]
    assert limit.reserve(1, 10.0) == 11.0  # exactly when the first grants leave the window
    assert limit.reserve(2, 10.5) == 11.0
    assert limit.reserve(1, 10.5) == 12.0


def test_batch_waits_for_room_a_gcra_would_overrun() -> None:
    # A full batch at the end of one window and another right after would be 2x in a GCRA.
    limit = WindowLimit(10, window=1.0)
    assert limit.reserve(10, 0.75) == 0.75
    assert limit.reserve(10, 1.25) == 1.75


def test_entries_and_pruning() -> None:
    limit = WindowLimit(5, window=1.0)
    limit.reserve(2, 0.0)
    limit.reserve(3, 0.5)
    assert limit.entries() == [(0.0, 2), (0.5, 3)]
    assert limit.earliest(3, 1.2) == 1.5  # the 2-unit grant has left, the 3-unit one has not
    assert limit.entries() == [(0.5, 3)]


def test_compaction_keeps_running_totals() -> None:
    limit = WindowLimit(2, window=1.0)
    times = [limit.reserve(1, float(i) / 2) for i in range(400)]
    assert times == [i / 2 for i in range(400)]
    assert limit.reserve(2, 199.5) == 200.5
    assert limit.reserve(1, 199.5) == 201.5


def test_unlimited_and_oversized() -> None:
    assert WindowLimit(0).reserve(10**9, 3.0) == 3.0
    limit = WindowLimit(5)
    with pytest.raises(ValueError):
        limit.earliest(6, 0.0)
    with pytest.raises(ValueError):
        limit.reserve(0, 0.0)


def test_lowered_limit_keeps_the_log() -> None:
    limit = WindowLimit(10, window=1.0)
    limit.reserve(8, 0.0)
    limit.set_limit(4)
    assert limit.limit == 4
    assert limit.reserve(4, 0.5) == 1.0


def test_fifo_cannot_beat_twice_the_unit_bound() -> None:
    # Why the waiting bound has a factor 2: a 1-unit and a full grant never share a window.
    limit = WindowLimit(10, window=1.0)
    times = [limit.reserve(n, 0.0) for n in [1, 10] * 5]
    assert times == [float(i) for i in range(10)]  # 55 units took 10 windows, not 6


# ---------------------------------------------------------------- WindowLimit, properties

DELAYS = st.one_of(st.just(0.0), st.floats(0.0, 0.3), st.floats(0.0, 3.0))


@st.composite
def scenarios(draw: st.DrawFn, unit_only: bool = False) -> tuple[int, float, list]:
    limit = draw(st.integers(1, 12))
    window = draw(st.sampled_from([1.0, 0.5, 0.3, 2.0]))
    sizes = st.just(1) if unit_only else st.integers(1, limit)
    steps = draw(st.lists(st.tuples(DELAYS, sizes), min_size=1, max_size=40))
    return limit, window, steps


def run_window_limit(limit: int, window: float, steps: list) -> list[tuple[float, int, float, int]]:
    """Returns (now, units, granted time, queued units incl. this grant) per step."""
    log = WindowLimit(limit, window)
    now, grants, out = 0.0, [], []
    for delay, units in steps:
        now += delay
        queued = sum(n for t, n in grants if t + window > now) + units
        at = log.reserve(units, now)
        grants.append((at, units))
        out.append((now, units, at, queued))
    return out


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_window_limit_holds_is_fifo_and_bounded(scenario: tuple[int, float, list]) -> None:
    limit, window, steps = scenario
    rows = run_window_limit(limit, window, steps)
    assert busiest_window([(at, n) for _, n, at, _ in rows], window) <= limit
    previous = -math.inf
    for now, _, at, queued in rows:
        assert math.isfinite(at) and at >= now and at >= previous  # FIFO, never in the past
        assert at <= max(now, previous + window)  # at most one window after the previous
        assert at <= now + 2 * math.ceil(queued / limit) * window  # mixed sizes: factor 2
        previous = at


@settings(max_examples=200, deadline=None)
@given(scenarios(unit_only=True))
def test_unit_grants_drain_at_the_full_rate(scenario: tuple[int, float, list]) -> None:
    limit, window, steps = scenario
    rows = run_window_limit(limit, window, steps)
    assert busiest_window([(at, n) for _, n, at, _ in rows], window) <= limit
    for now, _, at, queued in rows:
        assert at <= now + math.ceil(queued / limit) * window + window


# ---------------------------------------------------------------- Governor


def make_governor() -> tuple[Governor, FakeClock]:
    clock = FakeClock()
    governor = Governor(clock, window=1.0)
    governor.set_account("acc1", 10, 3)
    governor.set_account("acc2", 6, 0)
    governor.set_tenant("t1", 8)
    return governor, clock


def test_governor_takes_the_latest_of_all_limits() -> None:
    governor, _ = make_governor()
    assert governor.max_batch("acc1", "t1") == 8
    assert governor.max_batch("acc1", "nobody") == 10
    assert governor.reserve("acc2", "t1", 6) == 0.0
    assert governor.reserve("acc1", "t1", 3) == 1.0  # tenant: 6 + 3 > 8 until t = 1
    # Requests: 3 per second.
    assert [governor.reserve("acc1", "nobody", 1) for _ in range(3)] == [1.0, 1.0, 2.0]
    with pytest.raises(KeyError):
        governor.reserve("unknown", "t1", 1)


def test_unlimited_everything() -> None:
    governor = Governor(FakeClock(), window=1.0)
    governor.set_account("free", 0, 0)
    assert governor.max_batch("free", "t") == UNLIMITED_BATCH
    assert governor.reserve("free", "t", 10**6) == 0.0


def test_penalize_halves_and_honours_retry_after() -> None:
    governor, clock = make_governor()
    clock.now = 5.0
    governor.penalize("acc1", 2.5)
    assert governor.effective("acc1") == (5, 1)
    assert governor.max_batch("acc1", "nobody") == 5
    assert governor.reserve("acc1", "nobody", 1) == 7.5
    governor.penalize("acc1", None)
    governor.penalize("acc1", 0.5)  # never shortens an earlier Retry-After
    assert governor.effective("acc1") == (1, 1)
    assert governor.reserve("acc1", "nobody", 1) == 8.5
    governor.penalize("acc2", None)
    assert governor.effective("acc2") == (3, 0)  # unlimited requests stay unlimited


def test_batch_sized_before_a_penalty_goes_out_alone() -> None:
    governor, clock = make_governor()
    assert governor.reserve("acc1", "nobody", 2) == 0.0
    governor.penalize("acc1", None)  # limit 5 now, but a 10-message batch is in flight
    assert governor.reserve("acc1", "nobody", 10) == 1.0
    assert governor.reserve("acc1", "nobody", 1) == 2.0


def test_reward_restores_the_configured_limit() -> None:
    governor, _ = make_governor()
    for _ in range(5):
        governor.penalize("acc1", None)
    assert governor.effective("acc1") == (1, 1)
    governor.reward("acc1")
    assert governor.effective("acc1") == (2, 2)
    for _ in range(20):
        governor.reward("acc1")
    assert governor.effective("acc1") == (10, 3)


def test_reconfiguring_keeps_a_back_off_within_the_new_limit() -> None:
    governor, _ = make_governor()
    governor.penalize("acc1", None)
    governor.set_account("acc1", 4, 30)
    assert governor.effective("acc1") == (4, 1)
    governor.set_account("acc1", 0, 30)
    assert governor.effective("acc1") == (0, 1)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5000), st.integers(0, 50))
def test_penalties_are_undone_by_enough_rewards(penalties: int, msgs: int, reqs: int) -> None:
    governor = Governor(FakeClock(), window=1.0)
    governor.set_account("a", msgs, reqs)
    for _ in range(penalties):
        governor.penalize("a", 1.0)
    low_msgs, low_reqs = governor.effective("a")
    assert 1 <= low_msgs <= msgs and (low_reqs == 0 if reqs == 0 else 1 <= low_reqs <= reqs)
    for _ in range(10):  # even from 1, ten steps of 10% (rounded up) reach the limit
        governor.reward("a")
    assert governor.effective("a") == (msgs, reqs)
    governor.reward("a")
    assert governor.effective("a") == (msgs, reqs)  # never past the configured limit


GOV_STEPS = st.lists(
    st.tuples(DELAYS, st.sampled_from(["acc1", "acc2"]), st.sampled_from(["t1", "t2"]),
              st.integers(1, 10)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(GOV_STEPS)
def test_governor_holds_every_limit(steps: list) -> None:
    governor, clock = make_governor()
    governor.set_tenant("t2", 0)
    logs: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for delay, account, tenant, units in steps:
        clock.now += delay
        units = min(units, governor.max_batch(account, tenant))
        limited = [("msgs", account)] + ([("msgs", tenant)] if tenant == "t1" else [])
        prior = [logs[k][-1][0] for k in limited if logs[k]]
        at = governor.reserve(account, tenant, units)
        assert clock.now <= at <= max([clock.now, *(t + 1.0 for t in prior)])
        uses = (("msgs", account, units), ("reqs", account, 1), ("msgs", tenant, units))
        for kind, name, n in uses:
            if name != "t2":  # unlimited: nothing to order
                assert not logs[kind, name] or logs[kind, name][-1][0] <= at  # FIFO per limit
            logs[kind, name].append((at, n))
    assert busiest_window(logs["msgs", "acc1"], 1.0) <= 10
    assert busiest_window(logs["reqs", "acc1"], 1.0) <= 3
    assert busiest_window(logs["msgs", "acc2"], 1.0) <= 6
    assert busiest_window(logs["msgs", "t1"], 1.0) <= 8


async def test_concurrent_acquire_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    governor = Governor(window=1.0)  # reads trio's (mock) clock
    governor.set_account("acc1", 10, 3)
    governor.set_account("acc2", 6, 4)
    governor.set_tenant("t1", 8)
    start = trio.current_time()
    sent: dict[str, list[tuple[float, int]]] = defaultdict(list)

    async def sender(account: str, sizes: list[int]) -> None:
        for units in sizes:
            waited = await governor.acquire(account, "t1", units)
            now = trio.current_time()
            assert waited >= 0.0
            for name in (account, "t1", f"{account}/requests"):
                sent[name].append((now, 1 if name.endswith("requests") else units))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                account = "acc1" if i % 2 else "acc2"
                nursery.start_soon(sender, account, [(i + j) % 6 + 1 for j in range(5)])

    assert sum(n for _, n in sent["t1"]) == 105
    assert busiest_window(sent["acc1"], 1.0) <= 10
    assert busiest_window(sent["acc2"], 1.0) <= 6
    assert busiest_window(sent["t1"], 1.0) <= 8
    assert busiest_window(sent["acc1/requests"], 1.0) <= 3
    assert busiest_window(sent["acc2/requests"], 1.0) <= 4
    # 105 messages at 8/s in whole-batch grants: at least 13 s, and FIFO keeps it near that.
    elapsed = trio.current_time() - start
    assert 13.0 <= elapsed <= 2 * math.ceil(105 / 8)
