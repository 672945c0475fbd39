"""The claim rules, where they live: SQL functions that both lanes call (migration 0011).

The concurrent behaviour (claimers of both lanes never overspend together) is
tests/test_claim_slots.py; here, each rule on its own, and the express claim still callable the
way a daemon of the previous release calls it (positionally) while a migration runs under it."""

from __future__ import annotations

from typing import Any

import asyncpg

from harness import with_db
from sendd.actors import poller
from sendd.commands import tenants
from sendd.db import claims, leases, pauses

SHARE, SLOTS = poller.CLAIM_SHARE, poller.CLAIM_SLOTS


def test_spendable_is_one_share_only_while_every_slot_has_one(database_url: str) -> None:
    async def work(conn: asyncpg.Connection) -> list[int]:
        cases = [(SLOTS * SHARE, False), (SLOTS * SHARE - 1, False), (17, True), (0, True)]
        return [await conn.fetchval("SELECT sendd.spendable(budget => $1, alone => $2, "
                                    "share => $3, slots => $4)", budget, alone, SHARE, SLOTS)
                for budget, alone in cases]

    assert with_db(database_url, work) == [SHARE, 0, 17, 0]


def test_a_claimer_goes_alone_unless_it_last_saw_a_share_for_every_slot(database_url: str) -> None:
    async def work(conn: asyncpg.Connection) -> list[bool]:
        return [await conn.fetchval("SELECT sendd.claims_alone($1, $2, $3)", seen, SHARE, SLOTS)
                for seen in (None, 0, SLOTS * SHARE - 1, SLOTS * SHARE)]

    assert with_db(database_url, work) == [True, True, True, False]


def test_claim_budgets_lock_then_read_each_tenants_budget_in_the_order_given(
        database_url: str) -> None:
    """Credits minus segments in flight, and what one claim may spend of it: all of it alone,
    one share in a slot (a budget last seen large enough); nothing but a row for a stranger."""

    async def work(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
        await tenants.set_tenant(conn, "big", credits=SLOTS * SHARE + 5)
        await tenants.set_tenant(conn, "small", credits=10)
        await conn.execute("INSERT INTO sendd.message (tenant_id, account, recipient, body, "
                           "segments) VALUES ('small', 'main', '+306900000001', 'hi', 3)")
        await conn.execute("UPDATE sendd.message SET status = 'sending'")  # 3 segments in flight
        async with conn.transaction():
            rows = await conn.fetch(claims.CLAIM_BUDGETS, ["big", "nobody", "small"],
                                    [SLOTS * SHARE, None, 10], SHARE, SLOTS,
                                    poller.CLAIM_LOCK_SPACE, *poller.CAMPAIGN_SLOTS)
        return [tuple(r) for r in rows]

    assert with_db(database_url, work) == [
        ("big", SLOTS * SHARE + 5, SHARE), ("nobody", 0, 0), ("small", 7, 7)]


def test_the_express_claim_answers_a_positional_call_of_the_previous_release(
        database_url: str) -> None:
    async def work(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
        await tenants.set_tenant(conn, "shop", credits=100)
        await conn.execute("INSERT INTO sendd.message (tenant_id, account, recipient, body) "
                           "VALUES ('shop', 'main', '+306900000001', 'hi')")
        await leases.register(conn, "d1", 60)
        rows = await conn.fetch(
            "SELECT * FROM sendd.claim_express($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14)", "d1", ["main"], [10], [], 100, [], [], [], [], SHARE, SLOTS,
            poller.CLAIM_LOCK_SPACE, poller.EXPRESS_SLOT, 1.0)
        marks = await conn.fetch("SELECT message_ids FROM sendd.submission")
        return [(r["tenant_id"], r["batch"], r["budget"], r["submission_id"] is not None)
                for r in rows] + [tuple(m["message_ids"]) for m in marks]

    assert with_db(database_url, work) == [("shop", 0, 100, True), (1,)]


def test_a_mark_is_written_only_for_messages_still_ours_under_a_lease_that_covers_it(
        database_url: str) -> None:
    """sendd.mark_submitted (the senders' mark, and the express claim's): its answer says why
    no mark was written."""

    async def work(conn: asyncpg.Connection) -> dict[str, tuple[Any, ...]]:
        await tenants.set_tenant(conn, "shop", credits=100)
        await leases.register(conn, "d1", 60)
        campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status) "
                                       "VALUES ('shop', 'sending') RETURNING id")
        ids = [await conn.fetchval(
            "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body) "
            "VALUES ('shop', $1, 'main', $2, 'hi') RETURNING id", campaign, f"+30690000000{n}")
            for n in range(2)]
        await conn.execute("UPDATE sendd.message SET status = 'sending', lease_owner = 'd1'"
                           " WHERE id = $1", ids[0])

        async def mark(instance: str, message_ids: list[int], margin: float) -> tuple[Any, ...]:
            row = await conn.fetchrow(claims.MARK_SUBMITTED, instance, "main", message_ids,
                                      margin, [campaign])
            return row["id"] is not None, row["alive"], row["held"], row["stopped"]

        answers = {"ours": await mark("d1", ids[:1], 1.0),
                   "short lease": await mark("d1", ids[:1], 120.0),
                   "not ours": await mark("d1", ids, 1.0),
                   "no lease": await mark("d2", ids[:1], 1.0)}
        await conn.execute("UPDATE sendd.campaign SET status = 'paused'")
        answers["paused"] = await mark("d1", ids[:1], 1.0)
        answers["marks"] = (await conn.fetchval("SELECT count(*) FROM sendd.submission"),)
        return answers

    assert with_db(database_url, work) == {
        "ours": (True, True, True, False), "short lease": (False, True, True, False),
        "not ours": (False, True, False, False), "no lease": (False, False, False, False),
        "paused": (False, True, True, True), "marks": (1,)}


def test_a_mark_is_refused_while_its_tenant_its_account_or_everything_is_paused(
        database_url: str) -> None:
    """The stored operator pauses (sendd.pause, migration 0012): the mark says `paused`, and
    `stopped` too, which a daemon of the previous release reads as a stopped campaign."""

    async def work(conn: asyncpg.Connection) -> dict[str, tuple[Any, ...]]:
        await tenants.set_tenant(conn, "shop", credits=100)
        await leases.register(conn, "d1", 60)
        message = await conn.fetchval(
            "INSERT INTO sendd.message (tenant_id, account, recipient, body) "
            "VALUES ('shop', 'main', '+306900000001', 'hi') RETURNING id")
        await conn.execute("UPDATE sendd.message SET status = 'sending', lease_owner = 'd1'")

        async def mark() -> tuple[Any, ...]:
            row = await conn.fetchrow(claims.MARK_SUBMITTED, "d1", "main", [message], 1.0, [])
            return row["id"] is not None, row["stopped"], row["paused"]

        answers = {}
        for scope, target in [("tenant", "other"), ("account", "backup"), ("tenant", "shop"),
                              ("account", "main"), ("all", "")]:
            await pauses.store(conn, scope, target or None, "test")
            answers[f"{scope} {target}"] = await mark()
            await pauses.lift(conn, scope, target or None)
        answers["none"] = await mark()
        return answers

    assert with_db(database_url, work) == {
        "tenant other": (True, False, False), "account backup": (True, False, False),
        "tenant shop": (False, True, True), "account main": (False, True, True),
        "all ": (False, True, True), "none": (True, False, False)}


def test_stored_pauses_load_as_one_set_per_scope(database_url: str) -> None:
    async def work(conn: asyncpg.Connection) -> tuple[pauses.Pauses, pauses.Pauses]:
        for scope, target in [("all", None), ("tenant", "a"), ("tenant", "b"),
                              ("account", "main"), ("tenant", "a")]:  # twice: still one pause
            await pauses.store(conn, scope, target, "test")
        stored = await pauses.load(conn)
        await pauses.lift(conn, "all", None)
        return stored, await pauses.load(conn)

    assert with_db(database_url, work) == (
        pauses.Pauses(True, frozenset({"a", "b"}), frozenset({"main"})),
        pauses.Pauses(False, frozenset({"a", "b"}), frozenset({"main"})))
