"""The sender pool: each worker takes a batch, waits for the rate governor, writes the durable
"submitted" mark, calls the provider and turns its answer into per-message outcomes.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from sendd.backoff import retry_delay
from sendd.config import RetryConfig
from sendd.db import RETRYABLE_ERRORS
from sendd.leases import LEASE_MARGIN
from sendd.model import (
    FAILED,
    RELEASE,
    RETRY,
    SENT,
    UNKNOWN,
    Batch,
    BatchResult,
    Message,
    Outcome,
    Unsettled,
)
from sendd.providers import base
from sendd.runtime import Runtime

# Only while this instance holds its lease (with `$4` seconds to spare) and still holds every
# message's claim. A campaign claim commits without waiting for the disk (sendd.actors.poller),
# so a PostgreSQL crash right after it can undo it while its batch is already in our memory;
# the messages are then queued again, and a mark written for them would let us send what
# another claim may send too.
# (One statement: the mark, or why not: `alive` false, the lease ended; `held` false, some claim
# of the batch was undone.)
MARK_SUBMITTED = """
WITH lease AS (
    SELECT i.lease_until > now() + make_interval(secs => $4) AS covers FROM sendd.instance i
    WHERE i.id = $1 AND i.stopped_at IS NULL AND i.lease_until > now()
), held AS (
    SELECT count(*) = cardinality($3::bigint[]) AS all_ours FROM sendd.message m
    WHERE m.id = ANY($3::bigint[]) AND m.lease_owner = $1
), mark AS (
    INSERT INTO sendd.submission (instance_id, account, message_ids)
    SELECT $1, $2, $3::bigint[] WHERE (SELECT covers FROM lease) AND (SELECT all_ours FROM held)
    RETURNING id
)
SELECT (SELECT id FROM mark) AS id, EXISTS (SELECT 1 FROM lease) AS alive,
       (SELECT all_ours FROM held) AS held
"""
LEASE_WAIT = 0.05  # seconds between marks while the lease waits for its renewal


class LeaseLost(Exception):
    """This daemon's lease ended (e.g. the database was away too long): its claims may already
    belong to another daemon, so it must not send them. The daemon exits and restarts."""


async def run_sender(
    runtime: Runtime,
    batches: trio.MemoryReceiveChannel[Batch],
    results: trio.MemorySendChannel[BatchResult],
    unsettled: trio.MemorySendChannel[Unsettled],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send batches until the batches channel ends."""
    async with batches, results, unsettled:
        task_status.started()
        async for batch in batches:
            for result in await send_batch(runtime, batch):
                if isinstance(result, Unsettled):
                    await hand_to_settler(runtime, unsettled, result)
                else:
                    await results.send(result)


async def hand_to_settler(runtime: Runtime, unsettled: trio.MemorySendChannel[Unsettled],
                          item: Unsettled) -> None:
    try:
        await unsettled.send(item)
    except trio.BrokenResourceError:
        # Draining: the settler is gone. The mark stays open and the messages stay leased, so
        # whichever daemon adopts this instance's work settles them.
        runtime.log.warning("settlement_deferred", batch=item.submission_id)


async def send_batch(runtime: Runtime, batch: Batch) -> list[BatchResult | Unsettled]:
    """One batch through mark (unless it has one), governor and provider; a 413 splits it and
    sends the halves.

    The governor comes last before the request, so the time a grant is given is the time the
    request leaves: a slow mark cannot bunch requests up behind it.
    """
    if batch.account in runtime.suspended:
        return [released(batch)]
    if batch.submission_id is None:  # express batches come marked by their claim
        with runtime.working("sender"):
            batch.submission_id = await mark_submitted(runtime, batch)
        if batch.submission_id is None:
            runtime.log.warning("claim_lost", account=batch.account, tenant=batch.tenant_id,
                                size=len(batch.messages))
            return [released(batch)]  # the writer puts back only what is still ours
    # A single-message account sends each message of the batch as its own request, all at
    # once under the batch's one submission mark: one mark per batch, not per message.
    single = runtime.config.accounts[batch.account].single
    requests = len(batch.messages) if single else 1
    # Waiting for the rate governor is not being wedged (a 429 can ask for minutes).
    waited = await runtime.governor.acquire(batch.account, batch.tenant_id, len(batch.messages),
                                            requests=requests)
    with runtime.working("sender"):
        await wait_for_lease(runtime, runtime.config.accounts[batch.account].timeout + LEASE_MARGIN)
        started = time.time()  # wall clock: logged, so rates can be checked from the log
        request_started = trio.current_time()
        provider = runtime.providers[batch.account]
        if single:
            responses = await provider.send_each(batch.messages)
        else:
            responses = [await provider.send(batch.messages)]
    response = speaking_for(responses)
    # Metrics (sendd.metrics): rate wait, request time, batch size.
    runtime.metrics.rate_wait.observe(waited)
    runtime.metrics.provider_request.labels(batch.account).observe(
        trio.current_time() - request_started)
    runtime.metrics.batch_size.observe(len(batch.messages))
    if response.kind == base.TOO_LARGE and not single and len(batch.messages) > 1:
        return [BatchResult(batch.submission_id), *await _split(runtime, batch)]
    if response.kind == base.AMBIGUOUS:
        # (For one-message requests: any ambiguous one sends the whole batch to be looked up,
        # reference by reference; the ones answered are found as they were answered.)
        _log_batch(runtime, batch, response, [], started)
        # Give the provider as long again as we waited for it before looking references up.
        not_before = trio.current_time() + runtime.config.accounts[batch.account].timeout
        return [Unsettled(batch.submission_id, batch.account, batch.messages, not_before)]
    outcomes = (classify_each(runtime, batch, responses) if single
                else classify(runtime, batch, response))
    _log_batch(runtime, batch, response, outcomes, started)
    return [BatchResult(batch.submission_id, outcomes)]


def released(batch: Batch) -> BatchResult:
    """The batch put back untouched (it never left); closes its mark, if it has one."""
    return BatchResult(batch.submission_id,
                       [Outcome(m, RELEASE, counts_attempt=False) for m in batch.messages])


def speaking_for(responses: list[base.SendResponse]) -> base.SendResponse:
    """The answer that decides for a batch sent as several requests: an ambiguous one first
    (then every message is looked up: none may be resent unseen), else the first that is not
    OK, else the first."""
    for response in responses:
        if response.kind == base.AMBIGUOUS:
            return response
    return next((r for r in responses if r.kind != base.OK), responses[0])


async def wait_for_lease(runtime: Runtime, needed: float) -> None:
    """Hold a request until the lease surely outlives it (the heartbeat renews it often)."""
    while runtime.lease_valid_until - trio.current_time() < needed:
        await trio.sleep(LEASE_WAIT)


async def mark_submitted(runtime: Runtime, batch: Batch) -> int | None:
    """Write the durable mark before the request, fenced by this daemon's lease and claims;
    None if a claim of the batch was undone (a PostgreSQL crash): it must not be sent.

    While the database is away this waits (and the pipeline behind it stops); the heartbeat
    decides when the outage has outlived the lease.
    """
    timeout = runtime.config.accounts[batch.account].timeout
    ids = [m.id for m in batch.messages]
    failures = 0
    while True:
        mark = None
        try:
            async with runtime.pool.acquire() as conn:
                answer = await conn.fetchrow(MARK_SUBMITTED, runtime.instance_id, batch.account,
                                             ids, timeout + LEASE_MARGIN)
                mark = answer["id"]
                if mark is not None:
                    return mark
        except RETRYABLE_ERRORS as error:
            if mark is not None:
                return mark  # written; only giving the connection back failed: no second mark
            failures += 1
            runtime.report_problem("sender", f"cannot write submission marks: {error}")
            runtime.log.warning("mark_retry", error=str(error) or type(error).__name__)
            await trio.sleep(retry_delay(min(failures, 6), base=0.2, cap=5.0))
            continue
        if not answer["alive"]:
            raise LeaseLost(f"lease of instance {runtime.instance_id} ended; not sending")
        if not answer["held"]:
            return None
        # The lease is alive but has less than timeout + margin left (the heartbeat is due):
        # wait for the renewal rather than send uncovered or give the lease up.
        await trio.sleep(LEASE_WAIT)


async def _split(runtime: Runtime, batch: Batch) -> list[BatchResult]:
    half = len(batch.messages) // 2
    runtime.batch_cap[batch.account] = min(runtime.batch_cap.get(batch.account, half), half)
    runtime.log.warning("batch_too_large", account=batch.account, size=len(batch.messages),
                        new_max=runtime.batch_cap[batch.account])
    results = []
    for part in (batch.messages[:half], batch.messages[half:]):
        results += await send_batch(runtime, Batch(batch.account, batch.tenant_id, part))
    return results


def classify(runtime: Runtime, batch: Batch, response: base.SendResponse) -> list[Outcome]:
    """Per-message outcomes for a provider response (PROVIDERS.md's table)."""
    react(runtime, batch.account, [response])
    return outcomes_of(runtime, batch.messages, response)


def classify_each(runtime: Runtime, batch: Batch,
                  responses: list[base.SendResponse]) -> list[Outcome]:
    """Outcomes of one-message requests sent together: each message by its own response; the
    account reacts once (one 429 among fifty halves the rate once, not fifty times)."""
    react(runtime, batch.account, responses)
    outcomes = []
    for message, response in zip(batch.messages, responses, strict=True):
        outcomes += outcomes_of(runtime, [message], response)
    return outcomes


def react(runtime: Runtime, account: str, responses: list[base.SendResponse]) -> None:
    """What the answers mean for the account: suspension, slowing down, speeding up again."""
    by_kind = {r.kind: r for r in responses}  # the last response of each kind
    if base.SUSPEND in by_kind:
        reason = by_kind[base.SUSPEND].error
        runtime.suspended[account] = reason
        runtime.log.error("account_suspended", account=account, reason=reason)
    if base.THROTTLED in by_kind:
        waits = [r.retry_after for r in responses
                 if r.kind == base.THROTTLED and r.retry_after is not None]
        runtime.governor.penalize(account, max(waits) if waits else None)
    elif base.OK in by_kind:
        runtime.governor.reward(account)


def outcomes_of(runtime: Runtime, messages: list[Message],
                response: base.SendResponse) -> list[Outcome]:
    """The messages' outcomes under one answer to the request that carried them."""
    retry = runtime.config.retry
    kind = response.kind
    if kind == base.OK:
        return accepted_or_rejected(messages, response)
    if kind == base.SUSPEND:
        return [Outcome(m, RELEASE, counts_attempt=False) for m in messages]
    if kind == base.THROTTLED:
        wait = response.retry_after if response.retry_after is not None else retry.base_delay
        return [
            Outcome(m, RETRY, error_code="HTTP_429", error_text=response.error, retry_in=wait,
                    counts_attempt=False)
            for m in messages
        ]
    if kind == base.FAILED:
        return [Outcome(m, FAILED, error_code="HTTP_400", error_text=response.error)
                for m in messages]
    # UNAVAILABLE, or a 413 for a single message.
    return [retry_or_fail(m, "UNAVAILABLE", response.error, retry) for m in messages]


def accepted_or_rejected(messages: list[Message], response: base.SendResponse) -> list[Outcome]:
    by_reference = {r.reference: r for r in response.results}
    outcomes = []
    for message in messages:
        result = by_reference.get(message.reference)
        if result is None:
            # The provider answered but said nothing of this message: it may have been sent.
            outcomes.append(Outcome(message, UNKNOWN, error_code="MISSING_RESULT",
                                    error_text="the provider's answer did not list it"))
        elif result.accepted:  # the common case, positionally: the hot path
            outcomes.append(Outcome(message, SENT, response.bulk_id, result.message_id))
        else:
            outcomes.append(Outcome(message, FAILED, bulk_id=response.bulk_id,
                                    error_code=result.error_code, error_text=result.error_text))
    return outcomes


def retry_or_fail(message: Message, code: str, error: str, retry: RetryConfig) -> Outcome:
    """Retry with backoff, or fail with the last error once the attempts are used up."""
    attempts = message.attempts + 1
    if attempts >= retry.max_attempts:
        return Outcome(message, FAILED, error_code=code, error_text=error)
    delay = retry_delay(attempts, base=retry.base_delay, cap=retry.max_delay, jitter=retry.jitter)
    return Outcome(message, RETRY, error_code=code, error_text=error, retry_in=delay)


def _log_batch(runtime: Runtime, batch: Batch, response: base.SendResponse,
               outcomes: list[Outcome], started: float) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    fields: dict[str, Any] = {
        "batch": batch.submission_id, "account": batch.account, "tenant": batch.tenant_id,
        "campaigns": sorted({m.campaign_id for m in batch.messages if m.campaign_id}),
        "size": len(batch.messages), "bulk_id": response.bulk_id,
        "sent_at": round(started, 4), "ms": round((time.time() - started) * 1000, 1),
        **counts,
    }
    if response.kind == base.OK:
        runtime.log.info("batch_sent", **fields)
    else:
        runtime.log.warning("batch_not_sent", outcome=response.kind, error=response.error, **fields)
