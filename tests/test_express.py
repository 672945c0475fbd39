"""The express lane: a transactional message does not wait behind a full campaign pipeline."""

from __future__ import annotations

import time
from pathlib import Path

from harness import (
    Daemon,
    FakeProvider,
    enqueue,
    numbers,
    query,
    scalar,
    setup_database,
    wait_until,
    write_config,
)

# A slow provider and few senders keep the campaign pipeline's channels full: 6 chunks of 200
# claimed messages waiting at 2 x 200 messages per second means ~3 s for anything queued behind.
PIPELINE = {"claim_chunk": 200, "senders": 2, "claim_capacity": 4, "batch_capacity": 2}


def test_transactional_messages_overtake_a_full_campaign_pipeline(tmp_path: Path,
                                                                   database_url: str) -> None:
    with FakeProvider("--latency-ms", "1000") as fake:
        config = write_config(tmp_path / "sendd.toml", database_url, fake.url,
                              accounts={"main": {"max_batch": 200, "timeout": 3.0}},
                              pipeline={**PIPELINE, "lease_seconds": 10.0})
        setup_database(config, {"shop": 100_000})
        campaign_id = enqueue(config, tmp_path, "shop", numbers(6_000))["campaign_id"]
        with Daemon(config, tmp_path / "daemon.log").wait_ready():
            wait_until(lambda: fake.stats()["accepted"] >= 400, 30, "the campaign to be sending")
            for n in range(5):
                enqueue(config, tmp_path, "shop", numbers(1, start=50_000_000 + n),
                        "--transactional")
                time.sleep(0.2)
            rows = query(database_url, "SELECT id::text, extract(epoch FROM created_at) AS at "
                                       "FROM sendd.message WHERE campaign_id IS NULL")
            queued_at = {row["id"]: float(row["at"]) for row in rows}
            wait_until(lambda: all(fake.accepted_at(list(queued_at)).values()), 20,
                       "the transactional messages to be accepted")
            accepted = fake.accepted_at(list(queued_at))
            still_queued = scalar(database_url, "SELECT count(*) FROM sendd.message "
                                                "WHERE campaign_id = $1 AND status = 'queued'",
                                  campaign_id)
        waits = [accepted[ref] - queued_at[ref] for ref in queued_at]
        # Each went out within its own claim and one provider round trip (the answer takes 1 s,
        # acceptance is recorded on arrival), not behind the ~1,200 claimed campaign messages.
        assert max(waits) < 1.0, waits
        assert still_queued > 1_000  # the campaign was still far from done meanwhile
        assert fake.stats()["duplicate_references"] == 0
