"""Supervision against a running daemon: dropped connections are survived, a crash loop ends
the process non-zero so systemd starts a fresh one."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import (
    Daemon,
    enqueue,
    numbers,
    query,
    scalar,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)

KILL_CONNECTIONS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
CONNECTIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


def test_dropped_connections_are_survived_and_the_campaign_completes(
        tmp_path: Path, database_url: str, fake_provider) -> None:
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"msgs_per_s": 3000, "max_batch": 100}})
    setup_database(config, {"acme": 100_000})
    enqueue(config, tmp_path, "acme", numbers(10_000))
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url).get("sent", 0) > 500, 30, "sending")
        for _ in range(3):
            assert scalar(database_url, KILL_CONNECTIONS) > 0
            wait_until(lambda: scalar(database_url, CONNECTIONS) > 0, 20,
                       "the daemon to connect again")
        wait_until(lambda: status_counts(database_url) == {"sent": 10_000}, 90,
                   "the campaign to complete")
        assert daemon.process.poll() is None
        assert daemon.events("database_unavailable") or daemon.events("writer_retry") \
            or daemon.events("mark_retry")
    assert fake_provider.stats()["duplicate_references"] == 0
    assert scalar(database_url, "SELECT count(*) FROM sendd.submission") == 0


@pytest.mark.slow
def test_a_crash_loop_ends_the_daemon_non_zero(tmp_path: Path, database_url: str,
                                               fake_provider) -> None:
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"acme": 100_000})
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        # A broken schema is no outage: every submission mark fails the same way, every time.
        query(database_url, "ALTER TABLE sendd.submission RENAME TO submission_gone")
        enqueue(config, tmp_path, "acme", numbers(500))
        assert daemon.wait(90) == 1
        crashes = daemon.events("actor_crashed")
        failed = daemon.events("daemon_failed")
    assert len(crashes) > 10
    assert any(c["actor"].startswith("sender") and "UndefinedTableError" in c["error"]
               for c in crashes)
    assert "restarts within" in failed[0]["error"]
