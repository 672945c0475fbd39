"""A provider outage, tried from outside: N messages with no rate limit, the fake provider
stopped (nothing listens on its port) for OUTAGE seconds once 30 % are sent, then started again
on the same port. Prints the statuses every 30 s and, at the end, whether every message was sent
exactly once (summed over both fakes), the ledger and the attempts used.

    .venv/bin/python load/outage.py --outage 600 --messages 100000
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "tests")]

from harness import (  # noqa: E402 -- needs the path set-up above
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
from sendd.dev.pgserver import PrivatePostgres  # noqa: E402


def accepted_by(fake: FakeProvider) -> Counter[str]:
    return Counter({e["reference"]: e["count"] for e in fake.references()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--messages", type=int, default=100_000, help="(default 100000)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sendd-outage-"))
    with PrivatePostgres(durable=False) as pg, socket.socket() as probe:
        url = pg.create_database("outage")
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        fake = FakeProvider("--port", str(port))
        config = write_config(work / "sendd.toml", url, fake.url,
                              pipeline={"claim_chunk": 1000, "senders": 8,
                                        "lease_seconds": 30.0, "settle_seconds": 60.0})
        setup_database(config, {"acme": args.messages * 2})
        campaign = enqueue(config, work, "acme", numbers(args.messages))["campaign_id"]
        with Daemon(config, work / "daemon.log").wait_ready() as daemon:
            wait_until(lambda: status_counts(url).get("sent", 0) >= args.messages * 0.3, 300,
                       "30 % sent", 0.05)
            fake.control(status_override=503)  # accepts nothing more from here on ...
            accepted = accepted_by(fake)
            fake.stop()  # ... and goes away
            down = time.monotonic()
            print("provider stopped:", status_counts(url), flush=True)
            while time.monotonic() - down < args.outage:
                time.sleep(min(30.0, args.outage - (time.monotonic() - down)))
                print(f"{time.monotonic() - down:5.0f} s:", status_counts(url), flush=True)
            back = FakeProvider("--port", str(port))
            wait_until(lambda: query(url, "SELECT status FROM sendd.campaign WHERE id = $1",
                                     campaign)[0][0] == "completed", 600, "completed", 0.5)
            accepted += accepted_by(back)
            back.stop()
            events = {k: len(daemon.events(k)) for k in (
                "account_unavailable", "account_probe_failed", "account_recovered",
                "batch_settled")}
        print("daemon events:", events)
        print("final statuses:", status_counts(url))
        print(f"accepted by the provider: {len(accepted)} distinct, "
              f"sent more than once: {sum(1 for c in accepted.values() if c > 1)}")
        print("debited:", scalar(url, "SELECT -sum(delta) FROM sendd.credit_ledger "
                                      "WHERE reason = 'send'"),
              "max attempts:", scalar(url, "SELECT max(attempts) FROM sendd.message"))


if __name__ == "__main__":
    main()
