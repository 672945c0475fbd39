"""A provider that goes away holds its account's messages back; it never fails them.

Real processes throughout: PostgreSQL, `sendd run`, and the fake provider, which is *stopped*
(nothing listens on its port: connections are refused) and started again on the same port, so
each test sums what the fakes before and after accepted to prove every message was sent once.
Also here: a slow provider costs one batch of settlement, not a campaign, and `campaign cancel`
takes back what is claimed but not yet on the wire.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness import (
    Daemon,
    FakeProvider,
    campaign,
    enqueue,
    http_url,
    numbers,
    query,
    scalar,
    sendd_json,
    setup_database,
    status_counts,
    stays,
    wait_campaign,
    wait_until,
    write_config,
)
from sendd.dev.pgserver import free_port

OUTAGE = 60.0  # seconds, as issue 13 asks


def fake_on(port: int) -> FakeProvider:
    return FakeProvider("--port", str(port))


def health(config: Path) -> httpx.Response:
    return httpx.get(http_url(config, "/healthz"), timeout=5)


def attempts_used(url: str) -> list[dict]:
    """Queued messages that used an attempt (a provider outage must use none)."""
    return [dict(r) for r in query(url, "SELECT id, attempts, error_code, error_text FROM "
                                        "sendd.message WHERE status = 'queued' AND attempts > 0")]


def held_back(url: str, campaign_id: int, allowed: set[str]) -> bool:
    """Only `allowed` statuses in the campaign, and no attempt used by a queued message."""
    return set(status_counts(url, campaign_id)) <= allowed and not attempts_used(url)


def accepted_by(fake: FakeProvider) -> Counter[str]:
    """How often the fake accepted each reference (read it before it stops)."""
    return Counter({e["reference"]: e["count"] for e in fake.references()})


def assert_sent_once(url: str, campaign_id: int, messages: int, accepted: Counter[str],
                     credits: int) -> None:
    """Every message sent exactly once: `accepted` sums the fakes that ran one after another."""
    assert len(accepted) == messages
    assert max(accepted.values()) == 1, "a message was sent twice"
    assert status_counts(url, campaign_id) == {"sent": messages}
    row = campaign(url, campaign_id)
    assert (row["status"], row["sent"], row["failed"], row["unknown"]) == (
        "completed", messages, 0, 0), row
    # One attempt each: the one that was accepted; the outage used none.
    assert scalar(url, "SELECT max(attempts) FROM sendd.message") == 1
    assert scalar(url, "SELECT count(*) FROM sendd.submission") == 0
    debited = -scalar(url, "SELECT sum(delta) FROM sendd.credit_ledger WHERE reason = 'send'")
    assert debited == messages
    assert scalar(url, "SELECT credits FROM sendd.tenant WHERE id = 'acme'") == credits - messages


@pytest.mark.slow
def test_a_minute_long_outage_mid_campaign_fails_nothing(tmp_path, database_url):
    messages, credits = 3000, 10_000
    port = free_port()
    first = fake_on(port)
    config = write_config(tmp_path / "sendd.toml", database_url, first.url,
                          accounts={"main": {"max_batch": 50, "msgs_per_s": 200}},
                          retry={"probe_cap": 4.0})
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    fakes = [first]
    try:
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            wait_until(lambda: status_counts(database_url).get("sent", 0) >= 300, 30, "300 sent")
            first.control(status_override=503)  # accepts nothing more from here on ...
            accepted = accepted_by(first)
            first.stop()  # ... and goes away: connections are refused
            down_at = time.monotonic()
            wait_until(lambda: daemon.events("account_unavailable"), 10, "the breaker to open")
            reply = health(config)
            assert reply.status_code == 503
            assert any("account main: provider unreachable" in r
                       for r in reply.json()["reasons"]), reply.json()
            metrics = httpx.get(http_url(config, "/metrics")).text
            assert 'sendd_account_breaker{account="main",state="open"} 1.0' in metrics
            status = sendd_json(config, "ctl", "status", "--json")
            assert status["accounts"]["main"]["breaker"]["state"] in ("open", "probing")
            # Held back for the rest of the minute, checked throughout: nothing failed and no
            # attempt was used (a probe's claim shows as `sending` for a moment).
            stays(lambda: held_back(database_url, campaign_id, {"sent", "queued", "sending"}),
                  max(0.0, OUTAGE - (time.monotonic() - down_at)), "holding back", interval=1.0)
            during = status_counts(database_url, campaign_id)
            assert set(during) <= {"sent", "queued"}, during  # held back, nothing failed
            used = attempts_used(database_url)
            assert not used, used[:5]
            second = fake_on(port)
            fakes.append(second)
            wait_campaign(database_url, campaign_id, "completed", 60, interval=0.5)
            assert daemon.events("account_recovered")
            # Probes were spaced by the backoff, capped at retry.probe_cap: a few dozen, not
            # thousands of failed requests.
            assert len(daemon.events("batch_not_sent")) < 40
            assert health(config).status_code == 200
            accepted += accepted_by(second)
        assert_sent_once(database_url, campaign_id, messages, accepted, credits)
    finally:
        for fake in fakes:
            fake.stop()


@pytest.mark.slow
def test_a_provider_down_for_the_first_minute(tmp_path, database_url):
    messages, credits = 2000, 10_000
    port = free_port()
    config = write_config(tmp_path / "sendd.toml", database_url, f"http://127.0.0.1:{port}",
                          accounts={"main": {"max_batch": 100}}, retry={"probe_cap": 4.0})
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    fakes: list[FakeProvider] = []
    try:
        with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
            stays(lambda: held_back(database_url, campaign_id, {"queued", "sending"})
                  and campaign(database_url, campaign_id)["status"] == "sending",
                  OUTAGE, "every message held back, the campaign sending", interval=1.0)
            assert status_counts(database_url, campaign_id) == {"queued": messages}
            assert campaign(database_url, campaign_id)["status"] == "sending"
            fakes.append(fake_on(port))
            wait_campaign(database_url, campaign_id, "completed", 60, interval=0.5)
            assert daemon.events("account_recovered")
        assert_sent_once(database_url, campaign_id, messages, accepted_by(fakes[0]), credits)
    finally:
        for fake in fakes:
            fake.stop()


def test_an_account_down_too_long_pauses_its_campaigns_with_the_reason(tmp_path, database_url):
    port = free_port()
    config = write_config(tmp_path / "sendd.toml", database_url, f"http://127.0.0.1:{port}",
                          retry={"probe_cap": 1.0, "provider_down_pause": 3.0})
    setup_database(config, {"acme": 1000})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(50))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        row = wait_campaign(database_url, campaign_id, "paused", 20, interval=0.3)
        assert daemon.events("campaign_paused")
    assert row["pause_reason"].startswith("account main unreachable for 3 s: connection failed")
    assert status_counts(database_url, campaign_id) == {"queued": 50}
    assert scalar(database_url, "SELECT max(attempts) FROM sendd.message") == 0  # none used


def test_a_slow_provider_costs_one_batch_of_settlement_not_the_campaign(tmp_path, database_url,
                                                                       fake_provider):
    """Answers take 2 s against a 0.7 s timeout: the first batch is ambiguous and settled (its
    lookups are slow too: unknown); after it, only one-message probes go out until the provider
    is fast again, and then the rest is sent."""
    messages, batch = 2000, 500
    fake_provider.control(latency_ms=2000)
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": batch, "timeout": 0.7}},
                          pipeline={"senders": 1, "settle_seconds": 2.0},
                          retry={"probe_cap": 2.0})
    setup_database(config, {"acme": 10_000})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready() as daemon:
        # Still slow through a second probe (they are spaced by the backoff).
        wait_until(lambda: len(daemon.events("account_probe_failed")) >= 2, 30,
                   "two failed probes")
        fake_provider.control(latency_ms=0)
        wait_campaign(database_url, campaign_id, "completed", 60, interval=0.5)
        probes = [e for e in daemon.events("batch_not_sent") if e["size"] == 1]
    counts = status_counts(database_url, campaign_id)
    # The first batch and the probes were ambiguous; nothing else was exposed.
    assert counts.get("unknown", 0) + counts.get("sent", 0) == messages, counts
    assert counts.get("unknown", 0) <= batch + len(probes), (counts, len(probes))
    assert len(probes) >= 1
    assert fake_provider.stats()["duplicate_sends"] == 0


@pytest.mark.slow
def test_cancel_takes_back_what_is_claimed_but_not_on_the_wire(tmp_path, database_url,
                                                              fake_provider):
    messages, credits = 3000, 10_000
    config = write_config(tmp_path / "sendd.toml", database_url, fake_provider.url,
                          accounts={"main": {"max_batch": 50, "msgs_per_s": 200}},
                          pipeline={"claim_chunk": 1000})
    setup_database(config, {"acme": credits})
    campaign_id = enqueue(config, tmp_path, "acme", numbers(messages))["campaign_id"]
    with Daemon(config, tmp_path / "daemon.log").wait_ready():
        wait_until(lambda: status_counts(database_url).get("sent", 0) >= 200, 30, "200 sent")
        claimed = status_counts(database_url).get("sending", 0)
        # About a second of the rate is claimed ahead (the scheduler's room for the account).
        assert claimed >= 100, "the test needs claims waiting for the rate governor"
        answer = sendd_json(config, "campaign", "cancel", str(campaign_id))
        accepted_at_cancel = fake_provider.stats()["accepted"]
        wait_until(lambda: not status_counts(database_url, campaign_id).get("sending"), 15,
                   "the requests on the wire to finish")
        done = fake_provider.stats()["accepted"]
        stays(lambda: fake_provider.stats()["accepted"] == done, 1.0,
              "nothing more sent once the requests on the wire finished")
    counts = status_counts(database_url, campaign_id)
    assert set(counts) == {"sent", "cancelled"}, counts
    # What was not on the wire was cancelled, and the answer counted it.
    assert answer["cancelled"] >= messages - accepted_at_cancel - answer["in_flight"], answer
    assert answer["cancelled"] == counts["cancelled"], (answer, counts)
    assert fake_provider.stats()["accepted"] == counts["sent"]
    assert fake_provider.stats()["accepted"] <= accepted_at_cancel + answer["in_flight"]
    debited = -scalar(database_url, "SELECT sum(delta) FROM sendd.credit_ledger "
                                    "WHERE reason = 'send'")
    assert debited == counts["sent"]
