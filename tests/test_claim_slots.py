"""Claim slots (poller.claim_due, express.claim_express, migrations 0003 and 0006): concurrent
claimers of one tenant, from several daemons and both lanes, run at once while the budget is
large and never spend more than it together.

Real PostgreSQL, the daemon's own claims, several connections claiming at the same time; the
share is made tiny so that a few hundred messages cross from the shared to the exclusive mode.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from parts import account, claim_config, make_parts
from sendd.actors import express, poller
from sendd.commands import tenants
from sendd.core.ratelimit import Governor
from sendd.db import leases, migrate

MESSAGES = 600  # campaign messages; as many transactional ones again, same segments


def _claimer(instance_id: str, chunk: int) -> Any:
    governor = Governor(clock=lambda: 0.0)
    governor.set_account("main", 0, 0)
    return make_parts(claim_config([account("main", max_batch=10)], chunk=chunk),
                      instance_id=instance_id, governor=governor).claimer()


async def _prepare(url: str, credits: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
        await tenants.set_tenant(conn, "shop", credits=credits)
        campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status, started_at) "
                                       "VALUES ('shop', 'sending', now()) RETURNING id")
        await conn.execute(
            "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body, segments)"
            " SELECT 'shop', $1, 'main', '+3069' || lpad(i::text, 8, '0'), 'hi', 1 + i % 3"
            " FROM generate_series(1, $2) i", campaign, MESSAGES)
        await conn.execute(
            "INSERT INTO sendd.message (tenant_id, account, recipient, body, segments)"
            " SELECT 'shop', 'main', '+3079' || lpad(i::text, 8, '0'), 'hi', 1 + i % 3"
            " FROM generate_series(1, $1) i", MESSAGES)
    finally:
        await conn.close()


async def _claim_until_dry(url: str, instance_id: str, chunk: int,
                           lane: str = "campaign") -> list[int]:
    """Claim as one poller (or the express poller) would until nothing more fits; the claim
    sizes in segments."""
    conn = await asyncpg.connect(url)
    try:
        await leases.register(conn, instance_id, 600)
        claimer, claimed, empty = _claimer(instance_id, chunk), [], 0
        while empty < 3:  # a claim can come back empty while others hold the slots
            if lane == "express":
                messages = [m for b in await express.claim_express(conn, claimer)
                            for m in b.messages]
            else:
                messages = (await poller.claim_due(conn, claimer)).messages
            claimed.append(sum(m.segments for m in messages))
            empty = empty + 1 if not messages else 0
        return claimed
    finally:
        await conn.close()


async def _race(url: str, claimers: int, chunk: int) -> tuple[list[list[int]], int]:
    # The last daemon's claimer is its express poller.
    results = await asyncio.gather(*(
        _claim_until_dry(url, f"daemon-{i}", chunk, "express" if i == claimers - 1 else "campaign")
        for i in range(claimers)))
    conn = await asyncpg.connect(url)
    try:
        in_flight = await conn.fetchval("SELECT coalesce(sum(segments), 0) FROM sendd.message "
                                        "WHERE status = 'sending'")
    finally:
        await conn.close()
    return results, in_flight


def _run(work: Any) -> Any:
    # The default loop: with trio_asyncio imported (sendd.db), a trio-hosted one, which the
    # claims need (they read trio's clock).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(work)
    finally:
        loop.close()


@pytest.mark.parametrize("credits", [37, 160, 401, 2_000])
def test_concurrent_claimers_never_spend_more_than_the_budget(database_url: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              credits: int) -> None:
    monkeypatch.setattr(poller, "CLAIM_SHARE", 30)  # shared while the budget is >= 90
    _run(_prepare(database_url, credits))
    results, in_flight = _run(_race(database_url, claimers=6, chunk=15))
    total = sum(map(sum, results))
    available = 2 * MESSAGES // 3 * (1 + 2 + 3)  # 1 + i % 3 segments each
    assert total == in_flight  # every claim the claimers saw is in flight, nothing else
    assert total <= credits  # never more than the budget...
    # ...and all of it, but for less than the dearest message (3 segments), when the messages
    # are there to spend it on.
    assert total >= min(credits, available) - 2
    if credits >= 401:
        claims = [size for sizes in results for size in sizes if size]
        assert len(claims) > 6 and sum(1 for sizes in results if any(sizes)) >= 2
        assert any(results[-1]), "the express lane got nothing"
