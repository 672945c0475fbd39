"""One outcome the database refuses never holds up the others (issue 13, item 6).

In process, against a real PostgreSQL: messages are claimed and marked as a sender would, and
the writer's `flush` gets outcomes of which some cannot be stored as they are. Faults the
database raises for one row are injected as a trigger (a real refusal, no mock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import trio
import trio_asyncio
import triopg

from harness import write_config
from parts import make_parts
from sendd.actors import poller
from sendd.actors.reaper import run_reaper
from sendd.actors.writer import flush
from sendd.commands import tenants
from sendd.config import load_config
from sendd.db import leases, migrate
from sendd.model import FAILED, RETRY, SENT, BatchResult, Message, Outcome
from sendd.pipeline import Parts

INSTANCE = "d1"

# The database refuses this row whatever its texts (as a trigger or constraint of an
# application's might), until the settler brings what the provider's lookup says.
REFUSE_SENT = """
CREATE FUNCTION sendd_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'sent' AND (NEW.bulk_id IS NOT NULL OR NEW.provider_message_id IS NULL) THEN
        RAISE EXCEPTION 'refused for the test' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE UPDATE ON sendd.message FOR EACH ROW
WHEN (NEW.id = {id}) EXECUTE FUNCTION sendd_test_refuse();
"""


@asynccontextmanager
async def _parts(url: str, tmp: Path) -> AsyncIterator[Parts]:
    config = load_config(str(write_config(tmp / "sendd.toml", url, "http://127.0.0.1:9")), env={})
    with trio.fail_after(60):
        async with trio_asyncio.open_loop(), triopg.create_pool(url) as pool:
            yield make_parts(config, instance_id=INSTANCE, pool=pool,
                             lease_until=trio.current_time() + 60, now=trio.current_time())


async def _claimed(parts: Parts, count: int) -> list[Message]:
    async with parts.pool.acquire() as conn:
        await migrate.migrate(conn)
        await tenants.set_tenant(conn, "shop", credits=1_000)
        campaign = await conn.fetchval("INSERT INTO sendd.campaign (tenant_id, status, "
                                       "started_at) VALUES ('shop', 'sending', now()) "
                                       "RETURNING id")
        await conn.execute(
            "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body)"
            " SELECT 'shop', $1, 'main', '+3069' || lpad(i::text, 8, '0'), 'hi'"
            " FROM generate_series(1, $2) i", campaign, count)
        await leases.register(conn, INSTANCE, 60)
        claim = await poller.claim_due(conn, parts.claimer())
    messages = sorted(claim.messages, key=lambda m: m.id)
    assert len(messages) == count
    return messages


async def _mark(parts: Parts, messages: list[Message]) -> int:
    async with parts.pool.acquire() as conn:
        return await conn.fetchval("INSERT INTO sendd.submission (instance_id, account, "
                                   "message_ids) VALUES ($1, 'main', $2) RETURNING id",
                                   INSTANCE, [m.id for m in messages])


async def _rows(parts: Parts) -> dict[int, Any]:
    async with parts.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM sendd.message ORDER BY id")
    return {r["id"]: r for r in rows}


async def _fetch(parts: Parts, sql: str, *args: Any) -> list[Any]:
    async with parts.pool.acquire() as conn:
        return await conn.fetch(sql, *args)


def _metric(parts: Parts, name: str, **labels: str) -> float | None:
    return parts.metrics.registry.get_sample_value(name, labels)


def _sent(message: Message) -> Outcome:
    return Outcome(message, SENT, "bulk-1", f"id-{message.id}")


async def test_outcomes_the_database_refuses_are_stored_without_their_texts(
        database_url: str, tmp_path: Path) -> None:
    async with _parts(database_url, tmp_path) as parts:
        messages = await _claimed(parts, 10)
        first, second = await _mark(parts, messages[:5]), await _mark(parts, messages[5:])
        outcomes = [_sent(m) for m in messages]
        # PostgreSQL text cannot hold NUL (refused by the server) nor a lone surrogate (refused
        # by the client before it is sent).
        outcomes[2] = Outcome(messages[2], SENT, "bulk-1", "bad\x00id-3")
        outcomes[6] = Outcome(messages[6], FAILED, error_code="INVALID_NUMBER",
                              error_text="not a mobile number\x00")
        outcomes[8] = Outcome(messages[8], RETRY, error_code="HTTP_503", error_text="x\ud800",
                              retry_in=1.0)
        with structlog.testing.capture_logs() as logs:
            await flush(parts.store(), [BatchResult(first, outcomes[:5]),
                                  BatchResult(second, outcomes[5:])])
        rows = await _rows(parts)
        marks = await _fetch(parts, "SELECT id FROM sendd.submission")
        debits = await _fetch(parts, "SELECT sum(delta) AS d FROM sendd.credit_ledger "
                                       "WHERE reason = 'send'")

    ids = [m.id for m in messages]
    assert [rows[i]["status"] for i in ids] == ["sent"] * 6 + ["failed", "sent", "queued", "sent"]
    assert all(rows[i]["lease_owner"] is None for i in ids)
    # The stored ones as they were; the refused ones without anything from outside.
    assert [rows[i]["provider_message_id"] for i in ids] == [
        f"id-{i}" if n != 2 else None for n, i in enumerate(ids)][:6] + [
        None, f"id-{ids[7]}", None, f"id-{ids[9]}"]
    assert rows[ids[2]]["bulk_id"] is None and rows[ids[3]]["bulk_id"] == "bulk-1"
    assert rows[ids[6]]["error_code"] == "INVALID_NUMBER"
    assert "could not be stored" in rows[ids[6]]["error_text"]
    assert rows[ids[8]]["error_code"] == "HTTP_503" and rows[ids[8]]["attempts"] == 1
    assert marks == []  # every outcome stored: both marks closed
    assert debits[0]["d"] == -8  # billed exactly the accepted ones, the id-less one included
    stripped = [e for e in logs if e["event"] == "outcomes_stored_stripped"]
    assert len(stripped) == 1 and stripped[0]["messages"] == [ids[2], ids[6], ids[8]], logs
    assert _metric(parts, "sendd_unstorable_outcomes_total", handling="stripped") == 3


async def test_an_outcome_that_cannot_be_stored_at_all_goes_to_settlement_once(
        database_url: str, tmp_path: Path) -> None:
    async with _parts(database_url, tmp_path) as parts:
        messages = await _claimed(parts, 10)
        stuck = messages[3]
        async with parts.pool.acquire() as conn:
            await conn.execute(REFUSE_SENT.format(id=stuck.id))
        first, second = await _mark(parts, messages[:5]), await _mark(parts, messages[5:])
        outcomes = [_sent(m) for m in messages]
        with structlog.testing.capture_logs() as logs:
            await flush(parts.store(), [BatchResult(first, outcomes[:5]),
                                  BatchResult(second, outcomes[5:])])
        rows = await _rows(parts)
        marks = await _fetch(parts, "SELECT id, message_ids, adopted_at FROM sendd.submission")
        problems = parts.health.current_problems()
        # The reaper hands the mark to the settler, as it does a dead daemon's.
        send, receive = trio.open_memory_channel(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reaper, parts.pool, parts.reaper(), send)
            with trio.fail_after(10):
                handed = await receive.receive()
            nursery.cancel_scope.cancel()

    assert [rows[m.id]["status"] for m in messages] == ["sent"] * 3 + ["sending"] + ["sent"] * 6
    assert rows[stuck.id]["lease_owner"] == INSTANCE
    # Its batch's mark now holds it alone (the others are stored, and may be claimed again:
    # settling them under this mark could undo that), handed over for settlement.
    [mark] = marks
    assert (mark["id"], mark["message_ids"]) == (first, [stuck.id])
    assert mark["adopted_at"] is not None
    assert "writer" in problems and "settlement" in problems["writer"]
    not_stored = [e for e in logs if e["event"] == "outcomes_not_stored"]
    assert len(not_stored) == 1 and not_stored[0]["messages"] == [stuck.id], logs
    assert (handed.submission_id, [m.id for m in handed.messages]) == (first, [stuck.id])
    assert _metric(parts, "sendd_unstorable_outcomes_total", handling="settlement") == 1


async def test_the_settler_s_outcome_for_a_handed_over_mark_is_stored(
        database_url: str, tmp_path: Path) -> None:
    async with _parts(database_url, tmp_path) as parts:
        messages = await _claimed(parts, 4)
        stuck = messages[1]
        async with parts.pool.acquire() as conn:
            await conn.execute(REFUSE_SENT.format(id=stuck.id))
        mark = await _mark(parts, messages)
        await flush(parts.store(), [BatchResult(mark, [_sent(m) for m in messages])])
        # What the settler brings: found by its reference, with the lookup's id.
        await flush(parts.store(), [BatchResult(mark, [Outcome(stuck, SENT, None, "looked-up")])])
        rows = await _rows(parts)
        marks = await _fetch(parts, "SELECT id FROM sendd.submission")

    assert [rows[m.id]["status"] for m in messages] == ["sent"] * 4
    assert rows[stuck.id]["provider_message_id"] == "looked-up"
    assert marks == []


async def test_own_marks_held_far_longer_than_a_request_are_reported(
        database_url: str, tmp_path: Path) -> None:
    async with _parts(database_url, tmp_path) as parts:
        messages = await _claimed(parts, 3)
        old = await _mark(parts, messages[:2])
        young = await _mark(parts, messages[2:])
        async with parts.pool.acquire() as conn:
            await conn.execute("UPDATE sendd.submission SET created_at = now() - interval "
                               "'1 hour' WHERE id = $1", old)
        send, _receive = trio.open_memory_channel(1)
        reaper = parts.reaper()
        with structlog.testing.capture_logs() as logs:
            async with parts.pool.acquire() as conn:
                for _ in range(2):
                    await reaper.run_once(conn, send)
        problems = parts.health.current_problems()

    assert young != old
    assert "reaper" in problems, problems
    assert "1 submission mark" in problems["reaper"] and "2 messages" in problems["reaper"]
    stale = [e for e in logs if e["event"] == "marks_stale"]
    assert len(stale) == 1 and stale[0]["marks"] == [old], logs  # logged once, not per pass
    assert _metric(parts, "sendd_stale_marks") == 1
