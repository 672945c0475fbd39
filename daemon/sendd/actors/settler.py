"""The settler: decides what happened to work that may have reached a provider.

Its input is submission marks without an outcome: batches whose request timed out after the
body went out, and batches adopted from a daemon that died mid-request. Nothing is resent
blindly: with `idempotent_references` the provider dedupes, so the messages are simply
queued again; otherwise each reference is looked up. Found means sent (with the provider's
id); not found means it is safe to send again; a lookup that keeps failing until the
settlement window closes leaves the message `unknown`, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio

from sendd.core.outcomes import retry_or_fail
from sendd.model import RETRY, SENT, UNKNOWN, BatchResult, Message, Outcome, Unsettled
from sendd.providers.base import LookupResult
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls

log = structlog.get_logger()

SETTLE_WORKERS = 4
LOOKUP_CONCURRENCY = 32
LOOKUP_RETRY = 1.0  # seconds between lookups of a reference whose lookup failed


@dataclass
class Settler:
    """What settling reads: the providers (lookups) and the configuration in force."""

    accounts: Accounts
    controls: Controls


async def run_settler(
    settler: Settler,
    unsettled: trio.MemoryReceiveChannel[Unsettled],
    results: trio.MemorySendChannel[BatchResult],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Settle marks with a few workers until the unsettled channel ends."""
    limiter = trio.CapacityLimiter(LOOKUP_CONCURRENCY)

    async def worker(receive: trio.MemoryReceiveChannel[Unsettled],
                     send: trio.MemorySendChannel[BatchResult]) -> None:
        async with receive, send:
            async for item in receive:
                await send.send(await settle(settler, item, limiter))

    async with results, unsettled, trio.open_nursery() as nursery:
        for _ in range(SETTLE_WORKERS):
            nursery.start_soon(worker, unsettled.clone(), results.clone())
        task_status.started()


async def settle(settler: Settler, item: Unsettled,
                 limiter: trio.CapacityLimiter) -> BatchResult:
    """Outcomes for a mark's messages: resent (idempotent references) or looked up."""
    config = settler.controls.config
    account = config.accounts.get(item.account)
    if account is not None and account.idempotent_references:
        # The provider never sends one reference twice: resending is safe.
        outcomes = [Outcome(m, RETRY, error_code="AMBIGUOUS", error_text="resent: idempotent "
                            "references", counts_attempt=False) for m in item.messages]
        return BatchResult(item.submission_id, outcomes)
    await trio.sleep_until(item.not_before)
    deadline = trio.current_time() + config.pipeline.settle_seconds
    outcomes: list[Outcome] = []

    async def settle_one(message: Message) -> None:
        async with limiter:
            outcomes.append(await settle_message(settler, item.account, message, deadline))

    async with trio.open_nursery() as nursery:
        for message in item.messages:
            nursery.start_soon(settle_one, message)
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in (SENT, RETRY, UNKNOWN)}
    log.info("batch_settled", batch=item.submission_id, account=item.account, **counts)
    return BatchResult(item.submission_id, outcomes)


async def settle_message(settler: Settler, account: str, message: Message,
                         deadline: float) -> Outcome:
    """Look the reference up until the provider tells, or the window closes. Time the provider
    cannot be reached at all (refused, 502/503/504: an outage) does not use the window up, for
    as long as an outage may last before its campaigns are paused (`retry.provider_down_pause`)."""
    provider = settler.accounts.providers.get(account)
    result = LookupResult(None, error=f"account {account!r} is not configured here")
    patience = trio.current_time() + settler.controls.config.retry.provider_down_pause
    while provider is not None:
        result = await provider.lookup(message.reference)
        now = trio.current_time()
        if result.found is not None:
            break
        if now + LOOKUP_RETRY > deadline and (result.reachable or now > patience):
            break
        await trio.sleep(LOOKUP_RETRY)
    if result.found:
        return Outcome(message, SENT, provider_message_id=result.message_id)
    if result.found is False:
        # The provider never accepted it: sending again cannot duplicate it.
        return retry_or_fail(message, "NOT_ACCEPTED", "unknown to the provider after an "
                             "ambiguous send", settler.controls.config.retry)
    return Outcome(message, UNKNOWN, error_code="UNSETTLED",
                   error_text=f"could not settle within the settlement window: {result.error}")
