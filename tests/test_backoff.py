import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendd.core.backoff import retry_delay

ATTEMPTS = st.integers(min_value=1, max_value=5000)
BASES = st.floats(min_value=0.0, max_value=100.0)
CAPS = st.floats(min_value=0.0, max_value=10_000.0)
JITTERS = st.floats(min_value=0.0, max_value=1.0)


def test_defaults_without_jitter() -> None:
    delays = [retry_delay(n, jitter=0.0) for n in range(1, 10)]
    assert delays == [3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 192.0, 384.0, 600.0]
    assert retry_delay(10**6, jitter=0.0) == 600.0


def test_seeded_rand_is_reproducible() -> None:
    assert retry_delay(3, rand=random.Random(7)) == retry_delay(3, rand=random.Random(7))


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_below_one_raises(attempt: int) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt)


def test_bad_jitter_raises() -> None:
    with pytest.raises(ValueError):
        retry_delay(1, jitter=1.5)


@settings(max_examples=300, deadline=None)
@given(ATTEMPTS, BASES, CAPS, JITTERS, st.integers(0, 2**32))
def test_within_bounds(attempt: int, base: float, cap: float, jitter: float, seed: int) -> None:
    delay = retry_delay(attempt, base=base, cap=cap, jitter=jitter, rand=random.Random(seed))
    nominal = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    assert 0.0 <= delay
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9
    assert delay <= cap * (1 + jitter) + 1e-9


@settings(max_examples=300, deadline=None)
@given(ATTEMPTS, BASES, CAPS)
def test_unjittered_delay_never_decreases(attempt: int, base: float, cap: float) -> None:
    here = retry_delay(attempt, base=base, cap=cap, jitter=0.0)
    assert retry_delay(attempt + 1, base=base, cap=cap, jitter=0.0) >= here
