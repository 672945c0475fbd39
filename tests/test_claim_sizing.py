"""Claims sized to what can go out soon, and split fairly (issue 15), against a real PostgreSQL:
a limited tenant gets about a second of its rate per claim, less what already waits in the
scheduler; tenants share a claim equally (or by weight), whatever their number of campaigns."""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio
import trio_asyncio
import triopg

from parts import account, claim_config, make_parts
from sendd.actors import poller
from sendd.commands import tenants
from sendd.db import leases, migrate
from sendd.pipeline import Parts
from sendd.state.scheduler import Scheduler

INSTANCE = "d1"


async def _campaign(conn: Any, tenant: str, count: int) -> int:
    campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status, started_at) "
                                   "VALUES ($1, 'sending', now()) RETURNING id", tenant)
    await conn.execute(
        "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body)"
        " SELECT $1, $2, 'main', '+3069' || lpad(i::text, 8, '0'), 'hi'"
        " FROM generate_series(1, $3) i", tenant, campaign, count)
    return campaign


async def _with_claimer(url: str, chunk: int, work: Any) -> Any:
    async with trio_asyncio.open_loop(), triopg.create_pool(url) as pool, \
            pool.acquire() as conn:
        await migrate.migrate(conn)
        await leases.register(conn, INSTANCE, 60)
        parts = make_parts(claim_config([account("main")], chunk=chunk),
                           instance_id=INSTANCE, pool=pool, lease_until=trio.current_time() + 60)
        scheduler = Scheduler(parts.accounts, parts.controls, capacity=8)
        return await work(conn, parts, parts.claimer(scheduler))


def _run(url: str, chunk: int, work: Any) -> Any:
    return trio.run(_with_claimer, url, chunk, work)


def test_a_limited_tenant_is_claimed_a_second_of_its_rate_at_a_time(database_url: str) -> None:
    async def work(conn: Any, parts: Parts, claimer: poller.Claimer) -> list[Counter[str]]:
        for tenant in ("slow", "fast"):
            await tenants.set_tenant(conn, tenant, credits=100_000)
            await _campaign(conn, tenant, 5_000)
        parts.accounts.governor.set_tenant("slow", 30)
        claims = []
        for _ in range(3):
            claim = await poller.claim_due(conn, claimer)
            claims.append(Counter(m.tenant_id for m in claim.messages))
        return claims

    first, second, third = _run(database_url, 1_000, work)
    # A second of its rate and the next batch (its batches are 30 at most), then nothing while
    # that waits unsent; the unlimited tenant takes the rest of each chunk.
    assert first["slow"] == 60
    assert second["slow"] == third["slow"] == 0
    assert first["fast"] >= 500 and second["fast"] >= 500


def test_tenants_share_a_claim_equally_whatever_their_campaigns(database_url: str) -> None:
    async def work(conn: Any, parts: Parts, claimer: poller.Claimer) -> Counter[str]:
        await tenants.set_tenant(conn, "many", credits=100_000)
        await tenants.set_tenant(conn, "one", credits=100_000)
        for _ in range(4):
            await _campaign(conn, "many", 1_000)
        await _campaign(conn, "one", 5_000)
        claim = await poller.claim_due(conn, claimer)
        return Counter(m.tenant_id for m in claim.messages)

    # Before: 200 from each of the five campaigns, so 800 for "many" and 200 for "one".
    assert _run(database_url, 1_000, work) == {"many": 500, "one": 500}


def test_a_tenant_s_weight_is_its_share_of_a_claim(database_url: str) -> None:
    async def work(conn: Any, parts: Parts, claimer: poller.Claimer) -> Counter[str]:
        for tenant in ("heavy", "light"):
            await tenants.set_tenant(conn, tenant, credits=100_000)
            await _campaign(conn, tenant, 5_000)
        parts.controls.tenant_weights["heavy"] = 3.0
        claim = await poller.claim_due(conn, claimer)
        return Counter(m.tenant_id for m in claim.messages)

    assert _run(database_url, 1_000, work) == {"heavy": 750, "light": 250}


def test_campaign_shares_are_at_least_one_and_never_exceed_a_limited_tenant_s_room() -> None:
    shares = poller.campaign_shares([(1, "a"), (2, "a"), (3, "b")], 1_000,
                                    {"a": None, "b": 40}, {})
    assert shares == [250, 250, 40]
    assert poller.campaign_shares([(i, "t") for i in range(3000)], 1000, {"t": None},
                                  {}) == [1] * 3000


def test_beyond_a_hundred_tenants_claims_take_them_in_turn() -> None:
    claimer = make_parts(claim_config([account("main")])).claimer()
    tenants = {f"t{i:03d}" for i in range(250)}
    ordered = sorted(tenants)
    turns = [claimer.next_tenants(tenants) for _ in range(3)]
    assert turns[0] == ordered[:100] and turns[1] == ordered[100:200]
    assert turns[2] == ordered[200:] + ordered[:50]  # every tenant within three claims
    assert claimer.next_tenants(set(ordered[:5])) == ordered[:5]  # few tenants: all of them
    # A tenant with a rate limit is in every claim: it is claimed a second of its rate at a time.
    claimer.accounts.governor.set_tenant("t150", 50)
    for _ in range(3):
        turn = claimer.next_tenants(tenants)
        assert turn[0] == "t150" and len(turn) == 100 and turn.count("t150") == 1
