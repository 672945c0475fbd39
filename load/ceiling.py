"""The bare-PostgreSQL ceiling: the database work a send pipeline cannot avoid, with nothing else.

A scratch copy of `sendd.message` (`CREATE TABLE bench_ceiling (LIKE sendd.message INCLUDING
ALL)`: the same columns, defaults and indexes, but no triggers) is filled the way bench.py
fills the real table, and then drained by plain asyncpg connections, each repeating two
autocommitted statements with no per-message Python:

1. claim a chunk: `UPDATE ... SET status = 'sending' WHERE id IN (SELECT ... FOR UPDATE SKIP
   LOCKED) RETURNING` the columns the daemon's poller returns, as it claims (per campaign, due
   messages, in `next_attempt_at, id` order, so the same partial index serves it). A sender
   must read what it sends, so the rows' content is part of the work (until 2026-12-01 only
   the ids came back, which made the ceiling ~6 % higher);
2. store the outcomes of that chunk: one `UPDATE ... FROM unnest($1::bigint[])`, as the
   daemon's writer does.

ceiling = rows / elapsed seconds, with 2 connections (one per core of the development machine)
and with 1; the better is reported, and which it was. Used by bench.py before its daemons
start and after they have stopped, on the same server; `python load/ceiling.py --help` runs it
alone against a database that has the sendd schema.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset  # noqa: E402 -- this directory, set up above

TABLE = "bench_ceiling"
CAMPAIGN = 1  # no foreign keys on the copy, so a made-up campaign id will do
TENANT = "ceiling"
CONCURRENCIES = (2, 1)
AUTOVACUUM_WAIT = 300.0  # seconds, at most
AUTOVACUUM_RUNNING = ("SELECT count(*) FROM pg_stat_activity "
                      "WHERE backend_type = 'autovacuum worker' AND state = 'active'")


class CeilingFailed(Exception):
    """The measurement went wrong; str() is one line."""


CLAIM = f"""
UPDATE {TABLE} SET status = 'sending', lease_owner = 'x'
WHERE id IN (SELECT id FROM {TABLE}
             WHERE campaign_id = $1 AND status = 'queued' AND next_attempt_at <= now()
             ORDER BY next_attempt_at, id LIMIT $2
             FOR UPDATE SKIP LOCKED)
RETURNING id, tenant_id, campaign_id, account, sender, recipient, body, segments, attempts
"""

STORE = f"""
UPDATE {TABLE} m SET status = 'sent', provider_message_id = 'p' || r.id, bulk_id = 'b',
       sent_at = now(), finished_at = now(), lease_owner = NULL, attempts = m.attempts + 1
FROM unnest($1::bigint[]) AS r(id) WHERE m.id = r.id
"""


async def measure(url: str, rows: int, claim_size: int,
                  concurrencies: Sequence[int] = CONCURRENCIES) -> dict[str, Any]:
    """Run one trial per concurrency on a freshly filled table; the figures of all and the best.

    Each trial gets a new table, so none inherits the dead rows of the one before.
    """
    trials = [await _trial(url, rows, claim_size, n) for n in concurrencies]
    best = max(trials, key=lambda trial: trial["msgs_per_s"])
    return {"rows": rows, "claim_size": claim_size, "trials": trials,
            "msgs_per_s": best["msgs_per_s"], "connections": best["connections"]}


async def _trial(url: str, rows: int, claim_size: int, connections: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        fill_s = await _create(conn, rows)
        waited_s = await _wait_for_autovacuum(conn)
        started = time.monotonic()
        tallies = await asyncio.gather(*(_drain(url, claim_size) for _ in range(connections)))
        elapsed = time.monotonic() - started
        stored = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE status = 'sent'")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.close()
    if stored != rows:  # a broken measurement must not pass for a ceiling
        raise CeilingFailed(f"ceiling: {stored} of {rows} rows stored as sent")
    # Summed over the connections: where the time goes, claiming or storing.
    totals = {key: sum(t[key] for t in tallies) for key in tallies[0]}
    return {"connections": connections, "seconds": round(elapsed, 3),
            "msgs_per_s": round(rows / elapsed, 1), "claims": int(totals["claims"]),
            "claim_s": round(totals["claim_s"], 3), "store_s": round(totals["store_s"], 3),
            "fill_s": round(fill_s, 2), "autovacuum_wait_s": round(waited_s, 1)}


async def _create(conn: Any, rows: int) -> float:
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (LIKE sendd.message INCLUDING ALL)")
    campaigns = dataset.Campaigns([CAMPAIGN], [TENANT])
    seconds = await dataset.insert_messages(conn, TABLE, rows, campaigns)
    return seconds + await dataset.vacuum_analyze(conn, TABLE)


async def _wait_for_autovacuum(conn: Any) -> float:
    """Let running autovacuum workers finish first (after a benchmark run one is often busy
    with sendd.message): sharing the two cores with one would halve the ceiling."""
    started = time.monotonic()
    while (time.monotonic() - started < AUTOVACUUM_WAIT
           and await conn.fetchval(AUTOVACUUM_RUNNING)):
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def _drain(url: str, claim_size: int) -> dict[str, float]:
    """Claim and store chunks until nothing is left: the claims made and seconds in each step."""
    conn = await asyncpg.connect(url)
    try:
        tally = {"claims": 0, "claim_s": 0.0, "store_s": 0.0}
        while True:
            started = time.monotonic()
            rows = await conn.fetch(CLAIM, CAMPAIGN, claim_size)
            claimed = time.monotonic()
            tally["claim_s"] += claimed - started
            if not rows:  # SKIP LOCKED: empty only once no queued row is left unlocked
                return tally
            ids = [row[0] for row in rows]
            await conn.execute(STORE, ids)
            tally["store_s"] += time.monotonic() - claimed
            tally["claims"] += 1
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True,
                        help="a database with the sendd schema (sendd migrate)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows to drain (200000)")
    parser.add_argument("--claim-size", type=int, default=1000,
                        help="rows per claim, the daemon's pipeline.claim_chunk (1000)")
    args = parser.parse_args()
    if args.rows < 1 or args.claim_size < 1:
        parser.error("--rows and --claim-size must be at least 1")
    try:
        result = asyncio.run(measure(args.database_url, args.rows, args.claim_size))
    except (OSError, asyncpg.PostgresError, CeilingFailed) as error:
        print(f"ceiling: {error}", file=sys.stderr)
        return 1
    for trial in result["trials"]:
        print(f"{trial['connections']} connection(s): {trial['msgs_per_s']:,.0f} msgs/s "
              f"({args.rows:,} rows in {trial['seconds']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
