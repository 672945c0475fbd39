"""End-to-end tests of the whole pipeline: real PostgreSQL, the fake provider as a process,
`sendd` commands and `sendd run` as real processes (see harness.py).

Each test states one behaviour of CONTRACT.md / PROVIDERS.md and checks it on the rows, the
ledger, the fake provider's own counters and the daemon's log.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from harness import (
    Daemon,
    FakeProvider,
    campaign,
    enqueue,
    numbers,
    query,
    scalar,
    send_debits,
    setup_database,
    status_counts,
    stays,
    wait_campaign,
    wait_until,
    write_config,
)

# Numbers under this prefix are valid for `sendd enqueue` (Greek mobiles) and are rejected
# per message by the fake when it is configured with `--reject-prefix REJECT_PREFIX`.
REJECT_PREFIX = "+306990"
REJECT_START = 90_000_000  # numbers(n, start=REJECT_START) all start with REJECT_PREFIX


def accepted_segments(url: str, tenant: str) -> int:
    return scalar(url, "SELECT coalesce(sum(segments), 0) FROM sendd.message WHERE tenant_id = $1 "
                       "AND status IN ('sent', 'delivered', 'undelivered')", tenant)


def credits(url: str, tenant: str) -> int:
    return scalar(url, "SELECT credits FROM sendd.tenant WHERE id = $1", tenant)


def assert_billing(url: str, tenant: str, initial_credits: int, expected_segments: int) -> None:
    """The ledger, the accepted rows and the balance all agree on what was billed."""
    assert send_debits(url, tenant) == expected_segments
    assert accepted_segments(url, tenant) == expected_segments
    assert initial_credits - credits(url, tenant) == expected_segments


def assert_counters_match_rows(url: str, campaign_id: int) -> dict[str, Any]:
    row = campaign(url, campaign_id)
    counts = status_counts(url, campaign_id)
    assert row["total"] == sum(counts.values())
    assert row["sent"] == sum(counts.get(s, 0) for s in ("sent", "delivered", "undelivered"))
    assert row["failed"] == counts.get("failed", 0)
    assert row["unknown"] == counts.get("unknown", 0)
    assert row["cancelled"] == counts.get("cancelled", 0)
    return row


def no_open_work(url: str) -> bool:
    return not status_counts(url).get("sending") and not scalar(
        url, "SELECT count(*) FROM sendd.submission")


# --- 1. throughput and bookkeeping ----------------------------------------------------------

def test_50k_messages_three_tenants_all_sent_once_and_billed(tmp_path: Path, database_url: str,
                                                             fake_provider: FakeProvider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          pipeline={"claim_chunk": 1000})
    # Different sizes, and one tenant with two-segment messages, so billing per segment shows.
    sizes = {"acme": 30_000, "beta": 15_000, "gamma": 5_000}
    texts = {"acme": "Hello from acme", "beta": "Beta says hi",
             "gamma": "Gamma: " + "x" * 200}  # 207 GSM-7 characters: 2 segments
    segments_each = {"acme": 1, "beta": 1, "gamma": 2}
    initial = {"acme": 40_000, "beta": 20_000, "gamma": 12_000}
    setup_database(config, initial)
    campaigns, start = {}, 0
    for tenant, size in sizes.items():
        result = enqueue(config, tmp_path, tenant, numbers(size, start=start), text=texts[tenant])
        assert result["queued"] == size
        campaigns[tenant] = result["campaign_id"]
        start += size

    started = time.monotonic()
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url).get("sent") == 50_000, 50,
                   "50,000 messages sent", interval=0.25)
        for campaign_id in campaigns.values():
            wait_campaign(database_url, campaign_id, "completed", 5)
        assert daemon.process.poll() is None
    elapsed = time.monotonic() - started

    stats = fake_provider.stats()
    assert stats["accepted"] == 50_000, stats
    assert stats["duplicate_references"] == 0
    assert stats["duplicate_sends"] == 0
    assert status_counts(database_url) == {"sent": 50_000}
    assert scalar(database_url, "SELECT count(*) FROM sendd.message "
                                "WHERE bulk_id IS NULL OR provider_message_id IS NULL") == 0
    assert scalar(database_url, "SELECT count(DISTINCT provider_message_id) "
                                "FROM sendd.message") == 50_000
    for tenant, campaign_id in campaigns.items():
        row = assert_counters_match_rows(database_url, campaign_id)
        assert (row["total"], row["sent"], row["failed"]) == (sizes[tenant], sizes[tenant], 0)
        assert row["status"] == "completed" and row["finished_at"] is not None
        assert_billing(database_url, tenant, initial[tenant],
                       sizes[tenant] * segments_each[tenant])
    print(f"50,000 messages in {elapsed:.1f}s")


# --- 2. per-message rejections --------------------------------------------------------------

def test_partial_rejections_fail_with_provider_code_and_are_not_billed(tmp_path: Path,
                                                                      database_url: str):
    good, bad = numbers(1700), numbers(300, start=REJECT_START)
    assert all(n.startswith(REJECT_PREFIX) for n in bad)
    assert not any(n.startswith(REJECT_PREFIX) for n in good)
    # Interleave, so most batches carry both accepted and rejected entries.
    recipients = [n for i in range(300) for n in (*good[i * 5:(i + 1) * 5], bad[i])]
    recipients += good[1500:]
    with FakeProvider("--reject-prefix", REJECT_PREFIX) as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 200}})
        setup_database(config, {"acme": 5_000})
        campaign_id = enqueue(config, tmp_path, "acme", recipients)["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready():
            row = wait_campaign(database_url, campaign_id, "completed", 30)
        stats = provider.stats()

    assert stats["accepted"] == 1700 and stats["rejected"] == 300
    assert stats["duplicate_references"] == 0
    assert status_counts(database_url, campaign_id) == {"sent": 1700, "failed": 300}
    failed = query(database_url, "SELECT recipient, error_code, provider_message_id, attempts "
                                 "FROM sendd.message WHERE status = 'failed'")
    assert sorted(r["recipient"] for r in failed) == sorted(bad)
    assert {r["error_code"] for r in failed} == {"INVALID_NUMBER"}
    assert all(r["provider_message_id"] is None for r in failed)
    assert (row["total"], row["sent"], row["failed"]) == (2000, 1700, 300)
    assert_counters_match_rows(database_url, campaign_id)
    assert_billing(database_url, "acme", 5_000, 1700)


# --- 3. throttling and provider trouble -----------------------------------------------------

def test_429_and_503_are_retried_and_every_message_is_sent_once(tmp_path: Path,
                                                               database_url: str):
    total = 5000
    with FakeProvider("--seed", "7", "--error-429-rate", "0.3", "--retry-after", "1",
                      "--error-503-rate", "0.2") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 250}},
                              retry={"max_attempts": 10})
        setup_database(config, {"acme": 10_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(total))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            row = wait_campaign(database_url, campaign_id, "completed", 50)
            not_sent = daemon.events("batch_not_sent")
        stats = provider.stats()

    # The faults really happened, and were answered by retries.
    assert stats["responses"].get("429", 0) > 0, stats["responses"]
    assert stats["responses"].get("503", 0) > 0, stats["responses"]
    assert {e["outcome"] for e in not_sent} == {"throttled", "unavailable"}
    assert stats["accepted"] == total
    assert stats["duplicate_references"] == 0
    assert status_counts(database_url, campaign_id) == {"sent": total}
    assert (row["sent"], row["failed"]) == (total, 0)
    # Neither 503s (the provider, not the message) nor 429s use attempts: one each, the send.
    assert scalar(database_url, "SELECT max(attempts) FROM sendd.message") == 1
    assert_billing(database_url, "acme", 10_000, total)


def test_provider_that_always_answers_503_holds_and_then_pauses_never_fails(
        tmp_path: Path, database_url: str):
    """503 says the provider is down, not that the messages are bad: they wait queued with no
    attempt used, the account is held back and probed, and once it has been down for
    `retry.provider_down_pause` the campaign is paused with the reason."""
    total = 300
    with FakeProvider("--status-override", "503") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 100}},
                              retry={"max_attempts": 3, "probe_cap": 1.0,
                                     "provider_down_pause": 4.0})
        setup_database(config, {"acme": 1_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(total))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            row = wait_campaign(database_url, campaign_id, "paused", 30)
            assert daemon.events("account_unavailable")
        stats = provider.stats()

    assert status_counts(database_url, campaign_id) == {"queued": total}
    assert scalar(database_url, "SELECT max(attempts) FROM sendd.message") == 0
    assert row["pause_reason"].startswith("account main unreachable for 4 s: HTTP 503"), row
    # Probes (one message each) a second or so apart, not a retry storm.
    assert set(stats["responses"]) == {"503"} and stats["responses"]["503"] < 30
    assert stats["accepted"] == 0
    assert_billing(database_url, "acme", 1_000, 0)


# --- 5. credits -----------------------------------------------------------------------------

def test_credits_run_out_campaign_pauses(tmp_path: Path, database_url: str,
                                         fake_provider: FakeProvider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url)
    setup_database(config, {"acme": 1_000})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(3_000))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        row = wait_campaign(database_url, campaign_id, "paused", 30)
        stays(lambda: fake_provider.stats()["accepted"] <= 1_000, 1.5,
              "nothing sent past the credits after the pause")
        paused_events = daemon.events("campaign_paused")

    assert "credits" in row["pause_reason"]
    assert [e["campaign"] for e in paused_events] == [campaign_id]
    assert status_counts(database_url, campaign_id) == {"sent": 1_000, "queued": 2_000}
    assert fake_provider.stats()["accepted"] == 1_000
    assert credits(database_url, "acme") == 0
    assert campaign(database_url, campaign_id)["status"] == "paused"
    assert_counters_match_rows(database_url, campaign_id)
    assert_billing(database_url, "acme", 1_000, 1_000)


# --- 6. a suspended account -----------------------------------------------------------------

def test_401_suspends_the_account_and_nothing_fails(tmp_path: Path, database_url: str):
    total = 1_000
    with FakeProvider("--status-override", "401") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url)
        setup_database(config, {"acme": 5_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(total))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            wait_until(lambda: daemon.events("account_suspended"), 20, "account_suspended")
            wait_until(lambda: status_counts(database_url) == {"queued": total}, 10,
                       "every message back in the queue")
            requests = provider.stats()["requests"]
            # Several poll intervals: a suspended account is not claimed for.
            stays(lambda: status_counts(database_url) == {"queued": total}
                  and provider.stats()["requests"] == requests and daemon.process.poll() is None,
                  2, "the suspended account left alone")
            events = daemon.events("account_suspended")
        stats = provider.stats()

    assert events[0]["account"] == "main" and "401" in events[0]["reason"]
    assert stats["accepted"] == 0 and set(stats["responses"]) == {"401"}
    assert scalar(database_url, "SELECT count(*) FROM sendd.message "
                                "WHERE attempts > 0 OR error_code IS NOT NULL") == 0
    row = campaign(database_url, campaign_id)
    assert (row["status"], row["sent"], row["failed"]) == ("sending", 0, 0)
    assert_billing(database_url, "acme", 5_000, 0)


# --- 7. batches too large -------------------------------------------------------------------

def test_413_splits_batches_and_everything_is_sent_once(tmp_path: Path, database_url: str):
    total = 3_000
    with FakeProvider("--max-batch", "100") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 500}})
        setup_database(config, {"acme": 5_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(total))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            row = wait_campaign(database_url, campaign_id, "completed", 30)
            splits = daemon.events("batch_too_large")
            sent_sizes = [e["size"] for e in daemon.events("batch_sent")]
        stats = provider.stats()

    assert stats["responses"].get("413", 0) > 0 and splits
    assert max(sent_sizes) <= 100 and sum(sent_sizes) == total
    assert stats["accepted"] == total
    assert stats["duplicate_references"] == 0
    assert status_counts(database_url, campaign_id) == {"sent": total}
    assert (row["sent"], row["failed"]) == (total, 0)
    # One attempt each: the refused requests of the splits used none.
    assert [tuple(r) for r in query(database_url, "SELECT min(attempts), max(attempts) "
                                                  "FROM sendd.message")] == [(1, 1)]
    assert scalar(database_url, "SELECT count(*) FROM sendd.submission") == 0
    assert_billing(database_url, "acme", 5_000, total)


# --- 8. drain on SIGTERM --------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_drains_and_a_new_daemon_finishes_without_duplicates(tmp_path: Path,
                                                                     database_url: str):
    total, stop_timeout = 20_000, 10.0
    with FakeProvider("--latency-ms", "200") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 100}},
                              daemon={"stop_timeout": stop_timeout})
        setup_database(config, {"acme": 50_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(total))["campaign_id"]

        daemon = Daemon(config, tmp_path / "daemon-1.log").wait_ready()
        try:
            wait_until(lambda: status_counts(database_url).get("sent", 0) >= 2_000, 30,
                       "the campaign to be under way")
            assert status_counts(database_url).get("sending", 0) > 0  # work is in flight
            signalled = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(stop_timeout + 5)
            took = time.monotonic() - signalled
        finally:
            daemon.stop()
        assert code == 0, daemon.log()[-3000:]
        assert took < stop_timeout, f"drain took {took:.1f}s"
        assert not daemon.events("drain_timeout")
        assert daemon.events("drain_finished") and daemon.events("daemon_stopped")
        counts = status_counts(database_url)
        assert "sending" not in counts and "unknown" not in counts, counts
        assert counts.get("queued", 0) > 0, "drained before the campaign was half way"
        assert scalar(database_url, "SELECT count(*) FROM sendd.submission") == 0
        assert provider.stats()["accepted"] == counts["sent"]

        with Daemon(config, tmp_path / "daemon-2.log").wait_ready():
            row = wait_campaign(database_url, campaign_id, "completed", 40)
        stats = provider.stats()

    assert stats["accepted"] == total
    assert stats["duplicate_references"] == 0
    assert status_counts(database_url, campaign_id) == {"sent": total}
    assert (row["sent"], row["failed"]) == (total, 0)
    assert_billing(database_url, "acme", 50_000, total)


# --- the rest of the whole-request table, and single-message mode ----------------------------

def test_400_fails_the_batch_with_the_providers_error(tmp_path: Path, database_url: str):
    with FakeProvider("--status-override", "400") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": 50}})
        setup_database(config, {"acme": 1_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(100))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready():
            wait_campaign(database_url, campaign_id, "completed", 30)
        stats = provider.stats()
    rows = query(database_url, "SELECT error_code, attempts, count(*) FROM sendd.message "
                               "GROUP BY error_code, attempts")
    assert [(r["error_code"], r["attempts"], r["count"]) for r in rows] == [("HTTP_400", 1, 100)]
    assert stats["responses"] == {"400": 2}  # no retry: a malformed request stays malformed
    assert_billing(database_url, "acme", 1_000, 0)


def test_402_suspends_the_account_like_a_401(tmp_path: Path, database_url: str):
    with FakeProvider("--status-override", "402") as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url)
        setup_database(config, {"acme": 1_000})
        enqueue(config, tmp_path, "acme", numbers(200))
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            wait_until(lambda: daemon.events("account_suspended"), 20, "account_suspended")
            wait_until(lambda: status_counts(database_url) == {"queued": 200}, 10,
                       "every message back in the queue")
            reason = daemon.events("account_suspended")[0]["reason"]
        assert provider.stats()["accepted"] == 0
    assert "balance" in reason and "402" in reason


def test_single_message_mode_sends_one_request_per_message(tmp_path: Path, database_url: str,
                                                          fake_provider: FakeProvider):
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"single": True, "max_batch": 1}})
    setup_database(config, {"acme": 1_000})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(300))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready():
        wait_campaign(database_url, campaign_id, "completed", 60)
    stats = fake_provider.stats()
    assert status_counts(database_url, campaign_id) == {"sent": 300}
    assert stats["send_requests"] == 300 and stats["accepted"] == 300
    assert stats["duplicate_references"] == 0
    assert scalar(database_url, "SELECT count(*) FROM sendd.message "
                                "WHERE provider_message_id IS NULL") == 0
    assert_billing(database_url, "acme", 1_000, 300)


@pytest.mark.slow
def test_single_message_batches_go_out_as_concurrent_requests_under_one_mark(
        tmp_path: Path, database_url: str):
    """A single-message account sends a batch as one request per message, all at once, with one
    submission mark for the batch; errors are per message and the request limit holds."""
    total, rejected = 2000, 20
    with FakeProvider("--seed", "3", "--error-429-rate", "0.005", "--retry-after", "1",
                      "--error-503-rate", "0.05", "--latency-ms", "20",
                      "--reject-prefix", REJECT_PREFIX) as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"single": True, "max_batch": 50,
                                                 "reqs_per_s": 400}},
                              retry={"max_attempts": 10})
        setup_database(config, {"acme": 10_000})
        recipients = numbers(total - rejected) + numbers(rejected, start=REJECT_START)
        campaign_id = enqueue(config, tmp_path, "acme", recipients)["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            wait_campaign(database_url, campaign_id, "completed", 60)
            sent_batches = daemon.events("batch_sent")
        stats = provider.stats()

    assert stats["responses"].get("429", 0) > 0 and stats["responses"].get("503", 0) > 0
    assert stats["send_requests"] == sum(stats["responses"].values())  # one message each
    assert stats["accepted"] == total - rejected and stats["duplicate_references"] == 0
    assert status_counts(database_url, campaign_id) == {"sent": total - rejected,
                                                        "failed": rejected}
    assert max(e["size"] for e in sent_batches) == 50  # 50 requests under one mark
    assert max(stats["max_reqs_per_1s"].values()) <= 400
    assert_billing(database_url, "acme", 10_000, total - rejected)
