"""Applications insert into sendd.message and sendd.campaign directly (the integration surface):
the database itself keeps those rows honest (migration 0008). A new message is `queued`, its
segments cover its body, its tenant is its campaign's, its campaign still takes messages, and a
malformed recipient fails at once; a campaign is loaded as `draft` and started explicitly."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import (
    Daemon,
    FakeProvider,
    assert_user_error,
    numbers,
    query,
    scalar,
    sendd,
    sendd_json,
    setup_database,
    wait_until,
    write_config,
)
from sendd.commands import campaigns
from sendd.commands.enqueue import normalize_number
from sendd.core.segments import GSM7_BASIC, GSM7_EXTENSION, count_segments
from sendd.db import migrate
from sendd.errors import UserError

LONG_BODY = "x" * 600  # GSM-7: 4 parts of 153
NO_PROVIDER = "http://127.0.0.1:9"  # never contacted


def with_db(url: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Migrate the fresh database, add tenants acme and other, then run work(conn)."""

    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            await migrate.migrate(conn)
            await conn.execute("INSERT INTO sendd.tenant (id, credits) "
                               "VALUES ('acme', 1000), ('other', 1000)")
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


async def add_campaign(conn: asyncpg.Connection, tenant: str = "acme", **columns: Any) -> int:
    names = ["tenant_id", *columns]
    values = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    return await conn.fetchval(
        f"INSERT INTO sendd.campaign ({', '.join(names)}) VALUES ({values}) RETURNING id",
        tenant, *columns.values())


async def add_message(conn: asyncpg.Connection, campaign: int | None,
                      recipient: str = "+306900000001", tenant: str = "acme", body: str = "hi",
                      **columns: Any) -> int:
    names = ["tenant_id", "campaign_id", "account", "recipient", "body", *columns]
    values = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    return await conn.fetchval(
        f"INSERT INTO sendd.message ({', '.join(names)}) VALUES ({values}) RETURNING id",
        tenant, campaign, "main", recipient, body, *columns.values())


async def move(conn: asyncpg.Connection, ids: list[int], status: str) -> None:
    """One status change as a daemon makes it (guarded by the state machine)."""
    owner = "d1" if status == "sending" else None
    await conn.execute(
        """UPDATE sendd.message m SET status = $2, lease_owner = $3
           WHERE id = ANY($1::bigint[]) AND sendd.transition_allowed(m.status, $2)""",
        ids, status, owner)


async def refused(conn: asyncpg.Connection, insert: Awaitable[Any]) -> str:
    """The error of an insert the database must refuse; nothing of it may be stored."""
    before = await conn.fetchval("SELECT count(*) FROM sendd.message")
    totals = await conn.fetchval("SELECT coalesce(sum(total), 0) FROM sendd.campaign")
    with pytest.raises(asyncpg.PostgresError) as error:
        await insert
    assert await conn.fetchval("SELECT count(*) FROM sendd.message") == before
    assert await conn.fetchval("SELECT coalesce(sum(total), 0) FROM sendd.campaign") == totals
    return str(error.value)


# --- what a new message must be ---------------------------------------------------------------

def test_a_new_message_must_be_queued_unclaimed_and_unattempted(database_url):
    async def work(conn):
        campaign = await add_campaign(conn, status="sending")
        errors = [await refused(conn, add_message(conn, campaign, status=status))
                  for status in ("sending", "sent", "delivered", "failed", "unknown")]
        errors.append(await refused(conn, add_message(conn, campaign, lease_owner="d1")))
        errors.append(await refused(conn, add_message(conn, campaign, attempts=3)))
        # COPY (what `sendd enqueue` and bulk loaders use) is held to the same rule.
        errors.append(await refused(conn, conn.copy_records_to_table(
            "message", schema_name="sendd", records=[("acme", campaign, "main", "+306900000002",
                                                      "hi", "sent")],
            columns=["tenant_id", "campaign_id", "account", "recipient", "body", "status"])))
        return errors

    errors = with_db(database_url, work)
    for error, column in zip(errors, ["status"] * 5 + ["lease_owner", "attempts", "status"],
                             strict=True):
        assert f"sendd.message.{column}" in error, error
        assert "\n" not in error


def test_segments_are_computed_from_the_body_and_never_below_it(database_url):
    async def work(conn):
        campaign = await add_campaign(conn, status="sending")
        omitted = await add_message(conn, campaign, body=LONG_BODY)
        too_low = await add_message(conn, campaign, body=LONG_BODY, segments=2)
        higher = await add_message(conn, campaign, body=LONG_BODY, segments=6)
        short = await add_message(conn, campaign, body="hi")
        ids = [omitted, too_low, higher, short]
        stored = [await conn.fetchval("SELECT segments FROM sendd.message WHERE id = $1", i)
                  for i in ids]
        # Updates keep the rule too: a longer body, or a lower count, is billed as it needs.
        await conn.execute("UPDATE sendd.message SET body = $2 WHERE id = $1", short, LONG_BODY)
        await conn.execute("UPDATE sendd.message SET segments = 1 WHERE id = $1", higher)
        updated = [await conn.fetchval("SELECT segments FROM sendd.message WHERE id = $1", i)
                   for i in (short, higher)]
        await move(conn, ids, "sending")
        await move(conn, ids, "sent")
        debit = await conn.fetchval("SELECT -sum(delta) FROM sendd.credit_ledger")
        return stored, updated, debit

    stored, updated, debit = with_db(database_url, work)
    assert stored == [4, 4, 6, 1]
    assert updated == [4, 4]
    assert debit == 16


def test_a_message_must_belong_to_its_campaigns_tenant(database_url):
    async def work(conn):
        campaign = await add_campaign(conn, "acme", status="sending")
        return await refused(conn, add_message(conn, campaign, tenant="other"))

    error = with_db(database_url, work)
    assert "sendd.message.tenant_id" in error and "'other'" in error and "'acme'" in error


def test_a_campaign_is_loaded_as_draft_and_takes_no_messages_once_finished(database_url):
    async def work(conn):
        campaign = await add_campaign(conn)  # the default status
        first = [await add_message(conn, campaign, f"+30690000000{i}") for i in range(5)]
        seen = [await conn.fetchval("SELECT status FROM sendd.campaign WHERE id = $1", campaign)]
        await move(conn, first, "sending")
        await move(conn, first, "sent")
        # Still loading: five sent messages do not complete a draft.
        seen.append(await conn.fetchval("SELECT status FROM sendd.campaign WHERE id = $1",
                                        campaign))
        later = [await add_message(conn, campaign, f"+30690000001{i}") for i in range(5)]
        seen.append((await campaigns.start(conn, campaign))["status"])
        await move(conn, later, "sending")
        await move(conn, later, "sent")
        seen.append(await conn.fetchval("SELECT status FROM sendd.campaign WHERE id = $1",
                                        campaign))
        after_completed = await refused(conn, add_message(conn, campaign))
        cancelled = await add_campaign(conn, status="cancelled")
        after_cancelled = await refused(conn, add_message(conn, cancelled))
        return seen, after_completed, after_cancelled

    seen, after_completed, after_cancelled = with_db(database_url, work)
    assert seen == ["draft", "draft", "sending", "completed"]
    assert "is completed" in after_completed and "sendd.message.campaign_id" in after_completed
    assert "is cancelled" in after_cancelled


def test_a_campaign_is_inserted_with_no_counts(database_url):
    async def work(conn):
        with pytest.raises(asyncpg.PostgresError) as error:
            await add_campaign(conn, status="sending", total=5, sent=5)
        return str(error.value), await conn.fetchval("SELECT count(*) FROM sendd.campaign")

    error, campaigns_stored = with_db(database_url, work)
    assert "sendd.campaign.total" in error
    assert campaigns_stored == 0


# --- recipients ---------------------------------------------------------------------------------

MALFORMED = ["hello", "1" * 10_000, "+30690", "0030690000000", "+30 690 000 0001", "++306900000001",
             "+0306900000001", ""]


def test_malformed_recipients_fail_at_once_and_are_counted(database_url):
    async def work(conn):
        campaign = await add_campaign(conn)
        good = [await add_message(conn, campaign, r) for r in ("+306900000001", "306900000002")]
        bad = [await add_message(conn, campaign, r) for r in MALFORMED]
        transactional = await add_message(conn, None, "hello")
        rows = await conn.fetch("SELECT status, error_code, error_text, finished_at "
                                "FROM sendd.message WHERE id = ANY($1::bigint[])",
                                [*bad, transactional])
        started = await campaigns.start(conn, campaign)
        await move(conn, good, "sending")
        await move(conn, good, "sent")
        row = await conn.fetchrow("SELECT * FROM sendd.campaign WHERE id = $1", campaign)
        # A campaign of malformed numbers only completes as soon as it starts.
        hopeless = await add_campaign(conn)
        await add_message(conn, hopeless, "hello")
        return rows, started, dict(row), await campaigns.start(conn, hopeless)

    rows, started, campaign, hopeless = with_db(database_url, work)
    assert {(r["status"], r["error_code"]) for r in rows} == {("failed", "INVALID_NUMBER")}
    assert all(r["error_text"] and r["finished_at"] for r in rows)
    assert started["status"] == "sending"
    assert campaign["status"] == "completed"
    assert (campaign["total"], campaign["sent"], campaign["failed"]) == (10, 2, 8)
    assert hopeless["status"] == "completed"


def test_every_number_enqueue_accepts_is_well_formed_for_the_database(database_url):
    """`sendd enqueue` rejects what the database would fail: its numbers always pass."""
    examples = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in range(12):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                examples.add(phonenumbers.format_number(
                    example, phonenumbers.PhoneNumberFormat.E164))
    normalized = sorted({n for n in map(normalize_number, examples) if n is not None})
    assert len(normalized) > 900

    async def work(conn):
        return await conn.fetchval(
            "SELECT array_agg(r) FROM unnest($1::text[]) AS r WHERE NOT sendd.recipient_valid(r)",
            normalized)

    assert with_db(database_url, work) is None
    assert normalize_number("+989601") is None  # valid for phonenumbers, but 6 digits


# --- one segment rule: the SQL function agrees with sendd.core.segments ---

EXTRA = ["é", "ü", "ç", "Ж", "中", "\x1b", "\t", "`", "\uffff", "😀", "𝄞", "\U00010000",
         "\U0010ffff"]
ALPHABETS = [sorted(GSM7_BASIC), sorted(GSM7_BASIC | GSM7_EXTENSION),
             sorted(GSM7_BASIC | GSM7_EXTENSION) + EXTRA, ["😀", "a", "€"],
             st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")]
BODIES = st.one_of(*[st.text(alphabet=a if isinstance(a, st.SearchStrategy) else
                             st.sampled_from(a), max_size=700) for a in ALPHABETS])


def test_sql_and_python_count_segments_alike(database_url):
    with_db(database_url, lambda conn: asyncio.sleep(0))  # the schema, then the property
    _agree_on(database_url)


def _agree_on(database_url: str) -> None:
    """The property, on one connection in a loop of its own (hypothesis calls synchronously)."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(database_url))
    try:
        @settings(max_examples=300, deadline=None)
        @given(st.lists(BODIES, min_size=1, max_size=20))
        def agree(bodies: list[str]) -> None:
            counted = loop.run_until_complete(conn.fetch(
                "SELECT sendd.segments_needed(b) AS n FROM unnest($1::text[]) "
                "WITH ORDINALITY AS u(b, i) ORDER BY i", bodies))
            assert [r["n"] for r in counted] == [count_segments(b) for b in bodies]

        agree()
        # The edges, explicitly: escape pairs and surrogate pairs at a part boundary.
        edges = ["a" * 152 + "€" + "a" * 10, "a" * 160, "a" * 161, "€" * 80, "€" * 81,
                 "ж" * 70, "ж" * 71, "ж" * 66 + "😀" + "ж" * 10, "😀" * 35, "😀" * 36]
        counted = loop.run_until_complete(conn.fetch(
            "SELECT sendd.segments_needed(b) AS n FROM unnest($1::text[]) "
            "WITH ORDINALITY AS u(b, i) ORDER BY i", edges))
        assert [r["n"] for r in counted] == [count_segments(b) for b in edges]
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


# --- campaign start and resume --------------------------------------------------------------

def test_start_moves_a_draft_on_and_resume_keeps_a_schedule(tmp_path, database_url):
    config = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    setup_database(config, {"acme": 100})

    def draft(scheduled_in: timedelta | None, messages: int = 1) -> int:
        campaign = scalar(database_url, "INSERT INTO sendd.campaign (tenant_id, scheduled_at) "
                          "VALUES ('acme', now() + $1::interval) RETURNING id",
                          scheduled_in)
        for recipient in numbers(messages):
            query(database_url, "INSERT INTO sendd.message (tenant_id, campaign_id, account, "
                  "recipient, body) VALUES ('acme', $1, 'main', $2, 'hi')", campaign, recipient)
        return campaign

    now, later = draft(None), draft(timedelta(days=30))
    assert sendd_json(config, "campaign", "start", str(now))["status"] == "sending"
    assert sendd_json(config, "campaign", "start", str(later))["status"] == "scheduled"
    assert_user_error(sendd(config, "campaign", "start", str(now), check=False), "sending")
    assert_user_error(sendd(config, "campaign", "start", str(draft(None, 0)), check=False),
                      "no messages")

    # Paused and resumed 30 days ahead of its time: scheduled again, not sent at once.
    assert sendd_json(config, "campaign", "pause", str(later))["status"] == "paused"
    resumed = sendd_json(config, "campaign", "resume", str(later))
    assert resumed == {"campaign_id": later, "status": "scheduled", "was": "paused"}
    assert scalar(database_url, "SELECT started_at FROM sendd.campaign WHERE id = $1",
                  later) is None
    # Once its time has come, resume sends it.
    query(database_url, "UPDATE sendd.campaign SET scheduled_at = now() - interval '1 minute', "
          "status = 'paused' WHERE id = $1", later)
    assert sendd_json(config, "campaign", "resume", str(later))["status"] == "sending"


def test_resume_of_an_enqueued_campaign_scheduled_ahead(tmp_path, database_url):
    config = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    setup_database(config, {"acme": 100})
    path = tmp_path / "r.txt"
    path.write_text("\n".join(numbers(3)) + "\n")
    at = (datetime.now(UTC) + timedelta(days=30)).isoformat(timespec="seconds")
    queued = sendd_json(config, "enqueue", "--tenant", "acme", "--text", "hi", "--at", at,
                        "--recipients", str(path))
    campaign = str(queued["campaign_id"])
    assert sendd_json(config, "campaign", "show", campaign)["status"] == "scheduled"
    sendd_json(config, "campaign", "pause", campaign)
    assert sendd_json(config, "campaign", "resume", campaign)["status"] == "scheduled"


def test_start_of_an_unknown_campaign_is_a_user_error(database_url):
    async def work(conn):
        with pytest.raises(UserError, match="no campaign with id 99"):
            await campaigns.start(conn, 99)

    with_db(database_url, work)


# --- the documented flow, end to end ------------------------------------------------------------

def test_direct_inserts_end_to_end(tmp_path: Path, database_url: str):
    """Create a draft, insert its messages (one malformed, one long without segments), start it:
    the daemon sends only the well-formed ones, bills the long one in full, and completes it."""
    with FakeProvider() as provider:
        config = write_config(tmp_path / "sendd.toml", database_url, provider.url)
        setup_database(config, {"acme": 100})
        campaign = scalar(database_url, "INSERT INTO sendd.campaign (tenant_id, name) "
                          "VALUES ('acme', 'direct') RETURNING id")
        good = numbers(20)
        for i, recipient in enumerate([*good, "hello"]):
            query(database_url, "INSERT INTO sendd.message (tenant_id, campaign_id, account, "
                  "sender, recipient, body) VALUES ('acme', $1, 'main', 'ACME', $2, $3)",
                  campaign, recipient, LONG_BODY if i == 0 else "Hello from sendd")
        with Daemon(config, tmp_path / "daemon.log").wait_ready():
            assert sendd_json(config, "campaign", "start", str(campaign))["status"] == "sending"
            wait_until(lambda: scalar(database_url, "SELECT status FROM sendd.campaign "
                                      "WHERE id = $1", campaign) == "completed",
                       30, "the campaign to complete")
        stats = provider.stats()
    shown = sendd_json(config, "campaign", "show", str(campaign))
    assert (shown["total"], shown["sent"], shown["failed"]) == (21, 20, 1)
    assert stats["messages"] == 20
    assert scalar(database_url, "SELECT credits FROM sendd.tenant") == 100 - (4 + 19)
    assert scalar(database_url, "SELECT -sum(delta) FROM sendd.credit_ledger "
                  "WHERE reason = 'send'") == 23


# --- existing databases -----------------------------------------------------------------------

async def migrate_to(conn: asyncpg.Connection, version: int) -> None:
    """The schema as `sendd migrate` of an older release left it."""
    await conn.execute(migrate.BOOTSTRAP)
    for number, name, sql in migrate.available_migrations():
        if number <= version:
            await conn.execute(sql)
            await conn.execute("INSERT INTO sendd.schema_migration (version, name) "
                               "VALUES ($1, $2)", number, name)


async def schema_7_with_every_status(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows in every status made the way daemons make them, and the broken rows schema 7 let an
    application insert. Returns the ids to look at."""
    await migrate_to(conn, 7)
    await conn.execute("INSERT INTO sendd.tenant (id, credits) "
                       "VALUES ('acme', 1000), ('other', 1000), ('legacy', 1000)")
    await conn.execute("INSERT INTO sendd.instance (id, hostname, pid, lease_until) "
                       "VALUES ('d1', 'h', 1, now() + interval '1 hour')")
    main = await add_campaign(conn)  # schema 7's default: sending
    ids = [await add_message(conn, main, f"+30690000{i:04d}", segments=2) for i in range(9)]
    await move(conn, ids[:8], "sending")
    await move(conn, ids[:6], "sent")
    await move(conn, ids[4:5], "delivered")
    await move(conn, ids[5:6], "undelivered")
    await move(conn, ids[6:7], "failed")
    await move(conn, ids[7:8], "unknown")
    await move(conn, ids[8:9], "cancelled")
    held = await add_message(conn, main, "+306900001000")
    await move(conn, [held], "sending")  # held by a live daemon: stays sending
    broken = {
        "ownerless": await add_message(conn, None, "+306900002000", status="sending", segments=3),
        "strangers": await add_message(conn, None, "+306900002001", status="sending",
                                       lease_owner="gone"),
        "malformed": await add_message(conn, main, "hello"),
        "long": await add_message(conn, main, "+306900002002", body=LONG_BODY),
        "mismatch": await add_message(conn, main, "+306900002003", tenant="other"),
    }
    done = await add_campaign(conn)
    first = await add_message(conn, done, "+306900003000")
    await move(conn, [first], "sending")
    await move(conn, [first], "sent")  # completes the campaign
    broken["late"] = await add_message(conn, done, "+306900003001")
    cancelled = await add_campaign(conn)
    await campaigns.cancel(conn, cancelled)
    broken["after_cancel"] = await add_message(conn, cancelled, "+306900003002")
    legacy = await add_campaign(conn, "legacy")
    broken["inserted_sent"] = await add_message(conn, legacy, "+306900004000", tenant="legacy",
                                                status="sent")
    await add_message(conn, legacy, "+306900004001", tenant="legacy")
    return broken | {"held": held, "done": done, "cancelled": cancelled, "legacy": legacy}


def test_migrate_from_schema_7_with_rows_in_every_status(tmp_path, database_url):
    ids = with_raw_db(database_url, schema_7_with_every_status)
    config = write_config(tmp_path / "sendd.toml", database_url, NO_PROVIDER)
    result = json.loads(sendd(config, "migrate").stdout)
    assert "0008_honest_inserts" in result["applied"]

    def row(name: str) -> asyncpg.Record:
        return query(database_url, "SELECT * FROM sendd.message WHERE id = $1", ids[name])[0]

    # Everything is counted as the rows say; the ledger and in-flight segments are exact.
    counted = query(database_url, """
        SELECT c.id, c.total, c.sent, c.failed, c.delivered, c.undelivered, c.unknown,
               c.cancelled, r.*
        FROM sendd.campaign c LEFT JOIN LATERAL (
            SELECT count(m.id) AS r_total,
                   count(*) FILTER (WHERE m.status IN ('sent', 'delivered', 'undelivered'))
                       AS r_sent,
                   count(*) FILTER (WHERE m.status = 'failed') AS r_failed,
                   count(*) FILTER (WHERE m.status = 'delivered') AS r_delivered,
                   count(*) FILTER (WHERE m.status = 'undelivered') AS r_undelivered,
                   count(*) FILTER (WHERE m.status = 'unknown') AS r_unknown,
                   count(*) FILTER (WHERE m.status = 'cancelled') AS r_cancelled
            FROM sendd.message m WHERE m.campaign_id = c.id) r ON true""")
    for c in counted:
        for column in ("total", "sent", "failed", "delivered", "undelivered", "unknown",
                       "cancelled"):
            assert c[column] == c[f"r_{column}"], (c["id"], column)
    ledger = query(database_url, """
        SELECT t.id,
               (SELECT coalesce(-sum(delta), 0) FROM sendd.credit_ledger l
                WHERE l.tenant_id = t.id AND l.reason = 'send') AS debited,
               (SELECT coalesce(sum(segments), 0) FROM sendd.message m WHERE m.tenant_id = t.id
                AND m.status IN ('sent', 'delivered', 'undelivered')) AS accepted,
               sendd.in_flight_segments(t.id) AS in_flight,
               (SELECT coalesce(sum(segments), 0) FROM sendd.message m WHERE m.tenant_id = t.id
                AND m.status IN ('sending', 'unknown')) AS in_flight_rows
        FROM sendd.tenant t WHERE t.id <> 'legacy'""")  # legacy: a row inserted as sent, unbilled
    for t in ledger:
        assert (t["debited"], t["in_flight"]) == (t["accepted"], t["in_flight_rows"]), t["id"]

    # The rows schema 7 let in are what schema 8 would have made of them.
    assert (row("ownerless")["status"], row("strangers")["status"]) == ("queued", "queued")
    assert row("held")["status"] == "sending"
    assert (row("malformed")["status"], row("malformed")["error_code"]) == (
        "failed", "INVALID_NUMBER")
    assert row("long")["segments"] == 4
    assert (row("mismatch")["status"], row("mismatch")["error_code"]) == (
        "failed", "TENANT_MISMATCH")
    assert row("after_cancel")["status"] == "cancelled"
    assert row("late")["status"] == "queued"
    done = query(database_url, "SELECT * FROM sendd.campaign WHERE id = $1", ids["done"])[0]
    assert done["status"] == "paused" and "migration" in done["pause_reason"]
    assert scalar(database_url, "SELECT sent FROM sendd.campaign WHERE id = $1",
                  ids["legacy"]) == 1
    assert scalar(database_url, "SELECT count(*) FROM sendd.message WHERE status = 'sending' "
                  "AND lease_owner IS DISTINCT FROM 'd1'") == 0
    assert scalar(database_url, "INSERT INTO sendd.campaign (tenant_id) VALUES ('acme') "
                  "RETURNING status") == "draft"


def with_raw_db(url: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())
