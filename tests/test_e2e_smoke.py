"""A first end-to-end pass: enqueue, run, every message sent exactly once."""

from harness import (
    Daemon,
    enqueue,
    numbers,
    scalar,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)


def test_small_campaign_is_sent_once(tmp_path, database_url, fake_provider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"acme": 10_000})
    result = enqueue(config, tmp_path, "acme", numbers(2000))
    assert result["queued"] == 2000
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url).get("sent") == 2000, 60, "all sent")
        assert daemon.process.poll() is None
    stats = fake_provider.stats()
    assert stats["accepted"] == 2000
    assert stats["duplicate_references"] == 0
    assert scalar(database_url, "SELECT status FROM sendd.campaign") == "completed"
    assert scalar(database_url, "SELECT credits FROM sendd.tenant") == 8000
