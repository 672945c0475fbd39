"""Rates hold: no account or tenant is sent to faster than its limit in any one-second window.

Checked twice: exactly, on the time each request left the daemon (`sent_at` in its log), and at
the fake provider on arrival, where a loaded test machine may deliver a request late and bunch
it with the next, so one batch of slack is allowed there and nothing more.
"""

import pytest

from harness import (
    API_KEY,
    Daemon,
    busiest_window,
    enqueue,
    numbers,
    sendd,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)


def requests_sent(daemon: Daemon, tenant: str | None = None) -> list[tuple[float, int]]:
    return [(e["sent_at"], e["size"]) for e in daemon.events("batch_sent")
            if tenant is None or e["tenant"] == tenant]


@pytest.mark.serial  # a rate or latency floor against the wall clock: not beside another test
def test_account_message_and_request_limits_hold(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"msgs_per_s": 1000, "reqs_per_s": 8,
                                             "max_batch": 200}})
    setup_database(config, {"acme": 100_000})
    enqueue(config, tmp_path, "acme", numbers(4000))
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url).get("sent") == 4000, 60, "all sent")
    sent = requests_sent(daemon)
    assert sum(n for _, n in sent) == 4000
    assert busiest_window(sent) <= 1000
    assert busiest_window([(t, 1) for t, _ in sent]) <= 8
    # The limit is used, not starved: 200-message batches at 8 requests/s allow 1,000/s.
    assert busiest_window(sent) >= 800
    stats = fake_provider.stats()
    assert stats["max_msgs_per_1s"][API_KEY] <= 1000 + 200
    assert stats["max_reqs_per_1s"][API_KEY] <= 8 + 1


@pytest.mark.serial  # a rate or latency floor against the wall clock: not beside another test
def test_tenant_limit_holds_beside_an_unlimited_tenant(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 100}})
    setup_database(config, {"slow": 100_000, "fast": 100_000})
    sendd(config, "tenant", "set", "slow", "--rate", "300")
    enqueue(config, tmp_path, "slow", numbers(1500), "--sender", "SLOW")
    enqueue(config, tmp_path, "fast", numbers(3000, start=5000), "--sender", "FAST")
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url).get("sent") == 4500, 60, "all sent")
    assert 200 <= busiest_window(requests_sent(daemon, "slow")) <= 300
    assert busiest_window(requests_sent(daemon, "fast")) > 300  # not held back by the slow one
    peaks = fake_provider.stats()["max_msgs_per_1s_by_sender"]
    assert peaks["SLOW"] <= 300 + 100
