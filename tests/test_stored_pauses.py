"""Operator pauses of a tenant, an account or everything are stored (sendd.pause): every daemon
on the database holds back within about a second, a restart keeps them, and once `sendd ctl
pause` returns only requests already marked reach the provider (issue 15, "Stop means stop")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import (
    Daemon,
    enqueue,
    numbers,
    scalar,
    sendd_json,
    setup_database,
    status_counts,
    stays,
    wait_until,
)
from test_control import SMALL_PIPELINE, Client, ctl_setup


def tenant_sent(url: str, tenant: str) -> int:
    return scalar(url, "SELECT count(*) FROM sendd.message WHERE tenant_id = $1 "
                       "AND status = 'sent'", tenant)


def paused_tenants(sock: Path) -> list[str]:
    with Client(sock) as client:
        return client.call(cmd="status")["paused"]["tenants"]


def test_a_tenant_pause_reaches_every_daemon_and_outlives_a_restart(
        tmp_path: Path, database_url: str, fake_provider: Any) -> None:
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(ctl_setup(tmp_path / name, database_url, fake_provider.url,
                                 accounts={"main": {"msgs_per_s": 400, "max_batch": 20}},
                                 pipeline=SMALL_PIPELINE))
    (config_a, sock_a), (config_b, sock_b) = configs
    setup_database(config_a, {"acme": 100_000, "shop": 100_000})
    with Daemon(config_a, tmp_path / "a.log").wait_ready(), \
            Daemon(config_b, tmp_path / "b.log").wait_ready():
        reply = sendd_json(config_a, "ctl", "pause", "--tenant", "acme")
        assert reply["ok"] and reply["paused"]["tenants"] == ["acme"]
        # b reads the stored pauses once a second; 3 s leaves room for a loaded test machine.
        wait_until(lambda: paused_tenants(sock_b) == ["acme"], 3, "daemon b to see the pause")
        enqueue(config_a, tmp_path, "acme", numbers(300))
        enqueue(config_a, tmp_path, "shop", numbers(100, start=1000))
        wait_until(lambda: tenant_sent(database_url, "shop") == 100, 30, "shop sent")
        stays(lambda: tenant_sent(database_url, "acme") == 0, 1.5, "acme held by both daemons")
    # Both stopped: the restarted daemon finds the pause in the database, not in another daemon.
    assert scalar(database_url, "SELECT count(*) FROM sendd.pause") == 1
    with Daemon(config_a, tmp_path / "a2.log").wait_ready():
        assert paused_tenants(sock_a) == ["acme"]
        stays(lambda: tenant_sent(database_url, "acme") == 0, 1.5, "acme held after a restart")
        assert sendd_json(config_a, "ctl", "resume", "--tenant", "acme")["paused"]["tenants"] == []
        wait_until(lambda: tenant_sent(database_url, "acme") == 300, 30, "acme sent on resume")
    assert scalar(database_url, "SELECT count(*) FROM sendd.pause") == 0


@pytest.mark.serial  # a bound against the wall clock: not beside another test
def test_after_a_pause_returns_at_most_about_a_second_of_the_rate_goes_out(
        tmp_path: Path, database_url: str, fake_provider: Any) -> None:
    """Claimed ahead of a 20 msgs/s tenant are several seconds of its rate; a pause lets only the
    requests already marked go out and puts the rest back in the queue."""
    config, _ = ctl_setup(tmp_path, database_url, fake_provider.url,
                          accounts={"main": {"msgs_per_s": 400, "max_batch": 5}},
                          pipeline=SMALL_PIPELINE)
    setup_database(config, {"acme": 100_000})
    sendd_json(config, "tenant", "set", "acme", "--rate", "20")
    total = 400
    enqueue(config, tmp_path, "acme", numbers(total))
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: fake_provider.stats()["accepted"] >= 40, 30, "sending to start")
        assert sendd_json(config, "ctl", "pause", "--tenant", "acme")["ok"]
        at_pause = fake_provider.stats()["accepted"]
        wait_until(lambda: status_counts(database_url).get("sending", 0) == 0, 10,
                   "claimed messages to be sent or put back")
        after = fake_provider.stats()["accepted"]
        stays(lambda: fake_provider.stats()["accepted"] == after, 1.5, "nothing more sent")
        assert after - at_pause <= 40, (at_pause, after)
        counts = status_counts(database_url)
        assert counts.get("sent", 0) == after and counts.get("queued", 0) == total - after
        # Claimed, unmarked batches put back: by the scheduler (at once) or by the mark.
        released = [e for e in daemon.events("batch_released") if e["why"] == "paused"]
        assert released or daemon.events("paused"), "claimed batches were put back"
        assert sendd_json(config, "ctl", "resume", "--tenant", "acme")["ok"]
        wait_until(lambda: fake_provider.stats()["accepted"] > after, 10, "sending on resume")
