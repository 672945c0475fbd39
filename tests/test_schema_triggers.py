"""The schema's own rules, through plain SQL (asyncpg), no daemon: counters, completion,
credits, the ledger and the message state machine hold for any writer of sendd.message."""

import asyncio
import itertools

import asyncpg
import pytest

from harness import ALLOWED, STATUSES, with_db


async def add_tenant(conn, tenant: str, credits: int) -> None:
    await conn.execute("INSERT INTO sendd.tenant (id, credits) VALUES ($1, $2)", tenant, credits)


async def add_campaign(conn, tenant: str) -> int:
    return await conn.fetchval(
        "INSERT INTO sendd.campaign (tenant_id, status) VALUES ($1, 'sending') RETURNING id",
        tenant)


async def add_messages(conn, tenant: str, campaign: int | None, segments: list[int]) -> list[int]:
    rows = await conn.fetch(
        """INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body, segments)
           SELECT $1, $2, 'main', '+306900000' || lpad(i::text, 3, '0'), 'hi', s
           FROM unnest($3::int[]) WITH ORDINALITY AS u(s, i) RETURNING id""",
        tenant, campaign, segments)
    return [r["id"] for r in rows]


async def set_status(conn, ids: list[int], status: str) -> str:
    """One UPDATE statement, guarded like every sendd write path."""
    return await conn.execute(
        """UPDATE sendd.message m SET status = $2
           WHERE id = ANY($1::bigint[]) AND sendd.transition_allowed(m.status, $2)""",
        ids, status)


async def campaign(conn, campaign_id: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM sendd.campaign WHERE id = $1", campaign_id)


async def credits(conn, tenant: str) -> int:
    return await conn.fetchval("SELECT credits FROM sendd.tenant WHERE id = $1", tenant)


async def ledger(conn) -> list[tuple[str, int | None, int, str]]:
    rows = await conn.fetch("SELECT tenant_id, campaign_id, delta, reason "
                            "FROM sendd.credit_ledger ORDER BY id")
    return [tuple(r) for r in rows]


def test_sent_updates_counters_debits_segments_and_writes_one_ledger_row_per_group(database_url):
    async def work(conn):
        await add_tenant(conn, "acme", 1000)
        await add_tenant(conn, "beta", 1000)
        c1, c2, c3 = (await add_campaign(conn, "acme"), await add_campaign(conn, "acme"),
                      await add_campaign(conn, "beta"))
        m1 = await add_messages(conn, "acme", c1, [1, 2, 3])  # 6 segments
        m2 = await add_messages(conn, "acme", c2, [1, 1])  # 2
        m3 = await add_messages(conn, "beta", c3, [4, 1])  # 5
        tx = await add_messages(conn, "acme", None, [2])  # transactional, 2
        everything = m1 + m2 + m3 + tx
        assert [(await campaign(conn, c))["total"] for c in (c1, c2, c3)] == [3, 2, 2]

        # A claim changes no counter, no credit, no ledger.
        assert await set_status(conn, everything, "sending") == "UPDATE 8"
        assert await ledger(conn) == []
        assert await credits(conn, "acme") == 1000
        assert (await campaign(conn, c1))["sent"] == 0

        # One statement accepting everything: one ledger row per (tenant, campaign).
        assert await set_status(conn, everything, "sent") == "UPDATE 8"
        assert sorted(await ledger(conn), key=str) == sorted([
            ("acme", c1, -6, "send"), ("acme", c2, -2, "send"), ("beta", c3, -5, "send"),
            ("acme", None, -2, "send"),
        ], key=str)
        assert await credits(conn, "acme") == 1000 - 6 - 2 - 2
        assert await credits(conn, "beta") == 1000 - 5
        assert [(await campaign(conn, c))["sent"] for c in (c1, c2, c3)] == [3, 2, 2]

        # Delivery reports move accepted messages on without a second debit.
        assert await set_status(conn, m1[:2], "delivered") == "UPDATE 2"
        assert await set_status(conn, m1[2:], "undelivered") == "UPDATE 1"
        c1_row = await campaign(conn, c1)
        assert (c1_row["sent"], c1_row["delivered"], c1_row["undelivered"]) == (3, 2, 1)
        assert len(await ledger(conn)) == 4
        assert await credits(conn, "acme") == 990

        # Ledger and accepted segments agree, per tenant.
        for tenant in ("acme", "beta"):
            debits = await conn.fetchval(
                "SELECT -sum(delta) FROM sendd.credit_ledger WHERE tenant_id = $1 "
                "AND reason = 'send'", tenant)
            accepted = await conn.fetchval(
                "SELECT sum(segments) FROM sendd.message WHERE tenant_id = $1 "
                "AND status IN ('sent', 'delivered', 'undelivered')", tenant)
            assert debits == accepted

    with_db(database_url, work)


def test_one_ledger_row_per_statement(database_url):
    async def work(conn):
        await add_tenant(conn, "acme", 100)
        c1 = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c1, [1, 2, 3])
        await set_status(conn, ids, "sending")
        await set_status(conn, [ids[0]], "sent")
        await set_status(conn, [ids[1]], "sent")
        await set_status(conn, [ids[2]], "failed")  # not accepted: no debit, no ledger row
        assert await ledger(conn) == [("acme", c1, -1, "send"), ("acme", c1, -2, "send")]
        assert await credits(conn, "acme") == 97
        row = await campaign(conn, c1)
        assert (row["sent"], row["failed"]) == (2, 1)

    with_db(database_url, work)


def test_accepting_more_segments_than_credits_is_refused(database_url):
    async def work(conn):
        await add_tenant(conn, "acme", 2)
        c1 = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c1, [3])
        await set_status(conn, ids, "sending")
        with pytest.raises(asyncpg.CheckViolationError):
            await set_status(conn, ids, "sent")
        assert await credits(conn, "acme") == 2
        assert await ledger(conn) == []
        assert await conn.fetchval("SELECT status FROM sendd.message") == "sending"
        assert (await campaign(conn, c1))["sent"] == 0

    with_db(database_url, work)


def test_campaign_completes_when_every_message_is_final(database_url):
    async def work(conn):
        await add_tenant(conn, "acme", 100)
        c1 = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c1, [1] * 5)
        await set_status(conn, ids[:4], "sending")
        await set_status(conn, ids[:2], "sent")
        await set_status(conn, [ids[2]], "failed")
        await set_status(conn, [ids[3]], "unknown")
        row = await campaign(conn, c1)
        assert row["status"] == "sending"  # ids[4] is still queued
        assert row["finished_at"] is None

        await set_status(conn, [ids[4]], "cancelled")
        row = await campaign(conn, c1)
        assert row["status"] == "completed"
        assert row["finished_at"] is not None
        assert (row["total"], row["sent"], row["failed"], row["unknown"], row["cancelled"]) == (
            5, 2, 1, 1, 1)

    with_db(database_url, work)


def test_transition_allowed_is_exactly_the_allowed_set(database_url):
    async def work(conn):
        rows = await conn.fetch(
            "SELECT a, b, sendd.transition_allowed(a, b) AS ok "
            "FROM unnest($1::text[]) a CROSS JOIN unnest($1::text[]) b", STATUSES)
        return {(r["a"], r["b"]): r["ok"] for r in rows}

    verdicts = with_db(database_url, work)
    assert len(verdicts) == len(STATUSES) ** 2
    for pair in itertools.product(STATUSES, STATUSES):
        assert verdicts[pair] is (pair in ALLOWED), pair
    # The regressions that matter most, named.
    for regression in [("sent", "queued"), ("delivered", "sent"), ("failed", "sending"),
                       ("sent", "sending"), ("cancelled", "queued"), ("delivered", "queued"),
                       ("undelivered", "sent"), ("failed", "queued")]:
        assert verdicts[regression] is False, regression


def test_guarded_update_cannot_regress_a_final_status(database_url):
    async def work(conn):
        await add_tenant(conn, "acme", 100)
        c1 = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c1, [1, 1])
        await set_status(conn, ids, "sending")
        await set_status(conn, [ids[0]], "sent")
        await set_status(conn, [ids[1]], "failed")
        assert await set_status(conn, ids, "queued") == "UPDATE 0"
        assert await set_status(conn, ids, "sending") == "UPDATE 0"
        statuses = await conn.fetch("SELECT status FROM sendd.message ORDER BY id")
        assert [r["status"] for r in statuses] == ["sent", "failed"]
        assert await credits(conn, "acme") == 99

    with_db(database_url, work)


async def in_flight(conn, tenant: str) -> int:
    return await conn.fetchval("SELECT sendd.in_flight_segments($1)", tenant)


async def in_flight_rows(conn) -> int:
    return await conn.fetchval(
        "SELECT sum(segments) FROM sendd.message WHERE status IN ('sending', 'unknown')") or 0


def test_in_flight_segments_follow_every_write_path(database_url):
    """Claims, outcomes, unknowns, releases, deletes and truncation all keep the per-tenant
    in-flight counter equal to the in-flight rows. (A message cannot be inserted in flight.)"""
    async def work(conn):
        await add_tenant(conn, "acme", 1000)
        await add_tenant(conn, "beta", 1000)
        c = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c, [1, 2, 3, 4])
        other = await add_messages(conn, "beta", None, [5])
        seen = []

        async def note() -> None:
            seen.append((await in_flight(conn, "acme"), await in_flight(conn, "beta")))
            assert seen[-1][0] + seen[-1][1] == await in_flight_rows(conn)

        await note()
        await set_status(conn, ids + other, "sending")  # a claim: 10 + 5
        await note()
        await set_status(conn, ids[:1], "sent")  # -1
        await set_status(conn, ids[1:2], "unknown")  # still in flight
        await set_status(conn, ids[2:3], "queued")  # a release: -3
        await note()
        await set_status(conn, ids[1:2], "sent")  # settled: -2
        late = await add_messages(conn, "acme", None, [7])
        await set_status(conn, late, "sending")  # +7
        await note()
        await conn.execute("DELETE FROM sendd.message WHERE id = ANY($1::bigint[])", other)
        await note()
        await conn.execute("TRUNCATE sendd.message, sendd.submission")
        await note()
        return seen

    assert with_db(database_url, work) == [(0, 0), (10, 5), (6, 5), (11, 5), (11, 0), (0, 0)]


def test_in_flight_rows_of_ended_connections_are_folded_into_one(database_url):
    """Each server process counts into its own row (no two transactions share one); the reaper's
    fold merges the rows of processes that have ended without changing the sum."""
    async def work(conn):
        await add_tenant(conn, "acme", 1000)
        c = await add_campaign(conn, "acme")
        ids = await add_messages(conn, "acme", c, [1] * 6)
        for chunk in (ids[:2], ids[2:4]):  # two claims, by two connections that then end
            other = await asyncpg.connect(database_url)
            await set_status(other, chunk, "sending")
            await other.close()
        await set_status(conn, ids[4:], "sending")  # and one by this live connection
        before = await conn.fetch("SELECT backend, segments FROM sendd.tenant_in_flight "
                                  "WHERE segments <> 0 ORDER BY backend")
        ended = [r["backend"] for r in before]
        for _ in range(100):  # a closed connection's server process takes a moment to exit
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity "
                                       "WHERE pid = ANY($1::int[]) AND pid <> pg_backend_pid()",
                                       ended):
                break
            await asyncio.sleep(0.05)
        await conn.execute("SELECT sendd.fold_in_flight()")
        after = await conn.fetch("SELECT backend, segments FROM sendd.tenant_in_flight "
                                 "WHERE segments <> 0 ORDER BY backend")
        mine = await conn.fetchval("SELECT pg_backend_pid()")
        return [tuple(r) for r in before], [tuple(r) for r in after], mine, \
            await in_flight(conn, "acme")

    before, after, mine, total = with_db(database_url, work)
    assert len(before) == 3 and sum(s for _, s in before) == 6
    assert after == [(0, 4), (mine, 2)]
    assert total == 6


def test_counters_trigger_plan_does_not_depend_on_the_first_call(database_url):
    """PL/pgSQL plans a trigger's statements once per server process, for the row counts of
    the first call. A trigger that joined its transition tables kept the nested loop planned
    for one row, and a later 2,000-row update on the same connection compared 2,000 x 2,000
    rows (the multi-daemon writer stalls, found on 2026-12-02). The plans, read with
    auto_explain after warming the connection with one-row updates, must not join the
    transition tables at all."""

    async def work(conn):
        await add_tenant(conn, "t1", 1_000_000)
        campaign_id = await add_campaign(conn, "t1")
        ids = await add_messages(conn, "t1", campaign_id, [1] * 2010)
        for single in ids[:5]:  # the first calls, one row each: what the plans are made for
            await set_status(conn, [single], "sending")
            await set_status(conn, [single], "sent")
        plans: list[str] = []
        conn.add_log_listener(lambda _conn, message: plans.append(message.message))
        await conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on",
                        "log_level = notice"):
            await conn.execute(f"SET auto_explain.{setting}")
        await set_status(conn, ids[10:], "sending")
        await set_status(conn, ids[10:], "sent")
        await conn.execute("RESET auto_explain.log_min_duration")
        transition_plans = [p for p in plans if "Named Tuplestore Scan" in p]
        assert transition_plans, plans
        for plan in transition_plans:
            assert "Join" not in plan and "Nested Loop" not in plan, plan
        row = await campaign(conn, campaign_id)
        assert row["sent"] == 2005

    with_db(database_url, work)
