"""Kill storm: daemons sending a campaign are SIGKILLed at random moments and restarted.

At the end every message must be final (or `unknown`, with a reason), the provider must have
seen no reference twice, and the credit ledger must match what the provider accepted.

    python load/killstorm.py --messages 200000 --kills 15            # one daemon
    python load/killstorm.py --messages 200000 --kills 15 --daemons 3

The test suite runs the same storm at a small size (tests/test_killstorm.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "tests")]

from harness import (  # noqa: E402 -- after the path set-up above
    Daemon,
    FakeProvider,
    enqueue,
    numbers,
    query,
    scalar,
    setup_database,
    status_counts,
    wait_until,
    write_config,
)

FINAL = {"sent", "delivered", "undelivered", "failed", "cancelled"}


def run_storm(workdir: Path, database_url: str, *, messages: int, kills: int, daemons: int = 1,
              seed: int = 1, rate: int = 0, max_batch: int = 1000,
              settle_timeout: float = 600) -> dict[str, Any]:
    """Run the storm and return its figures; raises AssertionError when a guarantee broke.

    `rate` (messages/s, 0 = unlimited) stretches a small campaign over the whole storm, so
    every kill lands while messages are in flight; a small `max_batch` makes requests
    frequent, so kills also land between a submission mark and its outcome.
    """
    rng = random.Random(seed)
    with FakeProvider("--latency-ms", "20", "--jitter-ms", "30", "--seed", str(seed)) as fake:
        config = write_config(workdir / "sendd.toml", database_url, fake.url,
                              accounts={"main": {"msgs_per_s": rate, "max_batch": max_batch}},
                              retry={"max_attempts": 10})
        setup_database(config, {"storm": messages * 2})
        campaign = enqueue(config, workdir, "storm", numbers(messages))["campaign_id"]
        started = time.monotonic()
        fleet = [_start(config, workdir, i, 0) for i in range(daemons)]
        for kill in range(1, kills + 1):
            time.sleep(rng.uniform(0.5, 2.5))
            victim = rng.randrange(daemons)
            fleet[victim].kill()
            fleet[victim] = _start(config, workdir, victim, kill)
        sending_done = wait_until(lambda: _settled(database_url), settle_timeout,
                                  "every message to reach a final status")
        elapsed = time.monotonic() - started
        for daemon in fleet:
            daemon.stop()
        return _figures(database_url, fake.stats(), campaign, messages, kills, daemons,
                        elapsed, sending_done)


def _start(config: Path, workdir: Path, slot: int, generation: int) -> Daemon:
    return Daemon(config, workdir / f"daemon-{slot}-{generation}.log").wait_ready(60)


def _settled(database_url: str) -> bool:
    counts = status_counts(database_url)
    return not counts.get("queued") and not counts.get("sending")


def _figures(database_url: str, stats: dict[str, Any], campaign: int, messages: int,
             kills: int, daemons: int, elapsed: float, _: Any) -> dict[str, Any]:
    counts = status_counts(database_url)
    accepted_rows = sum(counts.get(s, 0) for s in ("sent", "delivered", "undelivered"))
    debited = -int(scalar(database_url, "SELECT coalesce(sum(delta), 0) FROM sendd.credit_ledger "
                                    "WHERE reason = 'send'"))
    accepted_segments = int(scalar(database_url, "SELECT coalesce(sum(segments), 0) FROM "
                                                 "sendd.message WHERE status IN "
                                                 "('sent', 'delivered', 'undelivered')"))
    campaign_row = query(database_url, "SELECT * FROM sendd.campaign WHERE id = $1", campaign)[0]
    return {
        "messages": messages, "daemons": daemons, "kills": kills,
        "elapsed_s": round(elapsed, 1), "statuses": counts,
        "lost": messages - sum(n for s, n in counts.items() if s in FINAL or s == "unknown"),
        "unknown": counts.get("unknown", 0),
        "duplicates": stats["duplicate_references"],
        "provider_accepted": stats["accepted"], "accepted_rows": accepted_rows,
        "ledger_debited": debited, "accepted_segments": accepted_segments,
        "campaign_status": campaign_row["status"], "campaign_sent": campaign_row["sent"],
    }


def check(figures: dict[str, Any]) -> None:
    """The guarantees, as assertions with the figures in the message."""
    assert figures["lost"] == 0, figures
    assert figures["duplicates"] == 0, figures
    assert figures["provider_accepted"] == figures["accepted_rows"], figures
    assert figures["ledger_debited"] == figures["accepted_segments"], figures
    assert figures["campaign_sent"] == figures["accepted_rows"], figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--daemons", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=int, default=0, help="account messages/s (0: unlimited)")
    args = parser.parse_args()
    from sendd.dev.pgserver import PrivatePostgres

    with tempfile.TemporaryDirectory(prefix="sendd-killstorm-") as tmp, \
            PrivatePostgres(durable=True) as pg:
        figures = run_storm(Path(tmp), pg.url, messages=args.messages, kills=args.kills,
                            daemons=args.daemons, seed=args.seed, rate=args.rate)
    print(json.dumps(figures, indent=2))
    check(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
