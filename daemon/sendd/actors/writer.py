"""The writer: group-commits outcomes, one statement per flush.

A flush updates every message of the pending results and deletes their submission marks in
one statement (one round trip, one transaction); the schema's triggers keep campaign
counters, completion, credits and the ledger in the same transaction. When the database is
away the writer keeps its results and retries; meanwhile it stops receiving, so the senders
and then the poller stop too (the results are bounded by the channel).
"""

from __future__ import annotations

from typing import Any

import trio

from sendd.backoff import retry_delay
from sendd.db import RETRYABLE_ERRORS
from sendd.model import FAILED, RELEASE, RETRY, SENT, UNKNOWN, BatchResult, Outcome
from sendd.runtime import Runtime

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
    outcomes = [o for r in results for o in r.outcomes]
    status = await conn.execute(WRITE_OUTCOMES, marks, *outcome_columns(outcomes), instance_id)
    return int(status.split()[-1])


async def run_writer(
    runtime: Runtime,
    results: trio.MemoryReceiveChannel[BatchResult],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush results until the results channel ends and everything pending is stored."""
    pipeline = runtime.config.pipeline
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
                await flush(runtime, pending)
                return
        if not waiting.cancelled_caught:
            if not pending:
                flush_at = trio.current_time() + linger
            pending.append(result)
            size += len(result.outcomes)
            if size < pipeline.writer_max_results:
                continue
        await flush(runtime, pending)
        pending, size, flush_at = [], 0, float("inf")


async def flush(runtime: Runtime, pending: list[BatchResult]) -> None:
    """Write until it succeeds: a database outage delays results, never loses them."""
    if not pending:
        return
    with runtime.working("writer"):
        await _write_until_stored(runtime, pending)


async def _write_until_stored(runtime: Runtime, pending: list[BatchResult]) -> None:
    failures = 0
    flush_started = trio.current_time()  # for sendd_writer_flush_seconds
    while True:
        written = None
        try:
            async with runtime.pool.acquire() as conn:
                written = await write_results(conn, runtime.instance_id, pending)
            break
        except RETRYABLE_ERRORS as error:
            if written is not None:
                break  # committed; only giving the connection back failed: do not apply twice
            failures += 1
            delay = retry_delay(min(failures, 6), base=0.2, cap=5.0)
            runtime.report_problem("writer", f"cannot store results: {error}")
            runtime.log.warning("writer_retry", error=str(error) or type(error).__name__,
                                results=sum(len(r.outcomes) for r in pending), retry_in=delay)
            await trio.sleep(delay)
    expected = sum(len(r.outcomes) for r in pending)
    # Metrics (sendd.metrics): flush time and size; outcomes counted once stored, which covers
    # the senders' and the settler's results alike.
    runtime.metrics.flush_seconds.observe(trio.current_time() - flush_started)
    runtime.metrics.flush_size.observe(expected)
    for result in pending:
        for o in result.outcomes:
            runtime.outcomes_by[o.status, o.message.account, o.message.tenant_id] += 1
    if written != expected:
        runtime.log.warning("writer_rows_skipped", expected=expected, written=written)
