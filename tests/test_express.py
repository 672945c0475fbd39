"""The express lane: a transactional message does not wait behind a full campaign pipeline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

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
from parts import account, claim_config, make_parts
from sendd.actors import express
from sendd.actors.poller import Claimer
from sendd.commands import tenants
from sendd.core.ratelimit import Governor
from sendd.db import leases, migrate

# A slow provider and few senders keep the campaign pipeline's channels full: 6 chunks of 200
# claimed messages waiting at 2 x 200 messages per second means ~3 s for anything queued behind.
PIPELINE = {"claim_chunk": 200, "senders": 2, "claim_capacity": 4, "batch_capacity": 2}


@pytest.mark.serial  # a rate or latency floor against the wall clock: not beside another test
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


# --- The express claim itself (sendd.claim_express): batches and their marks ----------------

def _express_claimer(instance_id: str, timeout: float) -> Claimer:
    config = claim_config([account("main", max_batch=3, timeout=timeout),
                           account("alt", timeout=timeout)])
    governor = Governor(clock=lambda: 0.0)
    for name in config.accounts:
        governor.set_account(name, 0, 0)
    governor.set_tenant("slow", 2)  # a tenant limit of 2 messages/s caps its batches at 2
    return make_parts(config, instance_id=instance_id, governor=governor).claimer()


async def _express_claim(url: str, timeout: float) -> tuple[list[Any], dict[int, list[int]]]:
    """Queue transactional messages for two tenants on two accounts (and one campaign message),
    claim once; the batches, and the marks in the database (id -> message ids)."""
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
        for tenant in ("shop", "slow"):
            await tenants.set_tenant(conn, tenant, credits=1_000)
        campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status, started_at) "
                                       "VALUES ('shop', 'sending', now()) RETURNING id")
        await conn.execute("INSERT INTO sendd.message (tenant_id, campaign_id, account, "
                           "recipient, body) VALUES ('shop', $1, 'main', '+306900000000', 'x')",
                           campaign)
        await conn.executemany(
            "INSERT INTO sendd.message (tenant_id, account, recipient, body) "
            "VALUES ($1, $2, $3, 'code 1234')",
            [(tenant, account, f"+3069{n:08d}")
             for n, (tenant, account) in enumerate([("shop", "main")] * 7 + [("shop", "alt")] * 4
                                                   + [("slow", "alt")] * 5, start=1)])
        await leases.register(conn, "d1", 60)
        batches = await express.claim_express(conn, _express_claimer("d1", timeout))
        marks = {r["id"]: sorted(r["message_ids"]) for r in await conn.fetch(
            "SELECT id, message_ids FROM sendd.submission WHERE instance_id = 'd1'")}
        return batches, marks
    finally:
        await conn.close()


def _run_asyncio(work: Any) -> Any:
    loop = asyncio.new_event_loop()  # trio-hosted (sendd.db imports trio_asyncio): claims
    try:                             # read trio's clock
        return loop.run_until_complete(work)
    finally:
        loop.close()


def test_the_express_claim_marks_each_batch_within_the_batch_limits(database_url: str) -> None:
    batches, marks = _run_asyncio(_express_claim(database_url, timeout=1.0))
    sizes = sorted((b.account, b.tenant_id, len(b.messages)) for b in batches)
    # main: max_batch 3; alt: 1000, but the slow tenant's limit of 2/s caps its batches at 2.
    assert sizes == [("alt", "shop", 4), ("alt", "slow", 1), ("alt", "slow", 2),
                     ("alt", "slow", 2), ("main", "shop", 1), ("main", "shop", 3),
                     ("main", "shop", 3)]
    assert all(m.campaign_id is None for b in batches for m in b.messages)
    # Every batch carries its own durable mark, naming exactly its messages.
    assert {b.submission_id: sorted(m.id for m in b.messages) for b in batches} == marks


def test_the_express_claim_leaves_marking_to_the_sender_when_the_lease_is_short(
        database_url: str) -> None:
    # A 60 s lease cannot cover a 90 s request: no marks; the sender waits for the renewal.
    batches, marks = _run_asyncio(_express_claim(database_url, timeout=90.0))
    assert marks == {}
    assert sum(len(b.messages) for b in batches) == 16
    assert all(b.submission_id is None for b in batches)
    assert max(len(b.messages) for b in batches if b.account == "main") == 3
