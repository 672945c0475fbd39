"""Claim slots (poller.claim_due + migration 0003): concurrent claimers of one tenant, from
several daemons, run at once while the budget is large and never spend more than it together.

Real PostgreSQL, the poller's own claim, several connections claiming at the same time; the
share is made tiny so that a few hundred messages cross from the shared to the exclusive mode.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from sendd import leases, migrate, tenants
from sendd.actors import poller
from sendd.runtime import Runtime

MESSAGES = 600


def _runtime(instance_id: str, chunk: int) -> Any:
    config = SimpleNamespace(pipeline=SimpleNamespace(claim_chunk=chunk), accounts={"main": None})
    return Runtime(config=config, instance_id=instance_id, pool=None, governor=None,
                   providers={})


async def _prepare(url: str, credits: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
        await tenants.set_tenant(conn, "shop", credits=credits)
        campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, started_at) "
                                       "VALUES ('shop', now()) RETURNING id")
        await conn.execute(
            "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body, segments)"
            " SELECT 'shop', $1, 'main', '+3069' || lpad(i::text, 8, '0'), 'hi', 1 + i % 3"
            " FROM generate_series(1, $2) i", campaign, MESSAGES)
    finally:
        await conn.close()


async def _claim_until_dry(url: str, instance_id: str, chunk: int) -> list[int]:
    """Claim as one poller would until nothing more fits; the claim sizes in segments."""
    conn = await asyncpg.connect(url)
    try:
        await leases.register(conn, instance_id, 600)
        runtime, claimed, empty = _runtime(instance_id, chunk), [], 0
        while empty < 3:  # a claim can come back empty while others hold the slots
            claim = await poller.claim_due(conn, runtime)
            claimed.append(sum(m.segments for m in claim.messages))
            empty = empty + 1 if not claim.messages else 0
        return claimed
    finally:
        await conn.close()


async def _race(url: str, claimers: int, chunk: int) -> tuple[list[list[int]], int]:
    results = await asyncio.gather(*(_claim_until_dry(url, f"daemon-{i}", chunk)
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
    # Runtime needs (it reads trio's clock).
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
    available = MESSAGES // 3 * (1 + 2 + 3)  # 1 + i % 3 segments each
    assert total == in_flight  # every claim the claimers saw is in flight, nothing else
    assert total <= credits  # never more than the budget...
    # ...and all of it, but for less than the dearest message (3 segments), when the messages
    # are there to spend it on.
    assert total >= min(credits, available) - 2
    if credits >= 401:
        claims = [size for sizes in results for size in sizes if size]
        assert len(claims) > 6 and sum(1 for sizes in results if any(sizes)) >= 2


def test_spendable_budget_is_one_share_only_while_every_slot_has_one() -> None:
    share, slots = poller.CLAIM_SHARE, poller.CLAIM_SLOTS
    assert poller.spendable_budget(slots * share, share, exclusive=False) == share
    assert poller.spendable_budget(slots * share - 1, share, exclusive=False) == 0
    assert poller.spendable_budget(17, share, exclusive=True) == 17
