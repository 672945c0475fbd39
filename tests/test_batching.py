from hypothesis import given, settings
from hypothesis import strategies as st

from sendd.core.batching import BatchBuilder

LINGER = 0.5
KEYS = ["a", "b", "c"]


def test_full_batch_flushes_on_add() -> None:
    builder: BatchBuilder[str, int] = BatchBuilder(lambda key: 3, LINGER)
    assert builder.add("a", 1, 0.0) == []
    assert builder.add("a", 2, 0.1) == []
    assert builder.add("a", 3, 0.2) == [("a", [1, 2, 3])]
    assert len(builder) == 0
    assert builder.next_deadline() is None


def test_linger_flushes_partial_batches() -> None:
    builder: BatchBuilder[str, int] = BatchBuilder(lambda key: 10, LINGER)
    builder.add("a", 1, 1.0)
    builder.add("b", 2, 1.2)
    builder.add("a", 3, 1.3)
    assert builder.next_deadline() == 1.5
    assert builder.due(1.49) == []
    assert builder.due(1.5) == [("a", [1, 3])]
    assert builder.next_deadline() == 1.7
    assert len(builder) == 1
    assert builder.drain() == [("b", [2])]
    assert len(builder) == 0


def test_lowered_max_size_splits_pending_batch() -> None:
    sizes = {"a": 10}
    builder: BatchBuilder[str, int] = BatchBuilder(sizes.__getitem__, LINGER)
    for i in range(7):
        builder.add("a", i, 0.1 * i)
    sizes["a"] = 3
    # Full since the third item came in: due right away, not after the linger.
    assert builder.next_deadline() == 0.2
    assert builder.due(0.7) == [("a", [0, 1, 2]), ("a", [3, 4, 5])]
    assert builder.next_deadline() == 0.6 + LINGER
    assert builder.add("a", 7, 0.8) == []
    sizes["a"] = 1
    assert builder.add("a", 8, 0.9) == [("a", [6]), ("a", [7]), ("a", [8])]


def test_zero_max_size_still_makes_progress() -> None:
    builder: BatchBuilder[str, int] = BatchBuilder(lambda key: 0, LINGER)
    assert builder.add("a", 1, 0.0) == [("a", [1])]


ADD = st.tuples(st.just("add"), st.sampled_from(KEYS), st.floats(0.0, 1.0))
RESIZE = st.tuples(st.just("resize"), st.sampled_from(KEYS), st.integers(1, 6))
DUE = st.tuples(st.just("due"), st.just(""), st.floats(0.0, 1.0))
OPS = st.lists(st.one_of(ADD, ADD, ADD, RESIZE, DUE), max_size=120)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_batches_are_exact_ordered_bounded_and_on_time(ops: list) -> None:
    sizes = dict.fromkeys(KEYS, 4)
    builder: BatchBuilder[str, int] = BatchBuilder(sizes.__getitem__, LINGER)
    added_at: dict[int, float] = {}
    out: list[tuple[str, list[int]]] = []
    now = 0.0

    def check(batches: list[tuple[str, list[int]]], *, at: float | None) -> None:
        for key, batch in batches:
            assert 0 < len(batch) <= sizes[key]
            full = len(batch) == sizes[key]
            assert at is None or full or added_at[batch[0]] + LINGER <= at
        out.extend(batches)

    def advance(to: float) -> None:
        # The actor's loop: run due() at every deadline that passes.
        while (deadline := builder.next_deadline()) is not None and deadline <= to:
            check(builder.due(deadline), at=deadline)
            after = builder.next_deadline()
            assert after is None or after > deadline  # nothing stays past its deadline

    for i, (op, key, value) in enumerate(ops):
        if op == "add":
            advance(now + value)
            now += value
            added_at[i] = now
            batches = builder.add(key, i, now)
            assert all(len(batch) == sizes[key] for _, batch in batches)
            check(batches, at=now)
        elif op == "resize":
            sizes[key] = value
        else:
            advance(now + value)
            now += value
            check(builder.due(now), at=now)
        assert len(builder) == len(added_at) - sum(len(batch) for _, batch in out)

    check(builder.drain(), at=None)
    assert len(builder) == 0
    emitted = [item for _, batch in out for item in batch]
    assert sorted(emitted) == sorted(added_at)  # every item exactly once
    for key in KEYS:
        per_key = [item for k, batch in out if k == key for item in batch]
        assert per_key == sorted(per_key)  # order kept within a key


GROUPS = st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 9), st.integers(1, 6)),
                  max_size=40)


@settings(max_examples=300, deadline=None)
@given(GROUPS)
def test_add_many_batches_like_adding_one_by_one(groups: list) -> None:
    sizes = dict.fromkeys(KEYS, 4)
    one_by_one: BatchBuilder[str, int] = BatchBuilder(sizes.__getitem__, LINGER)
    together: BatchBuilder[str, int] = BatchBuilder(sizes.__getitem__, LINGER)
    next_item = 0
    for step, (key, count, size) in enumerate(groups):
        sizes[key] = size  # sizes change between calls, as a live reload can
        items = list(range(next_item, next_item + count))
        next_item += count
        expected = [batch for item in items for batch in one_by_one.add(key, item, step)]
        assert together.add_many(key, items, step) == expected
        assert len(together) == len(one_by_one)
        assert together.next_deadline() == one_by_one.next_deadline()
    assert sorted(together.drain()) == sorted(one_by_one.drain())  # key order may differ
