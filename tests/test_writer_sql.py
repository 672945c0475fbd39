"""The writer stores an outcome only for a message that is still `sending` and ours.

Its statement spells "status = 'sending'" as a NOT IN list of every other status (to keep the
planner off the in-flight index); a status missing from that list would let an outcome land on
a message in that status whenever the state machine allows the move (an `unknown` message is
the settler's to settle, not the writer's). Checked by what the statement does, against the real
schema: every status crossed with every outcome, in one write."""

import asyncio
from typing import Any

import asyncpg

from harness import STATUSES
from sendd.actors.writer import write_results
from sendd.commands import tenants
from sendd.db import leases, migrate
from sendd.model import FAILED, RELEASE, RETRY, SENT, UNKNOWN, BatchResult, Message, Outcome

OUTCOMES = [SENT, FAILED, RETRY, RELEASE, UNKNOWN]
INSTANCE = "d1"

# How a message reaches each status: the moves after `queued`, each allowed by the schema.
PATHS = {
    "queued": [], "sending": ["sending"], "sent": ["sending", "sent"],
    "delivered": ["sending", "sent", "delivered"],
    "undelivered": ["sending", "sent", "undelivered"], "failed": ["sending", "failed"],
    "unknown": ["sending", "unknown"], "cancelled": ["cancelled"],
}
COLUMNS = ("status, attempts, lease_owner, bulk_id, provider_message_id, error_code, "
           "next_attempt_at, sent_at, finished_at")


async def _messages_in_every_status(conn: asyncpg.Connection) -> dict[tuple[str, str], Message]:
    """One message per (status, outcome), each in that status and leased to INSTANCE."""
    await migrate.migrate(conn)
    await tenants.set_tenant(conn, "shop", credits=1_000)
    await leases.register(conn, INSTANCE, 600)
    messages = {}
    for n, (status, outcome) in enumerate((s, o) for s in STATUSES for o in OUTCOMES):
        row = await conn.fetchrow(
            "INSERT INTO sendd.message (tenant_id, account, recipient, body) "
            "VALUES ('shop', 'main', $1, 'hi') "
            "RETURNING id, tenant_id, campaign_id, account, sender, recipient, body, segments, "
            "attempts", f"+3069{n:08d}")
        for step in PATHS[status]:
            await conn.execute("UPDATE sendd.message m SET status = $2, lease_owner = $3 "
                               "WHERE id = $1 AND sendd.transition_allowed(m.status, $2)",
                               row["id"], step, INSTANCE)
        await conn.execute("UPDATE sendd.message SET lease_owner = $2 WHERE id = $1",
                           row["id"], INSTANCE)
        messages[status, outcome] = Message(*row)
    assert {r["status"] for r in await conn.fetch("SELECT status FROM sendd.message")} == set(
        STATUSES)
    return messages


async def _rows(conn: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    return {r["id"]: dict(r) for r in await conn.fetch(f"SELECT id, {COLUMNS} FROM sendd.message")}


def test_outcomes_land_only_on_messages_still_sending(database_url: str) -> None:
    async def work() -> tuple[Any, ...]:
        conn = await asyncpg.connect(database_url)
        try:
            messages = await _messages_in_every_status(conn)
            before = await _rows(conn)
            outcomes = [Outcome(m, outcome, bulk_id="b1", provider_message_id=f"p{m.id}",
                                error_code="E" if outcome != SENT else None)
                        for (_, outcome), m in messages.items()]
            written = await write_results(conn, INSTANCE, [BatchResult(None, outcomes)])
            return messages, before, await _rows(conn), written
        finally:
            await conn.close()

    messages, before, after, written = asyncio.run(work())
    changed = {key for key, m in messages.items() if after[m.id] != before[m.id]}
    assert changed == {("sending", outcome) for outcome in OUTCOMES}
    assert written == len(OUTCOMES)
    stored = {outcome: after[messages["sending", outcome].id] for outcome in OUTCOMES}
    assert {o: row["status"] for o, row in stored.items()} == {
        SENT: "sent", FAILED: "failed", RETRY: "queued", RELEASE: "queued", UNKNOWN: "unknown"}
    assert all(row["lease_owner"] is None for row in stored.values())
