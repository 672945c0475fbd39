"""Ambiguous outcomes (PROVIDERS.md "Ambiguous outcomes"), end to end.

The fake provider accepts and records each batch, then answers only after `hang_seconds`, long
after the account's 1.5 s client timeout: the daemon cannot tell whether the batch went out.
It must never resend such a batch blindly; the settler looks every reference up and marks what
it finds `sent`, and what it cannot settle within `pipeline.settle_seconds` becomes `unknown`
with the reason. Real processes throughout: PostgreSQL, the fake provider, `sendd run`.
"""

from __future__ import annotations

from harness import (
    Daemon,
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

MESSAGES = 200
CREDITS = 10_000


def open_marks(url: str) -> int:
    return scalar(url, "SELECT count(*) FROM sendd.submission")


def test_ambiguous_batches_are_settled_by_lookup_never_resent(tmp_path, database_url,
                                                              fake_provider):
    fake_provider.control(hang_rate=1.0, hang_seconds=5.0)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50}})
    setup_database(config, {"acme": CREDITS})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(MESSAGES))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        # Every request times out client-side while the fake has already accepted it.
        wait_until(lambda: daemon.events("batch_not_sent"), 15, "an ambiguous batch")
        # Settled by lookup while sends still hang: the lookups alone say they went out.
        wait_until(lambda: daemon.events("batch_settled"), 15, "a batch settled by lookup")
        fake_provider.control(hang_rate=0.0)
        wait_until(lambda: status_counts(database_url, campaign_id).get("sent") == MESSAGES
                   and open_marks(database_url) == 0, 60, "every message settled as sent")
        assert daemon.process.poll() is None
        not_sent = daemon.events("batch_not_sent")
        settled = daemon.events("batch_settled")

    assert all(e["outcome"] == "ambiguous" for e in not_sent), not_sent
    assert settled, "no batch_settled event in the daemon log"
    ambiguous = sum(e["size"] for e in not_sent)
    assert ambiguous >= 50, not_sent
    assert sum(e.get("sent", 0) for e in settled) == ambiguous  # every one found: sent
    assert all(e.get("unknown", 0) == 0 and e.get("retry", 0) == 0 for e in settled)
    rows = query(database_url, "SELECT status, provider_message_id, attempts, error_code "
                               "FROM sendd.message WHERE campaign_id = $1", campaign_id)
    assert len(rows) == MESSAGES
    assert {r["status"] for r in rows} == {"sent"}
    assert all(r["provider_message_id"] for r in rows)
    assert len({r["provider_message_id"] for r in rows}) == MESSAGES
    assert all(r["error_code"] is None for r in rows)

    stats = fake_provider.stats()
    assert stats["duplicate_references"] == 0, stats  # never resent
    assert stats["messages"] == MESSAGES, stats  # each reference went out exactly once
    assert stats["accepted"] == MESSAGES, stats
    # The ids the daemon stored are the ones the provider gave at the (lost) acceptance.
    provider_ids = {r["provider_message_id"] for r in rows}
    assert all(pid.startswith("b-") for pid in provider_ids)

    row = campaign(database_url, campaign_id)
    assert (row["status"], row["sent"], row["unknown"], row["failed"]) == (
        "completed", MESSAGES, 0, 0)
    assert send_debits(database_url, "acme") == MESSAGES
    assert scalar(database_url, "SELECT credits FROM sendd.tenant WHERE id = 'acme'") == (
        CREDITS - MESSAGES)


def test_unsettled_batches_end_unknown_and_are_not_billed(tmp_path, database_url, fake_provider):
    settle_seconds = 3.0
    fake_provider.control(hang_rate=1.0, hang_seconds=5.0, lookup_fail=True)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50}},
                          pipeline={"settle_seconds": settle_seconds})
    setup_database(config, {"acme": CREDITS})
    hung = enqueue(config, tmp_path, "acme", numbers(MESSAGES))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        # Lookups fail for the whole settlement window: nothing can be settled.
        row = wait_campaign(database_url, hung, "completed", 60)
        wait_until(lambda: open_marks(database_url) == 0, 10, "every mark closed")
        settled = daemon.events("batch_settled")

        # Later work on a healthy provider is sent and billed; the unknown ones stay unbilled
        # and are still never resent.
        fake_provider.control(hang_rate=0.0)
        healthy = enqueue(config, tmp_path, "acme", numbers(100, start=MESSAGES))["campaign_id"]
        wait_campaign_done = wait_campaign(database_url, healthy, "completed", 60)
        # A resend of an unknown message, if any, would show up by now.
        stays(lambda: (stats := fake_provider.stats())["messages"] == MESSAGES + 100
              and stats["duplicate_references"] == 0, 1, "no unknown message resent")
        assert daemon.process.poll() is None

    assert status_counts(database_url, hung) == {"unknown": MESSAGES}
    rows = query(database_url, "SELECT error_code, error_text, provider_message_id, lease_owner "
                               "FROM sendd.message WHERE campaign_id = $1", hung)
    assert {r["error_code"] for r in rows} == {"UNSETTLED"}
    for r in rows:
        assert r["error_text"] and "settlement window" in r["error_text"], r
        assert "lookup failed: HTTP 500" in r["error_text"], r
        assert r["provider_message_id"] is None and r["lease_owner"] is None
    assert (row["unknown"], row["sent"], row["failed"], row["total"]) == (MESSAGES, 0, 0,
                                                                          MESSAGES)
    assert sum(e.get("unknown", 0) for e in settled) == MESSAGES
    assert wait_campaign_done["sent"] == 100

    stats = fake_provider.stats()
    assert stats["duplicate_references"] == 0, stats  # none was resent
    assert stats["messages"] == MESSAGES + 100, stats
    # Credits: only the accepted (sent) messages are debited, never the unknown ones.
    assert send_debits(database_url, "acme") == 100
    assert scalar(database_url, "SELECT credits FROM sendd.tenant WHERE id = 'acme'") == (
        CREDITS - 100)
    assert scalar(database_url, "SELECT count(*) FROM sendd.credit_ledger "
                                "WHERE campaign_id = $1", hung) == 0
