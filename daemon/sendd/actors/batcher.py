"""The batcher: groups claimed messages into provider batches per account and tenant, and
puts them in the scheduler (sendd.state.scheduler), where they wait for what they may need.

A batch is flushed when it reaches the account's batch size (which also respects the rate
limits, so one batch never needs more than one second's allowance) or after the linger.
A tenant with a rate limit has batches of its own, each charged against its limit; the other
tenants' messages share batches (sendd.model.ANY_TENANT): a claim split between a thousand
tenants is then a few requests, not a thousand.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import trio

from sendd.config import PipelineConfig
from sendd.core.batching import BatchBuilder
from sendd.model import ANY_TENANT, Batch, Message
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.scheduler import Scheduler


def group_by_destination(messages: Iterable[Message],
                         limited: Collection[str] = ()) -> dict[tuple[str, str], list[Message]]:
    """Messages by (account, tenant) for the `limited` tenants, by (account, ANY_TENANT) for
    the others, each group in claim order."""
    groups: dict[tuple[str, str], list[Message]] = {}
    for message in messages:
        tenant = message.tenant_id if message.tenant_id in limited else ANY_TENANT
        key = (message.account, tenant)
        group = groups.get(key)
        if group is None:
            groups[key] = [message]
        else:
            group.append(message)
    return groups


async def run_batcher(
    accounts: Accounts,
    controls: Controls,
    pipeline: PipelineConfig,
    scheduler: Scheduler,
    claims: trio.MemoryReceiveChannel[list[Message]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Batch into the scheduler until the claims channel ends, then flush what is pending and
    close the scheduler."""
    def max_batch(key: tuple[str, str]) -> int:
        account, tenant = key
        return accounts.max_batch(controls.account(account), tenant)

    builder: BatchBuilder[tuple[str, str], Message] = BatchBuilder(
        max_batch, pipeline.linger_ms / 1000)
    # Never hold more than one claim chunk waiting for company: bounds claimed-but-unsent work.
    hold_limit = pipeline.claim_chunk

    async def emit(ready: list[tuple[tuple[str, str], list[Message]]]) -> None:
        for (account, tenant), messages in ready:
            await scheduler.put(Batch(account, tenant, messages))

    async with claims:
        task_status.started()
        while True:
            deadline = builder.next_deadline()
            chunk = None
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                try:
                    chunk = await claims.receive()
                except trio.EndOfChannel:
                    await emit(builder.drain())
                    scheduler.close()
                    return
            now = trio.current_time()
            limited = accounts.governor.tenant_limits()
            for key, messages in group_by_destination(chunk or (), limited).items():
                await emit(builder.add_many(key, messages, now))
            await emit(builder.due(now))
            if len(builder) >= hold_limit:
                await emit(builder.drain())
