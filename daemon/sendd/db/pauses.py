"""Operator pauses of a tenant, an account or everything, stored in `sendd.pause` (migration
0012), so that they survive a restart and reach every daemon on the database.

The table is the truth: `sendd ctl pause` and `resume` write it through any daemon; every
daemon's housekeeper reads it into its Controls once a second (the claims read those); and the
submission mark (`sendd.mark_submitted`) refuses a batch a pause covers, so that what a daemon
claimed before it heard of a pause is put back instead of sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The pause waits for marks being written (they hold sendd.pause_lock() shared), so that once it
# has committed no mark it covers is written.
LOCK_MARKS = "SELECT pg_advisory_xact_lock(sendd.pause_lock())"
STORE = """
INSERT INTO sendd.pause (scope, target, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING
"""
LIFT = "DELETE FROM sendd.pause WHERE scope = $1 AND target = $2"
LOAD = "SELECT scope, target FROM sendd.pause"


@dataclass(frozen=True)
class Pauses:
    """The pauses in force, as stored."""

    all: bool
    tenants: frozenset[str]
    accounts: frozenset[str]


def _target(scope: str, target: str | None) -> str:
    return "" if scope == "all" else str(target)


async def store(conn: Any, scope: str, target: str | None, reason: str) -> None:
    """Pause `scope` ('all', 'tenant' or 'account') `target` (None for all); pausing twice keeps
    the first pause."""
    async with conn.transaction():
        await conn.execute(LOCK_MARKS)
        await conn.execute(STORE, scope, _target(scope, target), reason)


async def lift(conn: Any, scope: str, target: str | None) -> None:
    await conn.execute(LIFT, scope, _target(scope, target))


async def load(conn: Any) -> Pauses:
    rows = await conn.fetch(LOAD)
    return Pauses(all=any(r["scope"] == "all" for r in rows),
                  tenants=frozenset(r["target"] for r in rows if r["scope"] == "tenant"),
                  accounts=frozenset(r["target"] for r in rows if r["scope"] == "account"))
