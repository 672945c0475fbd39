"""`sendd run` tunes the cyclic garbage collector before it starts (sendd.daemon.tune_gc)."""

import gc
from collections.abc import Iterator

import pytest

from sendd.daemon import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_tune_gc_raises_the_young_threshold_and_freezes_startup(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    survivor = [object()]  # tracked by the collector, as start-up's objects are
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked(survivor)
    # Frozen objects are out of every generation the collector traverses.
    assert all(survivor is not o for o in gc.get_objects())
