"""Submission marks are written only for messages this daemon still holds.

A campaign claim commits without waiting for the disk, so a PostgreSQL crash right after it can
undo it while its batch is already in the daemon's memory. The test undoes a claim the way such
a crash would (the rows back to `queued`, no lease owner) and checks that the batch is neither
marked nor sent, and that the writer gives back only what is still the daemon's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
import triopg

from parts import account, claim_config, make_parts
from sendd.actors import poller
from sendd.actors.writer import write_results
from sendd.commands import tenants
from sendd.db import leases, migrate
from sendd.model import RELEASE, Batch
from sendd.pipeline import Parts

INSTANCE = "d1"


class NoProvider:
    """A provider that must not be called."""

    async def send(self, messages: list[Any]) -> Any:
        raise AssertionError(f"sent {len(messages)} messages whose claim was undone")

    send_each = send


@asynccontextmanager
async def _pool(url: str) -> AsyncIterator[Any]:
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), triopg.create_pool(url) as pool:
            yield pool


def _parts(pool: Any) -> Parts:
    return make_parts(claim_config([account("main")], chunk=10), instance_id=INSTANCE,
                      pool=pool, providers={"main": NoProvider()},
                      lease_until=trio.current_time() + 60)


async def _claim_ten(conn: Any, parts: Parts) -> list[Any]:
    await migrate.migrate(conn)
    await tenants.set_tenant(conn, "shop", credits=1_000)
    campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status, started_at) "
                                   "VALUES ('shop', 'sending', now()) RETURNING id")
    await conn.execute(
        "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body)"
        " SELECT 'shop', $1, 'main', '+3069' || lpad(i::text, 8, '0'), 'hi'"
        " FROM generate_series(1, 10) i", campaign)
    await leases.register(conn, INSTANCE, 60)
    messages = (await poller.claim_due(conn, parts.claimer())).messages
    assert len(messages) == 10
    return messages


async def _undo_claim(conn: Any, ids: list[int]) -> None:
    """What a crash that lost the claim's commit leaves: the rows queued, nobody's."""
    await conn.execute("UPDATE sendd.message SET status = 'queued', lease_owner = NULL "
                       "WHERE id = ANY($1::bigint[])", ids)


async def test_a_batch_whose_claim_was_undone_is_released_not_marked_or_sent(
        database_url: str) -> None:
    async with _pool(database_url) as pool:
        parts = _parts(pool)
        async with pool.acquire() as conn:
            messages = await _claim_ten(conn, parts)
            # Two claims in one batch (the batcher merges them): the first one was undone.
            await _undo_claim(conn, [m.id for m in messages[:4]])
        [result] = await parts.sender().send_batch(Batch("main", "shop", messages))
        assert result.submission_id is None
        assert {o.status for o in result.outcomes} == {RELEASE}
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM sendd.submission") == 0
            written = await write_results(conn, INSTANCE, [result])
            statuses = await conn.fetch("SELECT status, lease_owner, count(*) FROM sendd.message "
                                        "GROUP BY 1, 2")
    assert written == 6  # only the six still held were ours to give back
    assert [tuple(r) for r in statuses] == [("queued", None, 10)]


async def test_a_batch_still_held_is_marked(database_url: str) -> None:
    async with _pool(database_url) as pool:
        parts = _parts(pool)
        async with pool.acquire() as conn:
            messages = await _claim_ten(conn, parts)
        mark, refusal = await parts.sender().mark_submitted(
            Batch("main", "shop", messages))
        assert refusal == ""
        async with pool.acquire() as conn:
            ids = await conn.fetchval("SELECT message_ids FROM sendd.submission WHERE id = $1",
                                      mark)
    assert sorted(ids) == sorted(m.id for m in messages)
