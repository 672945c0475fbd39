"""Backpressure (CONTRACT.md, guarantee 4): with a slow provider, claimed-but-unsent work is
bounded by the channel capacities, and the daemon's memory does not grow with the backlog.

Real processes throughout: PostgreSQL, the fake provider (500 ms a request), `sendd run`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from harness import (
    Daemon,
    FakeProvider,
    enqueue,
    numbers,
    query,
    scalar,
    setup_database,
    status_counts,
    write_config,
)

PIPELINE = {
    "claim_chunk": 500, "claim_capacity": 2, "batch_capacity": 2, "senders": 4,
    "result_capacity": 4, "writer_max_results": 200, "linger_ms": 10, "writer_flush_ms": 10,
}
MAX_BATCH = 100  # the account's max_batch
LATENCY_MS = 500
SAMPLE_SECONDS = 8.0
SMALL_BACKLOG, LARGE_BACKLOG = 20_000, 200_000
RSS_TOLERANCE_MB = 20


def in_flight_bound(pipeline: dict[str, int], max_batch: int) -> int:
    """The most rows that can be `sending` at once, from the configuration alone."""
    chunk = pipeline["claim_chunk"]
    return (
        # poller + claims channel: claim_capacity chunks buffered, one more held by the poller
        # blocked in send, and one of slack
        (pipeline["claim_capacity"] + 2) * chunk
        # the chunk the batcher is cutting into batches (its builder holds less than one chunk)
        + chunk
        # batches buffered between batcher and senders, plus one batch per sender on the wire
        + (pipeline["batch_capacity"] + pipeline["senders"]) * max_batch
        # results buffered for the writer, not yet written
        + pipeline["result_capacity"] * max_batch
        # the writer's pending group commit: it flushes once it reaches writer_max_results,
        # so it holds at most writer_max_results - 1 plus one more result of max_batch
        + pipeline["writer_max_results"] + max_batch
    )


def rss_mb(pid: int) -> float:
    """The process's resident set size (VmRSS), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def sample(database_url: str, daemon: Daemon, seconds: float) -> tuple[list[int], list[float]]:
    """`sending` rows and the daemon's RSS, every 100 ms for `seconds`."""
    sending, rss = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert daemon.process.poll() is None, daemon.log()[-3000:]
        sending.append(scalar(database_url,
                              "SELECT count(*) FROM sendd.message WHERE status = 'sending'"))
        rss.append(rss_mb(daemon.process.pid))
        time.sleep(0.1)
    return sending, rss


def fill_backlog(database_url: str, campaign_id: int, target: int) -> None:
    """Insert straight into sendd.message (the integration surface) up to `target` queued."""
    queued = status_counts(database_url, campaign_id).get("queued", 0)
    first = scalar(database_url, "SELECT count(*) FROM sendd.message")
    query(database_url, """
        INSERT INTO sendd.message (tenant_id, campaign_id, account, sender, recipient, body)
        SELECT 'acme', $1, 'main', 'sendd', '+3069' || lpad(g::text, 8, '0'), 'Hello from sendd'
        FROM generate_series($2::bigint, $3::bigint) AS g
    """, campaign_id, first, first + target - queued - 1)
    assert status_counts(database_url, campaign_id)["queued"] == target


def drain(daemon: Daemon, provider: FakeProvider) -> None:
    provider.control(latency_ms=0)  # let the drain finish what it holds quickly
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, daemon.log()[-3000:]
    provider.control(latency_ms=LATENCY_MS)


@pytest.mark.slow
def test_claimed_work_is_bounded_and_memory_is_flat(tmp_path: Path, database_url: str):
    bound = in_flight_bound(PIPELINE, MAX_BATCH)
    assert bound == 3_800  # (2+2)*500 + 500 + (2+4)*100 + 4*100 + 200+100
    with FakeProvider("--latency-ms", str(LATENCY_MS)) as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url,
                              accounts={"main": {"max_batch": MAX_BATCH}}, pipeline=PIPELINE)
        setup_database(config, {"acme": 1_000_000})
        campaign_id = enqueue(config, tmp_path, "acme", numbers(SMALL_BACKLOG))["campaign_id"]

        results = {}
        for backlog, log in ((SMALL_BACKLOG, "daemon-small.log"),
                             (LARGE_BACKLOG, "daemon-large.log")):
            fill_backlog(database_url, campaign_id, backlog)
            daemon = Daemon(config, tmp_path / log).wait_ready()
            try:
                sending, rss = sample(database_url, daemon, SAMPLE_SECONDS)
                drain(daemon, provider)
            finally:
                daemon.stop()
            results[backlog] = (sending, rss)
            assert status_counts(database_url).get("sending", 0) == 0

            peak = max(sending)
            # Bounded by the configuration, far below the backlog ...
            assert peak <= bound, f"{peak} rows sending with {backlog} queued (bound {bound})"
            assert peak < backlog // 5
            # ... and the pipeline really was full (the bound was tested, not idled under).
            assert peak >= (PIPELINE["batch_capacity"] + PIPELINE["senders"]) * MAX_BATCH
            # The provider was the bottleneck: about 4 senders x 100 messages / 0.5 s.
            assert status_counts(database_url).get("queued", 0) > backlog // 3
        stats = provider.stats()

    assert stats["duplicate_references"] == 0
    # Memory: the steady-state peak (second half of the samples, after warm-up) is the same
    # with 10 times the backlog.
    small_rss = max(results[SMALL_BACKLOG][1][len(results[SMALL_BACKLOG][1]) // 2:])
    large_rss = max(results[LARGE_BACKLOG][1][len(results[LARGE_BACKLOG][1]) // 2:])
    print(f"RSS {small_rss:.1f} MB with {SMALL_BACKLOG:,} queued, {large_rss:.1f} MB with "
          f"{LARGE_BACKLOG:,}; peak sending {max(results[SMALL_BACKLOG][0])}, "
          f"{max(results[LARGE_BACKLOG][0])} (bound {bound})")
    assert abs(large_rss - small_rss) < RSS_TOLERANCE_MB
