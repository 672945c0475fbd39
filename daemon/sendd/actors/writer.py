"""The writer: group-commits outcomes, one statement per flush.

A flush updates every message of the pending results and deletes their submission marks in
one statement (one round trip, one transaction); the schema's triggers keep campaign
counters, completion, credits and the ledger in the same transaction. When the database is
away the writer keeps its results and retries; meanwhile it stops receiving, so the senders
and then the poller stop too (the results are bounded by the channel). When the database
refuses a flush for what is in it, the writer stores its outcomes apart (see `store_apart`), so
one bad outcome never holds up the others.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import structlog
import trio

from sendd.config import PipelineConfig
from sendd.db.retry import retrying
from sendd.errors import describe
from sendd.metrics import Metrics
from sendd.model import FAILED, RELEASE, RETRY, SENT, UNKNOWN, BatchResult, Outcome
from sendd.state.health import Health

log = structlog.get_logger()

STORED_STATUS = {SENT: "sent", FAILED: "failed", RETRY: "queued", RELEASE: "queued",
                 UNKNOWN: "unknown"}

WRITE_OUTCOMES = """
-- Only our own marks: a mark adopted by a reaper (our lease ended) is the adopter's to close.
WITH marks AS (DELETE FROM sendd.submission WHERE id = ANY($1::bigint[]) AND instance_id = $10)
UPDATE sendd.message m SET
    status = CASE WHEN r.status = 'queued' AND EXISTS (
                      SELECT 1 FROM sendd.campaign c
                      WHERE c.id = m.campaign_id AND c.status = 'cancelled')
                  THEN 'cancelled' ELSE r.status END,
    attempts = m.attempts + r.attempt,
    next_attempt_at = CASE WHEN r.status = 'queued'
                           THEN now() + make_interval(secs => r.retry_in)
                           ELSE m.next_attempt_at END,
    bulk_id = coalesce(r.bulk_id, m.bulk_id),
    provider_message_id = coalesce(r.provider_message_id, m.provider_message_id),
    error_code = CASE WHEN r.status = 'sent' THEN NULL ELSE coalesce(r.code, m.error_code) END,
    error_text = CASE WHEN r.status = 'sent' THEN NULL ELSE coalesce(r.text, m.error_text) END,
    sent_at = CASE WHEN r.status = 'sent' THEN now() ELSE m.sent_at END,
    finished_at = CASE WHEN r.status = 'queued' THEN NULL ELSE now() END,
    lease_owner = NULL
FROM unnest($2::bigint[], $3::text[], $4::int[], $5::float8[], $6::text[], $7::text[],
            $8::text[], $9::text[])
     AS r(id, status, attempt, retry_in, bulk_id, provider_message_id, code, text)
WHERE m.id = r.id AND m.lease_owner = $10
  -- = 'sending', written so that the planner cannot use message_in_flight: its statistics
  -- often say a handful of rows are in flight, and it would then read every in-flight row of
  -- this daemon (tens of thousands) into a hash for each flush instead of looking the flush's
  -- rows up by id.
  AND m.status NOT IN ('queued', 'sent', 'delivered', 'undelivered', 'failed', 'unknown',
                       'cancelled')
  AND sendd.transition_allowed(m.status, r.status)
"""


LOCK_CAMPAIGNS = """
SELECT 1 FROM sendd.campaign WHERE id = ANY($1::bigint[]) ORDER BY id FOR KEY SHARE
"""


def outcome_columns(outcomes: list[Outcome]) -> list[list[Any]]:
    """The outcomes as column arrays for one `unnest` (one round trip for any number).

    A comprehension per column: on the hot path, a third of the time of one loop appending to
    eight lists."""
    return [
        [o.message.id for o in outcomes],
        [STORED_STATUS[o.status] for o in outcomes],
        [int(o.counts_attempt) for o in outcomes],
        [o.retry_in for o in outcomes],
        [o.bulk_id for o in outcomes],
        [o.provider_message_id for o in outcomes],
        [o.error_code for o in outcomes],
        [o.error_text for o in outcomes],
    ]


async def write_results(conn: Any, instance_id: str, results: list[BatchResult]) -> int:
    """Store every outcome and close the submission marks; returns the rows changed."""
    marks = [r.submission_id for r in results if r.submission_id is not None]
    return await write_outcomes(conn, instance_id, marks, [o for r in results for o in r.outcomes])


async def write_outcomes(conn: Any, instance_id: str, marks: list[int],
                         outcomes: list[Outcome]) -> int:
    """Store the outcomes and close `marks`, in one statement; returns the rows changed.

    Messages going back to the queue first lock their campaigns FOR KEY SHARE, as a mark does:
    a cancel in progress (it holds its campaign FOR UPDATE) is waited for, and the statement
    after it then sees the campaign cancelled and cancels them instead of queueing them in a
    cancelled campaign (a cancel that comes after finds them queued)."""
    columns = outcome_columns(outcomes)
    requeued = sorted({o.message.campaign_id for o in outcomes
                       if o.status in (RETRY, RELEASE) and o.message.campaign_id is not None})
    if not requeued:
        status = await conn.execute(WRITE_OUTCOMES, marks, *columns, instance_id)
        return int(status.split()[-1])
    async with conn.transaction():
        await conn.execute(LOCK_CAMPAIGNS, requeued)
        status = await conn.execute(WRITE_OUTCOMES, marks, *columns, instance_id)
    return int(status.split()[-1])


@dataclass
class Store:
    """What the writer touches: the database, this instance's id (its marks), health (problems,
    stored outcomes) and metrics."""

    pool: Any
    instance_id: str
    health: Health
    metrics: Metrics

    async def until_committed(self, write: Callable[[Any], Awaitable[int]]) -> int:
        """`write(conn)` on a pooled connection, again and again while the database is away
        (a refusal for the data, DATA_ERRORS, is raised: the same rows fail the same way)."""
        return await retrying(self.pool, write, health=self.health, actor="writer",
                              trouble="cannot store results", event="writer_retry")


async def run_writer(
    store: Store,
    pipeline: PipelineConfig,
    results: trio.MemoryReceiveChannel[BatchResult],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush results until the results channel ends and everything pending is stored."""
    linger = pipeline.writer_flush_ms / 1000
    pending: list[BatchResult] = []
    size = 0
    flush_at = float("inf")  # the first pending result waits at most `linger`
    task_status.started()
    while True:
        with trio.move_on_at(flush_at) as waiting:
            try:
                result = await results.receive()
            except trio.EndOfChannel:
                await flush(store, pending)
                return
        if not waiting.cancelled_caught:
            if not pending:
                flush_at = trio.current_time() + linger
            pending.append(result)
            size += len(result.outcomes)
            if size < pipeline.writer_max_results:
                continue
        await flush(store, pending)
        pending, size, flush_at = [], 0, float("inf")


async def flush(store: Store, pending: list[BatchResult]) -> None:
    """Write until it succeeds: a database outage delays results, never loses them."""
    if not pending:
        return
    with store.health.working("writer"):
        await _write_until_stored(store, pending)


async def _write_until_stored(store: Store, pending: list[BatchResult]) -> None:
    flush_started = trio.current_time()  # for sendd_writer_flush_seconds
    apart = Apart()
    try:
        try:
            written = await store.until_committed(
                lambda conn: write_results(conn, store.instance_id, pending))
        except DATA_ERRORS as error:
            written = await store_apart(store, pending, error, apart)
    except Exception:
        # Neither the database being away (retried) nor the data (stored apart): a bug or a
        # broken schema. The writer crashes and drops its results, so it first hands their marks
        # over for settlement, or their messages would stay `sending` until this daemon stops.
        await _hand_over_unstored(store, pending, apart)
        raise
    refused = apart.refused_ids()
    stored = [o for r in pending for o in r.outcomes if o.message.id not in refused]
    # Metrics (sendd.metrics): flush time and size; outcomes counted once stored, which covers
    # the senders' and the settler's results alike.
    store.metrics.flush_seconds.observe(trio.current_time() - flush_started)
    store.metrics.flush_size.observe(len(stored))
    for o in stored:
        store.health.outcomes_by[o.status, o.message.account, o.message.tenant_id] += 1
    if written != len(stored):
        log.warning("writer_rows_skipped", expected=len(stored), written=written)


# --- a flush the database refuses because of what is in it ----------------------------------
# Rule: halve the refused outcomes and store each half on its own, down to single outcomes; a
# single one refused is stored in its safe form (nothing from outside in it, the status kept);
# one refused even so is left `sending` and its mark handed over for settlement, which looks
# it up at the provider like a dead daemon's work. So a bad outcome costs a few statements per
# flush (about 2 log2 N for each), never the other outcomes, and is never retried forever.

# What a flush can get from its rows rather than from the database being away: a string the
# server refuses (NUL, a character the database's encoding lacks; asyncpg reports a string it
# cannot even encode the same way), a value out of range, a constraint or a trigger refusing a
# row. Retrying such a flush as it is would fail the same way for good.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22
    asyncpg.exceptions.IntegrityConstraintViolationError,  # class 23
    asyncpg.exceptions.RaiseError,  # P0001: a trigger's own refusal
)
SAFE_RETRY_LIMIT = 86_400.0  # seconds: a safe form's retry time within what PostgreSQL takes
SAMPLE = 20  # message ids named in a log line


@dataclass
class Apart:
    """What storing outcomes one part at a time has done so far."""

    written: int = 0
    stored_ids: set[int] = field(default_factory=set)  # messages whose outcome is stored
    stripped: list[Outcome] = field(default_factory=list)  # stored in their safe form
    refused: list[Outcome] = field(default_factory=list)  # not stored at all
    error: str = ""  # the database's reason, for the log

    def refused_ids(self) -> set[int]:
        return {o.message.id for o in self.refused}


async def store_apart(store: Store, pending: list[BatchResult], error: BaseException,
                      apart: Apart) -> int:
    """Store a flush the database refused (`error`) by the rule above; close the marks whose
    outcomes are all stored and hand the others over. Returns the rows written."""
    log.warning("writer_isolating", error=_reason(error),
                results=sum(len(r.outcomes) for r in pending))
    await _store_halves(store, [o for r in pending for o in r.outcomes], error, apart)
    refused = apart.refused_ids()
    await store.until_committed(
        lambda conn: close_marks(conn, store.instance_id, pending, refused))
    _report(store, apart)
    return apart.written


async def _store_halves(store: Store, outcomes: list[Outcome], error: BaseException,
                        apart: Apart) -> None:
    """Store `outcomes`, which the database refused together, in halves (the rule above)."""
    apart.error = apart.error or _reason(error)
    if len(outcomes) == 1:
        await _store_safe_form(store, outcomes[0], error, apart)
        return
    half = len(outcomes) // 2
    for part in (outcomes[:half], outcomes[half:]):
        try:
            await _store(store, part, apart)
        except DATA_ERRORS as part_error:
            await _store_halves(store, part, part_error, apart)


async def _store(store: Store, outcomes: list[Outcome], apart: Apart) -> None:
    """One part's outcomes in one statement; their marks are closed at the end of the flush
    (another part of the same batch may still be refused)."""
    apart.written += await store.until_committed(
        lambda conn: write_outcomes(conn, store.instance_id, [], outcomes))
    apart.stored_ids.update(o.message.id for o in outcomes)


async def _store_safe_form(store: Store, outcome: Outcome, error: BaseException,
                           apart: Apart) -> None:
    try:
        await _store(store, [safe_form(outcome, error)], apart)
    except DATA_ERRORS:
        apart.refused.append(outcome)
    else:
        apart.stripped.append(outcome)


def safe_form(outcome: Outcome, error: BaseException) -> Outcome:
    """The outcome with nothing from outside in it: no provider ids, its error code only when
    plain short ASCII, an error text of our own. Its status stays, and with it the billing: an
    accepted message is sent, whatever its id was."""
    code = outcome.error_code
    if code is not None and not (code.isascii() and code.isprintable() and len(code) <= 64):
        code = None
    retry_in = outcome.retry_in
    if not (math.isfinite(retry_in) and 0.0 <= retry_in <= SAFE_RETRY_LIMIT):
        retry_in = SAFE_RETRY_LIMIT if retry_in > 0 else 0.0
    text = (f"the outcome's texts could not be stored ({type(error).__name__}); "
            "stored without them")
    return replace(outcome, bulk_id=None, provider_message_id=None, error_code=code,
                   error_text=text, retry_in=retry_in)


HAND_OVER = """
-- The mark keeps only the messages still waiting for an outcome: the others are stored, and
-- queued ones may be claimed and sent again meanwhile, which a settlement under this mark
-- could undo. adopted_at set: the reaper hands it to the settler, as it does a dead daemon's.
UPDATE sendd.submission SET message_ids = $2::bigint[], adopted_at = now()
WHERE id = $1 AND instance_id = $3
"""
CLOSE_MARKS = "DELETE FROM sendd.submission WHERE id = ANY($1::bigint[]) AND instance_id = $2"


async def close_marks(conn: Any, instance_id: str, pending: list[BatchResult],
                      unstored: set[int]) -> int:
    """Close the flush's marks whose every outcome is stored; hand the others over for
    settlement with their messages whose outcome is not (`unstored`)."""
    left: dict[int, list[int]] = {}
    for r in pending:
        if r.submission_id is not None:
            left.setdefault(r.submission_id, []).extend(
                o.message.id for o in r.outcomes if o.message.id in unstored)
    async with conn.transaction():
        await conn.execute(CLOSE_MARKS, [m for m, ids in left.items() if not ids], instance_id)
        for mark, ids in left.items():
            if ids:
                await conn.execute(HAND_OVER, mark, ids, instance_id)
    return 0


async def _hand_over_unstored(store: Store, pending: list[BatchResult], apart: Apart) -> None:
    """Best effort, on the way to a crash: what is not stored goes to settlement."""
    unstored = {o.message.id for r in pending for o in r.outcomes} - apart.stored_ids
    try:
        async with store.pool.acquire() as conn:
            await close_marks(conn, store.instance_id, pending, unstored)
    except Exception as error:  # noqa: BLE001 -- the writer's own error is the one to raise
        log.error("writer_hand_over_failed", error=_reason(error))


def _report(store: Store, apart: Apart) -> None:
    """One log line per flush for each kind of trouble (not one per outcome), and metrics."""
    if apart.stripped:
        store.metrics.unstorable.labels("stripped").inc(len(apart.stripped))
        log.warning("outcomes_stored_stripped", count=len(apart.stripped),
                    messages=[o.message.id for o in apart.stripped[:SAMPLE]],
                    error=apart.error)
    if apart.refused:
        store.metrics.unstorable.labels("settlement").inc(len(apart.refused))
        store.health.report_problem(
            "writer", f"{len(apart.refused)} outcomes could not be stored ({apart.error}); "
                      "their messages go to settlement")
        log.error("outcomes_not_stored", count=len(apart.refused),
                  messages=[o.message.id for o in apart.refused[:SAMPLE]],
                  error=apart.error)


def _reason(error: BaseException) -> str:
    """The error in one line with its type (asyncpg's may span several)."""
    return describe(error, typed=True)
