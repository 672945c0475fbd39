"""Outages, end to end: the database restarts, the provider answers 503 for a while, and the
daemon is told to stop with batches on the wire. Real processes throughout (PostgreSQL, the
fake provider, `sendd run`); each test checks the guarantees of CONTRACT.md on the rows, the
ledger and the fake provider's own counters: nothing sent twice, nothing lost.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import pytest

from harness import (
    Daemon,
    campaign,
    enqueue,
    numbers,
    scalar,
    setup_database,
    status_counts,
    stays,
    wait_campaign,
    wait_until,
    write_config,
)


def sent_count(url: str, campaign_id: int) -> int:
    return status_counts(url, campaign_id).get("sent", 0)


def wait_completed(url: str, campaign_id: int, timeout: float) -> dict[str, Any]:
    return wait_campaign(url, campaign_id, "completed", timeout, interval=0.5)


def assert_exactly_once(url: str, campaign_id: int, messages: int, stats: dict[str, Any],
                        credits: int) -> dict[str, Any]:
    """Every message sent once: rows, counters, ledger and the provider all agree."""
    assert status_counts(url, campaign_id) == {"sent": messages}
    assert stats["duplicate_references"] == 0, stats
    assert stats["duplicate_sends"] == 0, stats
    assert stats["accepted"] == messages, stats
    assert stats["distinct_references"] == messages, stats
    row = campaign(url, campaign_id)
    assert (row["status"], row["total"], row["sent"], row["failed"], row["unknown"]) == (
        "completed", messages, messages, 0, 0), row
    assert scalar(url, "SELECT count(*) FROM sendd.message WHERE provider_message_id IS NULL "
                       "AND campaign_id = $1", campaign_id) == 0
    assert scalar(url, "SELECT count(*) FROM sendd.submission") == 0
    debited = -scalar(url, "SELECT coalesce(sum(delta), 0) FROM sendd.credit_ledger "
                           "WHERE reason = 'send'")
    assert debited == messages
    assert scalar(url, "SELECT credits FROM sendd.tenant WHERE id = 'acme'") == credits - messages
    return row


def test_database_restart_mid_campaign(tmp_path, database_url, pg_server, fake_provider):
    messages, credits = 20_000, 100_000
    fake_provider.control(latency_ms=50)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 100}})
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: sent_count(database_url, campaign_id) >= 2000, 60, "2,000 sent")
        started = time.monotonic()
        pg_server.restart()
        restart_seconds = time.monotonic() - started
        assert sent_count(database_url, campaign_id) < messages, "finished before the restart"
        wait_completed(database_url, campaign_id, 120)
        wait_until(lambda: not status_counts(database_url).get("sending"), 10, "no sending rows")
        assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.log()[-3000:]}"
        log = daemon.log()

    # The restart was noticed (connections dropped) and ridden out.
    assert re.search(r'"(writer_retry|mark_retry|heartbeat_failed|actor_crashed)"', log), (
        f"no sign of the database restart ({restart_seconds:.1f}s) in the daemon log")
    assert '"daemon_failed"' not in log
    assert_exactly_once(database_url, campaign_id, messages, fake_provider.stats(), credits)


@pytest.mark.slow
def test_provider_outage_is_retried_until_it_ends(tmp_path, database_url, fake_provider):
    messages, credits, outage = 3000, 10_000, 10.0
    config = write_config(
        tmp_path / "sendd.toml", database_url, fake_provider.url,
        # 200 msgs/s: the campaign runs before, through and after the outage.
        accounts={"main": {"max_batch": 50, "msgs_per_s": 200}},
        # 10 attempts over >= 11.7 s of backoff (jitter 0.1) outlast a 10 s outage.
        retry={"max_attempts": 10, "base_delay": 0.2, "max_delay": 2.0, "jitter": 0.1},
    )
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: sent_count(database_url, campaign_id) >= 300, 30, "300 sent")
        fake_provider.control(status_override=503)
        # Through the whole outage nothing fails: it is held back.
        stays(lambda: "failed" not in status_counts(database_url, campaign_id), outage,
              "nothing failed during the outage", interval=0.5)
        sent_during_outage = sent_count(database_url, campaign_id)
        fake_provider.control(status_override=0)
        assert sent_during_outage < messages, "finished before the outage ended"
        wait_completed(database_url, campaign_id, 90)
        assert daemon.process.poll() is None
        not_sent = daemon.events("batch_not_sent")

    stats = fake_provider.stats()
    assert stats["responses"].get("503", 0) > 0, stats  # the outage did hit the daemon
    assert all(e["outcome"] == "unavailable" for e in not_sent), not_sent[:3]
    assert status_counts(database_url, campaign_id).get("failed", 0) == 0
    assert_exactly_once(database_url, campaign_id, messages, stats, credits)
    # A provider outage uses no attempts: one each, the send that was accepted.
    assert scalar(database_url, "SELECT max(attempts) FROM sendd.message") == 1


def test_drain_with_batches_in_flight(tmp_path, database_url, fake_provider):
    messages, credits, stop_timeout = 10_000, 20_000, 20.0
    fake_provider.control(latency_ms=1000)
    # Small claims and channels bound what is in flight (~1,500 messages, a few seconds to
    # finish at 1 s a batch), so the drain ends well before the campaign would.
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50}},
                          pipeline={"senders": 8, "claim_chunk": 200, "claim_capacity": 2},
                          daemon={"stop_timeout": stop_timeout})
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]

    first = Daemon(config, tmp_path / "first.log").wait_ready()
    try:
        instance = wait_until(lambda: first.events("daemon_ready"), 10, "ready")[0]["instance"]
        # Batches are on the wire (each takes 1 s), some have already come back.
        wait_until(lambda: sent_count(database_url, campaign_id) >= 100, 30, "100 sent")
        assert scalar(database_url, "SELECT count(*) FROM sendd.submission "
                                    "WHERE instance_id = $1", instance) > 0
        first.signal(signal.SIGTERM)
        started = time.monotonic()
        code = first.wait(stop_timeout + 5)
        took = time.monotonic() - started
    finally:
        first.stop()
    assert code == 0, first.log()[-3000:]
    assert took < stop_timeout, f"drain took {took:.1f}s"
    assert '"drain_timeout"' not in first.log()
    assert scalar(database_url, "SELECT count(*) FROM sendd.message WHERE status = 'sending' "
                                "OR lease_owner = $1", instance) == 0
    assert scalar(database_url, "SELECT count(*) FROM sendd.submission") == 0
    assert scalar(database_url, "SELECT count(*) FROM sendd.instance WHERE id = $1",
                  instance) == 0
    after_drain = status_counts(database_url, campaign_id)
    assert after_drain.get("sent", 0) < messages, "finished before the drain"
    assert set(after_drain) <= {"sent", "queued"}, after_drain
    # Everything the drain put back or finished shows in the provider's own counters.
    assert fake_provider.stats()["accepted"] == after_drain["sent"]

    fake_provider.control(latency_ms=0)
    with Daemon(config, tmp_path / "second.log").wait_ready() as second:
        wait_completed(database_url, campaign_id, 60)
        assert second.process.poll() is None
    assert_exactly_once(database_url, campaign_id, messages, fake_provider.stats(), credits)
