"""Rates hold at the provider: no account or tenant is sent to faster than its limit in any
one-second window, measured on arrival by the fake provider."""

from harness import (
    API_KEY,
    Daemon,
    enqueue,
    numbers,
    sendd,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)


def test_account_message_and_request_limits_hold(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"msgs_per_s": 1000, "reqs_per_s": 8,
                                             "max_batch": 200}})
    setup_database(config, {"acme": 100_000})
    enqueue(config, tmp_path, "acme", numbers(4000))
    with Daemon(config, tmp_path / "daemon.log").wait_ready():
        wait_until(lambda: status_counts(database_url).get("sent") == 4000, 60, "all sent")
    stats = fake_provider.stats()
    assert stats["max_msgs_per_1s"][API_KEY] <= 1000
    assert stats["max_reqs_per_1s"][API_KEY] <= 8
    # ...and the limit is used, not starved: 200-message batches at 8 requests/s allow
    # 1,000 messages/s, so some second must come close to it.
    assert stats["max_msgs_per_1s"][API_KEY] >= 800


def test_tenant_limit_holds_beside_an_unlimited_tenant(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"slow": 100_000, "fast": 100_000})
    sendd(config, "tenant", "set", "slow", "--rate", "300")
    enqueue(config, tmp_path, "slow", numbers(1500), "--sender", "SLOW")
    enqueue(config, tmp_path, "fast", numbers(3000, start=5000), "--sender", "FAST")
    with Daemon(config, tmp_path / "daemon.log").wait_ready():
        wait_until(lambda: status_counts(database_url).get("sent") == 4500, 60, "all sent")
    peaks = fake_provider.stats()["max_msgs_per_1s_by_sender"]
    assert 200 <= peaks["SLOW"] <= 300
    assert peaks["FAST"] > 300  # the other tenant is not held back by the slow one
