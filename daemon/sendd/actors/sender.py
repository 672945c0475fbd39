"""The sender pool: each worker takes a batch, waits for the rate governor, writes the durable
"submitted" mark, calls the provider and turns its answer into per-message outcomes.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from sendd.config import RetryConfig
from sendd.core.backoff import retry_delay
from sendd.core.breaker import Admission, State, Ticket
from sendd.db.connection import RETRYABLE_ERRORS
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

# Only while this instance holds its lease (with `$4` seconds to spare), still holds every
# message's claim, and no campaign of the batch was cancelled or paused. A campaign claim commits
# without waiting for the disk (sendd.actors.poller), so a PostgreSQL crash right after it can
# undo it while its batch is already in our memory; the messages are then queued again, and a
# mark written for them would let us send what another claim may send too.
# The campaigns are read FOR KEY SHARE: `sendd campaign cancel` and `pause` lock the campaign
# FOR UPDATE first, so either this mark waits for them and then sees the new status, or they
# wait for this mark's commit and then see the mark (and leave its messages alone: they are on
# their way). KEY SHARE does not wait for the writer's counter updates.
# (One statement: the mark, or why not: `alive` false, the lease ended; `held` false, some claim
# of the batch was undone; `stopped`, a campaign of it is no longer sending.)
MARK_SUBMITTED = """
WITH lease AS (
    SELECT i.lease_until > now() + make_interval(secs => $4) AS covers FROM sendd.instance i
    WHERE i.id = $1 AND i.stopped_at IS NULL AND i.lease_until > now()
), held AS (
    SELECT count(*) = cardinality($3::bigint[]) AS all_ours FROM sendd.message m
    WHERE m.id = ANY($3::bigint[]) AND m.lease_owner = $1
), campaign AS (
    SELECT c.status FROM sendd.campaign c WHERE c.id = ANY($5::bigint[]) FOR KEY SHARE
), stopped AS (
    SELECT coalesce(bool_or(status IN ('cancelled', 'paused')), false) AS campaign_stopped
    FROM campaign
), mark AS (
    INSERT INTO sendd.submission (instance_id, account, message_ids)
    SELECT $1, $2, $3::bigint[]
    WHERE (SELECT covers FROM lease) AND (SELECT all_ours FROM held)
      AND NOT (SELECT campaign_stopped FROM stopped)
    RETURNING id
)
SELECT (SELECT id FROM mark) AS id, EXISTS (SELECT 1 FROM lease) AS alive,
       (SELECT all_ours FROM held) AS held, (SELECT campaign_stopped FROM stopped) AS stopped
"""
LEASE_WAIT = 0.05  # seconds between marks while the lease waits for its renewal
# How late after its rate grant a request may still leave on that grant: the governor's
# windows are 50 ms longer than a second (ratelimit.GUARD_WINDOW) to absorb such delays.
GRANT_SLACK = 0.025
# A marked batch late for its grant waits at most this long for a new one; longer (a 429's
# Retry-After came in meanwhile) it goes back to the queue, so that nothing waits marked.
REGRANT_WAIT = 1.0
LOCAL_PAUSE = 1.0  # seconds a sender rests after this machine failed to open a connection


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
    """One batch through governor, breaker, mark (unless it has one) and provider; a 413
    splits it and sends the halves.

    The mark comes after the governor's wait, so that a batch waiting for its rate is still
    only claimed (a cancel or pause takes it back, and a crash puts it back untouched); the
    grant is renewed if the mark made the request late for it (GRANT_SLACK).
    """
    account = runtime.config.accounts[batch.account]
    if batch.account in runtime.suspended or not runtime.breakers.may_claim(
            batch.account, trio.current_time()):
        return [released(batch)]  # put back at once, not after a wait for the rate
    single = account.single
    # Waiting for the rate governor is not being wedged (a 429 can ask for minutes).
    waited = await _rate_grant(runtime, batch, single)
    granted = trio.current_time()
    ticket = runtime.breakers.admit(batch.account, granted, account.timeout + LEASE_MARGIN)
    if ticket.admission is Admission.HOLD:
        return [released(batch)]  # the provider went away while this batch waited
    results: list[BatchResult | Unsettled] = []
    if ticket.probe and len(batch.messages) > 1:
        # One message tells whether the provider is back; the rest waits in the queue.
        results.append(released(Batch(batch.account, batch.tenant_id, batch.messages[1:],
                                       batch.submission_id)))
        batch = Batch(batch.account, batch.tenant_id, batch.messages[:1])
    if batch.submission_id is None:  # express batches come marked by their claim
        with runtime.working("sender"):
            batch.submission_id, refusal = await mark_submitted(runtime, batch)
        if batch.submission_id is None:
            runtime.breakers.abandoned(batch.account, ticket)
            runtime.log.warning(refusal, account=batch.account, tenant=batch.tenant_id,
                                size=len(batch.messages))
            return [*results, released(batch)]  # the writer puts back only what is still ours
    with runtime.working("sender"):
        await wait_for_lease(runtime, account.timeout + LEASE_MARGIN)
    if trio.current_time() - granted > GRANT_SLACK:  # late for its grant: a new one
        regrant = _rate_reserve(runtime, batch, single) - trio.current_time()
        if regrant > REGRANT_WAIT:
            # A 429 came in meanwhile: wait for it unmarked, back in the queue.
            return [*results, released(batch)]
        await trio.sleep(max(0.0, regrant))
        waited += max(0.0, regrant)
    with runtime.working("sender"):
        started = time.time()  # wall clock: logged, so rates can be checked from the log
        request_started = trio.current_time()
        provider = runtime.providers[batch.account]
        if single:
            responses = await provider.send_each(batch.messages)
        else:
            responses = [await provider.send(batch.messages)]
    note_availability(runtime, batch.account, ticket, responses)
    response = speaking_for(responses)
    # Metrics (sendd.http.metrics): rate wait, request time, batch size.
    runtime.metrics.rate_wait.observe(waited)
    runtime.metrics.provider_request.labels(batch.account).observe(
        trio.current_time() - request_started)
    runtime.metrics.batch_size.observe(len(batch.messages))
    if response.kind == base.TOO_LARGE and not single and len(batch.messages) > 1:
        return [*results, BatchResult(batch.submission_id), *await _split(runtime, batch)]
    if response.kind == base.AMBIGUOUS:
        # (For one-message requests: any ambiguous one sends the whole batch to be looked up,
        # reference by reference; the ones answered are found as they were answered.)
        _log_batch(runtime, batch, response, [], started)
        # Give the provider as long again as we waited for it before looking references up.
        not_before = trio.current_time() + account.timeout
        return [*results, Unsettled(batch.submission_id, batch.account, batch.messages,
                                    not_before)]
    outcomes = (classify_each(runtime, batch, responses) if single
                else classify(runtime, batch, response))
    _log_batch(runtime, batch, response, outcomes, started)
    if any(r.kind == base.LOCAL for r in responses):
        await _local_trouble(runtime, response.error)
    return [*results, BatchResult(batch.submission_id, outcomes)]


async def _rate_grant(runtime: Runtime, batch: Batch, single: bool) -> float:
    return await runtime.governor.acquire(batch.account, batch.tenant_id, len(batch.messages),
                                          requests=_requests(batch, single))


def _rate_reserve(runtime: Runtime, batch: Batch, single: bool) -> float:
    return runtime.governor.reserve(batch.account, batch.tenant_id, len(batch.messages),
                                    requests=_requests(batch, single))


def _requests(batch: Batch, single: bool) -> int:
    """Requests the batch takes: one, or one per message for a single-message account."""
    return len(batch.messages) if single else 1


async def _local_trouble(runtime: Runtime, error: str) -> None:
    """This machine could not open a connection (no file descriptors): the messages went back
    to the queue with no attempt used; pause this sender a moment rather than spin."""
    runtime.report_problem("sender", f"cannot open provider connections: {error}")
    runtime.log.error("sender_local_failure", error=error, pause=LOCAL_PAUSE)
    await trio.sleep(LOCAL_PAUSE)


def note_availability(runtime: Runtime, account: str, ticket: Ticket,
                      responses: list[base.SendResponse]) -> None:
    """What the answers say about the provider being there: any answer at all means it is
    (whatever it said); none means it is unreachable (or too slow to trust with more)."""
    breakers, now = runtime.breakers, trio.current_time()
    kinds = {r.kind for r in responses}
    failed = next((r for r in responses if r.kind in (base.AMBIGUOUS, base.UNAVAILABLE)), None)
    if kinds - {base.AMBIGUOUS, base.UNAVAILABLE, base.LOCAL}:
        if breakers.answered(account, ticket):
            runtime.log.info("account_recovered", account=account)
            runtime.wake_poller()
    elif failed is None:  # only our own trouble: nothing learned about the provider
        breakers.abandoned(account, ticket)
    elif base.AMBIGUOUS in kinds:
        if breakers.ambiguous(account, ticket, failed.error, now):
            _log_breaker(runtime, account, "no answer in time")
    elif breakers.unavailable(account, ticket, failed.error, now):
        _log_breaker(runtime, account, "unreachable")


def _log_breaker(runtime: Runtime, account: str, why: str) -> None:
    breaker = runtime.breakers.get(account)
    next_probe = max(0.0, breaker.retry_at - trio.current_time())
    if breaker.state is State.HALF_OPEN:
        runtime.log.warning("account_probing", account=account, why=why, reason=breaker.reason)
    elif breaker.failures == 1:
        runtime.log.warning("account_unavailable", account=account, why=why,
                            reason=breaker.reason, next_probe_s=round(next_probe, 1))
    else:
        runtime.log.info("account_probe_failed", account=account, why=why,
                         reason=breaker.reason, failures=breaker.failures,
                         next_probe_s=round(next_probe, 1))


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


async def mark_submitted(runtime: Runtime, batch: Batch) -> tuple[int | None, str]:
    """Write the durable mark before the request, fenced by this daemon's lease and claims;
    (None, why) if it must not be sent: a claim of the batch was undone (a PostgreSQL crash, a
    cancel), or a campaign of it was cancelled or paused.

    While the database is away this waits (and the pipeline behind it stops); the heartbeat
    decides when the outage has outlived the lease.
    """
    timeout = runtime.config.accounts[batch.account].timeout
    ids = [m.id for m in batch.messages]
    campaigns = sorted({m.campaign_id for m in batch.messages if m.campaign_id is not None})
    failures = 0
    while True:
        mark = None
        try:
            async with runtime.pool.acquire() as conn:
                answer = await conn.fetchrow(MARK_SUBMITTED, runtime.instance_id, batch.account,
                                             ids, timeout + LEASE_MARGIN, campaigns)
                mark = answer["id"]
                if mark is not None:
                    return mark, ""
        except RETRYABLE_ERRORS as error:
            if mark is not None:
                return mark, ""  # written; only giving the connection back failed
            failures += 1
            runtime.report_problem("sender", f"cannot write submission marks: {error}")
            runtime.log.warning("mark_retry", error=str(error) or type(error).__name__)
            await trio.sleep(retry_delay(min(failures, 6), base=0.2, cap=5.0))
            continue
        if not answer["alive"]:
            raise LeaseLost(f"lease of instance {runtime.instance_id} ended; not sending")
        if answer["stopped"]:
            return None, "campaign_stopped"
        if not answer["held"]:
            return None, "claim_lost"
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
    return outcomes_of(runtime, batch.messages, response, provider_up=False)


def classify_each(runtime: Runtime, batch: Batch,
                  responses: list[base.SendResponse]) -> list[Outcome]:
    """Outcomes of one-message requests sent together: each message by its own response; the
    account reacts once (one 429 among fifty halves the rate once, not fifty times). A 5xx
    beside answers to the others is about its own message, and uses an attempt."""
    react(runtime, batch.account, responses)
    provider_up = any(r.kind not in PROVIDER_AWAY for r in responses)
    outcomes = []
    for message, response in zip(batch.messages, responses, strict=True):
        outcomes += outcomes_of(runtime, [message], response, provider_up)
    return outcomes


# Answers that say nothing about the message: the provider, or this machine, was not there.
PROVIDER_AWAY = frozenset({base.UNAVAILABLE, base.AMBIGUOUS, base.LOCAL})


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


def outcomes_of(runtime: Runtime, messages: list[Message], response: base.SendResponse,
                provider_up: bool) -> list[Outcome]:
    """The messages' outcomes under one answer to the request that carried them. Attempts
    count only answers about the messages themselves (`provider_up`: other requests of the
    same batch were answered, so an unavailable one is about its own message)."""
    retry = runtime.config.retry
    kind = response.kind
    if kind == base.OK:
        return accepted_or_rejected(messages, response)
    if kind in (base.SUSPEND, base.LOCAL):
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
    if kind == base.TOO_LARGE:  # one message too large for the provider
        return [retry_or_fail(m, "HTTP_413", response.error, retry) for m in messages]
    if provider_up:
        return [retry_or_fail(m, "UNAVAILABLE", response.error, retry) for m in messages]
    # The provider is away (its breaker holds the account back once that is sure): the
    # messages wait queued, with no attempt used.
    delay = retry_delay(1, base=retry.base_delay, cap=retry.max_delay, jitter=retry.jitter)
    return [Outcome(m, RETRY, error_code="UNAVAILABLE", error_text=response.error,
                    retry_in=delay, counts_attempt=False) for m in messages]


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
