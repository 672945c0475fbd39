"""What a provider's answer means: per-message outcomes, and what the account should do about
it (the reaction). Pure: nothing here awaits, reads a clock or changes state; the sender applies
the reaction (sendd.actors.sender). The table is docs/PROVIDERS.md's.
"""

from __future__ import annotations

from dataclasses import dataclass

from sendd.config import RetryConfig
from sendd.core.backoff import retry_delay
from sendd.model import FAILED, RELEASE, RETRY, SENT, UNKNOWN, Batch, BatchResult, Message, Outcome
from sendd.providers import base

# Answers that say nothing about the message: the provider, or this machine, was not there.
PROVIDER_AWAY = frozenset({base.UNAVAILABLE, base.AMBIGUOUS, base.LOCAL})


@dataclass(frozen=True, slots=True)
class Reaction:
    """What the answers to one batch mean for its account."""

    suspend: str | None = None  # the provider suspended the account (401/402/403): why
    throttled: bool = False  # a 429: slow down ...
    retry_after: float | None = None  # ... for at least this long, when the provider said
    accepted: bool = False  # an answer accepted the request: speed up again


def react_to(responses: list[base.SendResponse]) -> Reaction:
    """One reaction for the answers of a batch (one 429 among fifty halves the rate once)."""
    kinds = {r.kind for r in responses}
    suspend = next((r.error for r in reversed(responses) if r.kind == base.SUSPEND), None)
    waits = [r.retry_after for r in responses
             if r.kind == base.THROTTLED and r.retry_after is not None]
    throttled = base.THROTTLED in kinds
    return Reaction(suspend=suspend, throttled=throttled,
                    retry_after=max(waits) if waits else None,
                    accepted=not throttled and base.OK in kinds)


def classify(batch: Batch, response: base.SendResponse,
             retry: RetryConfig) -> tuple[list[Outcome], Reaction]:
    """Outcomes of a batch sent as one request, and the account's reaction."""
    return (outcomes_of(batch.messages, response, retry, provider_up=False),
            react_to([response]))


def classify_each(batch: Batch, responses: list[base.SendResponse],
                  retry: RetryConfig) -> tuple[list[Outcome], Reaction]:
    """Outcomes of one-message requests sent together: each message by its own response. A
    5xx beside answers to the others is about its own message, and uses an attempt."""
    provider_up = any(r.kind not in PROVIDER_AWAY for r in responses)
    outcomes = []
    for message, response in zip(batch.messages, responses, strict=True):
        outcomes += outcomes_of([message], response, retry, provider_up)
    return outcomes, react_to(responses)


def outcomes_of(messages: list[Message], response: base.SendResponse, retry: RetryConfig,
                provider_up: bool) -> list[Outcome]:
    """The messages' outcomes under one answer to the request that carried them. Attempts
    count only answers about the messages themselves (`provider_up`: other requests of the
    same batch were answered, so an unavailable one is about its own message)."""
    kind = response.kind
    if kind == base.OK:
        return accepted_or_rejected(messages, response)
    if kind in (base.SUSPEND, base.LOCAL):
        return [Outcome(m, RELEASE, counts_attempt=False) for m in messages]
    if kind == base.THROTTLED:
        wait = response.retry_after if response.retry_after is not None else retry.base_delay
        return [Outcome(m, RETRY, error_code="HTTP_429", error_text=response.error,
                        retry_in=wait, counts_attempt=False) for m in messages]
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
