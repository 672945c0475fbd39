"""A provider's strings cannot jam the writer (issue 13, item 6), end to end.

Real processes: PostgreSQL, the fake provider told to answer ids PostgreSQL text cannot hold
(`"bad\\u0000id-..."`, valid JSON), and `sendd run`. Before the fix the writer's flush raised on
such an id, its results (from many batches) were dropped and stayed `sending` under the
daemon's live lease, and after a restart the settler's lookup brought the same id back.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from harness import (
    Daemon,
    enqueue,
    http_url,
    numbers,
    query,
    scalar,
    setup_database,
    status_counts,
    stays,
    wait_until,
    write_config,
)

BAD_PREFIX = "bad\u0000id-"
CREDITS = 10_000


def send_debits(url: str) -> int:
    return -scalar(url, "SELECT coalesce(sum(delta), 0) FROM sendd.credit_ledger "
                        "WHERE reason = 'send'")


def open_marks(url: str) -> int:
    return scalar(url, "SELECT count(*) FROM sendd.submission")


def assert_sent_once(url: str, fake_provider, count: int) -> None:
    assert status_counts(url) == {"sent": count}
    stats = fake_provider.stats()
    assert stats["duplicate_references"] == 0 and stats["accepted"] == count, stats
    assert send_debits(url) == count  # every accepted message billed, id or not
    assert open_marks(url) == 0


def test_ids_no_database_can_hold_do_not_jam_the_writer(tmp_path: Path, database_url: str,
                                                        fake_provider) -> None:
    fake_provider.control(message_id_prefix=BAD_PREFIX)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50}})
    setup_database(config, {"acme": CREDITS})
    enqueue(config, tmp_path, "acme", numbers(300))
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url) == {"sent": 300}, 40, "all sent")
        # Later answers with sane ids are stored with them.
        fake_provider.control(message_id_prefix="")
        enqueue(config, tmp_path, "acme", numbers(50, start=300))
        wait_until(lambda: status_counts(database_url) == {"sent": 350}, 30, "the rest sent")
        assert daemon.process.poll() is None
        assert not daemon.events("actor_crashed"), daemon.events("actor_crashed")
    assert_sent_once(database_url, fake_provider, 350)
    ids = query(database_url, "SELECT provider_message_id AS pid, bulk_id FROM sendd.message "
                              "ORDER BY sendd.message.id")
    # An accepted message is sent; an id that is no sane id is not kept (a cleaned-up one
    # would be somebody else's), the bulk id the provider gave is.
    assert all(r["pid"] is None and r["bulk_id"] for r in ids[:300])
    assert all(r["pid"] and r["pid"].startswith("b-") for r in ids[300:])


def test_after_kill_9_the_lookups_bad_ids_do_not_jam_the_settlement(
        tmp_path: Path, database_url: str, fake_provider) -> None:
    # Every request is accepted but answered too late: the batches are ambiguous and must be
    # looked up, and each lookup answers an id no database can hold.
    fake_provider.control(hang_rate=1.0, hang_seconds=4.0, message_id_prefix=BAD_PREFIX)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50}},
                          pipeline={"settle_seconds": 20.0})
    setup_database(config, {"acme": CREDITS})
    enqueue(config, tmp_path, "acme", numbers(200))
    with Daemon(config, tmp_path / "first.log").wait_ready() as first:
        wait_until(lambda: first.events("batch_not_sent"), 20, "an ambiguous batch")
        first.kill()  # with marks open: the next daemon settles them by lookup
    assert open_marks(database_url) > 0
    fake_provider.control(hang_rate=0.0)
    with Daemon(config, tmp_path / "second.log").wait_ready() as second:
        wait_until(lambda: status_counts(database_url).get("sent", 0) >= 200
                   and open_marks(database_url) == 0, 60, "everything settled and sent")
        assert second.process.poll() is None
        assert not second.events("actor_crashed"), second.events("actor_crashed")
        assert second.events("batch_settled")
    assert_sent_once(database_url, fake_provider, 200)


# The database refuses one message's `sent` as the sender and the writer's safe form bring it
# (a trigger standing for an application's constraint), but not as the settler's lookup does.
REFUSE_ONE = """
CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'sent' AND (NEW.bulk_id IS NOT NULL OR NEW.provider_message_id IS NULL) THEN
        RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
---
CREATE TRIGGER refuse_one BEFORE UPDATE ON sendd.message FOR EACH ROW
WHEN (NEW.id = {id}) EXECUTE FUNCTION refuse_one();
"""


def test_an_outcome_the_database_refuses_is_settled_and_the_others_stored(
        tmp_path: Path, database_url: str, fake_provider) -> None:
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 20}})
    setup_database(config, {"acme": CREDITS})
    enqueue(config, tmp_path, "acme", numbers(200))
    refused_id = scalar(database_url, "SELECT min(id) + 7 FROM sendd.message")
    for statement in REFUSE_ONE.format(id=refused_id).split("---"):
        query(database_url, statement)
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url) == {"sent": 200}
                   and open_marks(database_url) == 0, 40, "all sent, the refused one settled")
        assert daemon.process.poll() is None
        assert not daemon.events("actor_crashed"), daemon.events("actor_crashed")
        [not_stored] = daemon.events("outcomes_not_stored")
        [settled] = daemon.events("batch_settled")
    assert not_stored["count"] == 1
    assert settled["sent"] == 1
    assert_sent_once(database_url, fake_provider, 200)
    refused = query(database_url, "SELECT provider_message_id, bulk_id FROM sendd.message "
                                  "WHERE id = $1", refused_id)[0]
    assert refused["provider_message_id"].startswith("b-") and refused["bulk_id"] is None


@pytest.mark.slow
def test_messages_stuck_in_sending_keep_the_daemon_unhealthy(tmp_path: Path, database_url: str,
                                                             fake_provider) -> None:
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"timeout": 0.5}},
                          pipeline={"lease_seconds": 4.0, "settle_seconds": 1.0})
    setup_database(config, {"acme": CREDITS})
    enqueue(config, tmp_path, "acme", numbers(3))
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        wait_until(lambda: status_counts(database_url) == {"sent": 3}, 20, "sent")
        health = http_url(config, "/healthz")
        assert httpx.get(health).status_code == 200
        # A mark of this daemon that no actor will ever close (as a lost result would leave).
        query(database_url, "INSERT INTO sendd.submission (instance_id, account, message_ids) "
                            "SELECT id, 'main', '{}' FROM sendd.instance")
        # Young, for a second: a request may be on the wire under it.
        stays(lambda: httpx.get(health).status_code == 200, 1.0, "/healthz 200 for a young mark")
        # Stuck after 2 x the 0.5 s timeout + 1 s of settlement + the 4 s lease.
        answer = wait_until(lambda: (r := httpx.get(health)).status_code == 503 and r, 20,
                            "/healthz to report the stuck mark")
        assert "reaper: 1 submission mark(s)" in answer.text, answer.text
        metrics = httpx.get(http_url(config, "/metrics")).text
        assert "sendd_stale_marks 1.0" in metrics
        # It stays reported while it is stuck (problems fade after 12 s).
        stays(lambda: httpx.get(health).status_code == 503, 13, "/healthz 503 for a stuck mark",
              interval=0.5)
        assert len(daemon.events("marks_stale")) == 1
