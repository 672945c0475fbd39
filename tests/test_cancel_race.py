"""A cancel while a writer puts a marked batch back (its sender gave the grant up, or a probe
split it): the batch ends cancelled, never queued in a cancelled campaign. Two connections, the
statements the cancel command and the writer run, interleaved the way that stranded them."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from sendd.actors.writer import write_outcomes
from sendd.commands import campaigns, tenants
from sendd.db import leases, migrate
from sendd.db.claims import MARK_SUBMITTED
from sendd.model import RELEASE, Message, Outcome

INSTANCE = "d1"


async def _race(url: str) -> dict[str, int]:
    a, b = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        await migrate.migrate(a)
        await tenants.set_tenant(a, "acme", credits=1000)
        cid = await a.fetchval("INSERT INTO sendd.campaign (tenant_id, name) VALUES "
                               "('acme', 'x') RETURNING id")
        await a.execute("INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient,"
                        " body) SELECT 'acme', $1, 'main', '+3069' || lpad(g::text, 8, '0'),"
                        " 'hi' FROM generate_series(1, 5) g", cid)
        await a.execute("UPDATE sendd.campaign SET status = 'sending', started_at = now() "
                        "WHERE id = $1", cid)
        await leases.register(a, INSTANCE, 60)
        ids = [r["id"] for r in await a.fetch("SELECT id FROM sendd.message ORDER BY id")]
        claimed = ids[:2]
        await a.execute("UPDATE sendd.message SET status = 'sending', lease_owner = $2 "
                        "WHERE id = ANY($1)", claimed, INSTANCE)
        mark = (await a.fetchrow(MARK_SUBMITTED, INSTANCE, "main", claimed, 5.0, [cid]))["id"]
        released = [Outcome(Message(i, "acme", cid, "main", None, "+30", "hi", 1, 0), RELEASE,
                            counts_attempt=False) for i in claimed]
        cancel = a.transaction()
        await cancel.start()
        await campaigns._transition(a, cid, ("sending",), "cancelled", reason=None)
        await a.execute(campaigns.CANCEL_CLAIMED, cid)  # the marked batch is on the wire: kept
        await a.execute(campaigns.CANCEL_QUEUED, cid)
        # The writer puts the marked batch back while the cancel has not committed yet.
        writer = asyncio.ensure_future(write_outcomes(b, INSTANCE, [mark], released))
        await asyncio.sleep(0.3)
        await cancel.commit()
        await asyncio.wait_for(writer, 10)
        rows = await a.fetch("SELECT status, count(*) AS n FROM sendd.message GROUP BY 1")
        return {r["status"]: r["n"] for r in rows}
    finally:
        await a.close()
        await b.close()


def test_a_batch_put_back_during_a_cancel_ends_cancelled(database_url: str) -> None:
    counts: Any = asyncio.run(_race(database_url))
    assert counts == {"cancelled": 5}, counts
