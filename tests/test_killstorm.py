"""Crash safety: SIGKILL daemons mid-campaign, restart them, and check the guarantees.

The same storm as load/killstorm.py, at a size that keeps the suite quick.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load"))

from killstorm import check, run_storm  # noqa: E402


@pytest.mark.slow
def test_kill_storm_one_daemon(tmp_path, database_url):
    # 500 messages/s: the campaign lasts the whole storm, so every kill hits work in flight.
    figures = run_storm(tmp_path, database_url, messages=20_000, kills=15, daemons=1, rate=500,
                        max_batch=50)
    check(figures)
    assert figures["unknown"] == 0, figures  # lookups work, so everything settles


@pytest.mark.slow
def test_kill_storm_three_daemons(tmp_path, database_url):
    figures = run_storm(tmp_path, database_url, messages=15_000, kills=15, daemons=3, seed=2,
                        rate=400, max_batch=50)
    check(figures)
    assert figures["unknown"] == 0, figures
