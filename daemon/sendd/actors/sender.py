"""The sender pool: each worker takes a batch, waits for the rate governor, writes the durable
"submitted" mark, calls the provider and hands the outcomes on. I/O only: what an answer means
is sendd.core.outcomes'; this applies the account's reaction and the breaker's bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from sendd.core.breaker import PROBE_BASE, Admission, State, Ticket
from sendd.core.outcomes import Reaction, classify, classify_each, released, speaking_for
from sendd.core.ratelimit import GUARD_WINDOW
from sendd.db import pauses
from sendd.db.claims import MARK_SUBMITTED
from sendd.db.leases import LEASE_MARGIN
from sendd.db.retry import retrying
from sendd.metrics import Metrics
from sendd.model import ANY_TENANT, Batch, BatchResult, Unsettled
from sendd.providers import base
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease, LeaseLost
from sendd.state.scheduler import Scheduler

log = structlog.get_logger()

LEASE_WAIT = 0.05  # seconds between marks while the lease waits for its renewal
# How late after its rate grant a request may still leave on that grant: the governor's
# windows are 50 ms longer than a second (ratelimit.GUARD_WINDOW) to absorb such delays.
GRANT_SLACK = 0.04
# A marked batch late for its grant waits at most this long for a new one: a window and a
# little (a limited tenant's batch is a whole second of its rate, so its next grant can be a
# full window away); longer (a 429's Retry-After came in meanwhile) it goes back to the queue,
# so that nothing waits marked.
REGRANT_WAIT = GUARD_WINDOW + 0.1
LOCAL_PAUSE = 1.0  # seconds a sender rests after this machine failed to open a connection

Sent = list[BatchResult | Unsettled]


@dataclass
class Sender:
    """What a sender touches: the database (marks), the lease (fencing), the accounts (provider,
    governor, breaker), the configuration in force, health and metrics."""

    pool: Any
    lease: Lease
    accounts: Accounts
    controls: Controls
    health: Health
    metrics: Metrics

    async def send_batch(self, batch: Batch, waited: float | None = None,
                         granted: float = 0.0, fleet_stamp: str = "") -> Sent:
        """One batch through breaker, governor, mark (unless it has one) and provider; a 413
        splits it and sends the halves. A batch from the scheduler holds its grant for the
        time `granted` (now, or a moment ahead: it is marked meanwhile; `fleet_stamp`: its
        grant in the fleet's limits) after `waited` seconds there; None: wait for a grant here.

        The mark comes after the governor's wait, so that a batch waiting for its rate is still
        only claimed (a cancel or pause takes it back, and a crash puts it back untouched); the
        grant is renewed if the mark made the request late for it (GRANT_SLACK).
        """
        if not self.accounts.may_send(batch.account):
            return [released(batch)]  # put back at once, not after a wait for the rate
        settings = self.controls.account(batch.account)
        if waited is None:
            # Waiting for the rate governor is not being wedged (a 429 can ask for minutes).
            waited = await self._rate_grant(batch)
            granted = trio.current_time()
        ticket = self.accounts.breakers.admit(batch.account, trio.current_time(),
                                              settings.timeout + LEASE_MARGIN)
        if ticket.admission is Admission.HOLD:
            return [released(batch)]  # the provider went away while this batch waited
        results: Sent = []
        if ticket.probe and len(batch.messages) > 1:
            # One message tells whether the provider is back; the rest waits in the queue.
            results.append(released(Batch(batch.account, batch.tenant_id, batch.messages[1:],
                                           batch.submission_id)))
            batch = Batch(batch.account, batch.tenant_id, batch.messages[:1])
        if not await self._mark(batch, ticket):
            return [*results, released(batch)]  # the writer puts back only what is still ours
        with self.health.working("sender"):
            await self.lease.wait_until_covers(settings.timeout + LEASE_MARGIN)
        regrant = await self._regrant(batch, granted, fleet_stamp)
        if regrant is None:
            return [*results, released(batch)]  # a 429 came in: it waits unmarked, queued
        return [*results, *await self._request(batch, ticket, waited + regrant)]

    async def _rate_grant(self, batch: Batch) -> float:
        """Wait for this daemon's grant, then the fleet's (express batches: they hold their
        own senders, so they wait here); seconds waited."""
        waited = await self.accounts.governor.acquire(
            batch.account, batch.tenant_id, len(batch.messages),
            requests=self.controls.requests(batch))
        while (wait := (await self._fleet_wait(batch, 0.0))[0]) > 0:
            await trio.sleep(wait)
            waited += wait
        return waited

    async def _fleet_wait(self, batch: Batch, lead: float,
                          replace: str = "") -> tuple[float, str]:
        """Reserve the batch in the fleet's limits (sendd.shared.limits) `lead` seconds ahead,
        in place of its missed grant `replace`: (0, the grant's stamp) when granted (or no
        fleet), else how long to wait before asking again (and `replace`, still to drop)."""
        fleet = self.accounts.fleet
        if fleet is None or not fleet.shared:
            return 0.0, ""
        verdict = await fleet.reserve_batch(batch, self.controls.requests(batch), lead, replace)
        if verdict.granted:
            return 0.0, verdict.stamp
        return max(verdict.wait, 0.001), replace

    async def _regrant(self, batch: Batch, granted: float, fleet_stamp: str) -> float | None:
        """Seconds waited for the grant: until its time when the batch was marked ahead of it,
        or for a new one when the mark, or a busy event loop waking it, made it late for its
        own (in the fleet's limits too, replacing the grant missed: other daemons' requests
        left on time, and a late one would land in the next window with theirs); None when
        that would take longer than REGRANT_WAIT (a 429's Retry-After came in)."""
        waited = 0.0
        while True:
            now = trio.current_time()
            if now - granted <= GRANT_SLACK:
                await trio.sleep_until(granted)
                waited += max(0.0, granted - now)
                if trio.current_time() - granted <= GRANT_SLACK:
                    return waited
                continue  # woken too late for it
            granted = self.accounts.governor.reserve(
                batch.account, batch.tenant_id, len(batch.messages),
                requests=self.controls.requests(batch))
            if waited + granted - trio.current_time() > REGRANT_WAIT:
                return None
            fleet_wait, fleet_stamp = await self._fleet_wait(
                batch, max(0.0, granted - trio.current_time()), fleet_stamp)
            if fleet_wait:
                await trio.sleep(fleet_wait)  # then a new grant: the local one has passed
                waited += fleet_wait

    async def _mark(self, batch: Batch, ticket: Ticket) -> bool:
        """Make sure the batch has its durable mark (express batches come marked by their
        claim); False when it must not be sent."""
        if batch.submission_id is not None:
            return True
        with self.health.working("sender"):
            batch.submission_id, refusal = await self.mark_submitted(batch)
        if batch.submission_id is None:
            self.accounts.breakers.abandoned(batch.account, ticket)
            log.warning(refusal, account=batch.account, size=len(batch.messages),
                        **_tenant_fields(batch))
            return False
        return True

    async def mark_submitted(self, batch: Batch) -> tuple[int | None, str]:
        """Write the durable mark before the request, fenced by this daemon's lease and claims;
        (None, why) if it must not be sent: a claim of the batch was undone (a PostgreSQL
        crash, a cancel), a campaign of it was cancelled or paused, or an operator pause
        (sendd.pause) covers its tenant, its account or everything.

        While the database is away this waits (and the pipeline behind it stops); the
        heartbeat decides when the outage has outlived the lease.
        """
        needed = self.controls.account(batch.account).timeout + LEASE_MARGIN
        args = (self.lease.instance_id, batch.account, [m.id for m in batch.messages], needed,
                sorted({m.campaign_id for m in batch.messages if m.campaign_id is not None}))
        while True:
            answer = await retrying(self.pool, lambda conn: conn.fetchrow(MARK_SUBMITTED, *args),
                                    health=self.health, actor="sender",
                                    trouble="cannot write submission marks", event="mark_retry")
            if answer["id"] is not None:
                return answer["id"], ""
            if not answer["alive"]:
                raise LeaseLost(f"lease of instance {self.lease.instance_id} ended; not sending")
            if answer["paused"]:
                return None, "paused"  # an operator pause of its tenant, account or all
            if answer["stopped"]:
                return None, "campaign_stopped"
            if not answer["held"]:
                return None, "claim_lost"
            # The lease is alive but has less than timeout + margin left (the heartbeat is
            # due): wait for the renewal rather than send uncovered or give the lease up.
            await trio.sleep(LEASE_WAIT)

    async def _request(self, batch: Batch, ticket: Ticket, waited: float) -> Sent:
        """Call the provider and turn its answers into results."""
        settings = self.controls.account(batch.account)
        with self.health.working("sender"):
            started = time.time()  # wall clock: logged, so rates can be checked from the log
            request_started = trio.current_time()
            provider = self.accounts.providers[batch.account]
            if settings.single:
                responses = await provider.send_each(batch.messages)
            else:
                responses = [await provider.send(batch.messages)]
        await self._note_availability(batch.account, ticket, responses)
        response = speaking_for(responses)
        self.metrics.rate_wait.observe(waited)
        self.metrics.provider_request.labels(batch.account).observe(
            trio.current_time() - request_started)
        self.metrics.batch_size.observe(len(batch.messages))
        if response.kind == base.TOO_LARGE and not settings.single and len(batch.messages) > 1:
            return [BatchResult(batch.submission_id), *await self._split(batch)]
        if response.kind == base.AMBIGUOUS:
            # (For one-message requests: any ambiguous one sends the whole batch to be looked
            # up, reference by reference; the ones answered are found as they were answered.)
            _log_batch(batch, response, [], started)
            # Give the provider as long again as we waited for it before looking them up.
            not_before = trio.current_time() + settings.timeout
            return [Unsettled(batch.submission_id, batch.account, batch.messages, not_before)]
        retry = self.controls.config.retry
        outcomes, reaction = (classify_each(batch, responses, retry) if settings.single
                              else classify(batch, response, retry))
        await self._apply(batch.account, reaction)
        _log_batch(batch, response, outcomes, started)
        if any(r.kind == base.LOCAL for r in responses):
            await self._local_trouble(response.error)
        return [BatchResult(batch.submission_id, outcomes)]

    async def _apply(self, account: str, reaction: Reaction) -> None:
        """What the answers mean for the account: suspension, slowing down, speeding up (for
        the fleet too, when it shares its limits)."""
        governor, fleet = self.accounts.governor, self.accounts.fleet
        if reaction.suspend is not None and account not in self.accounts.suspended:
            await self._suspend(account, reaction.suspend)
        msgs, reqs, _ = governor.configured(account, "")
        if reaction.throttled:
            governor.penalize(account, reaction.retry_after)
            if fleet is not None:
                await fleet.penalize(account, msgs, reqs, reaction.retry_after)
        elif reaction.accepted:
            # Backed off as the fleet's limits stood at the last reservation (the governor
            # follows them), before this daemon's own reward.
            backed_off = governor.effective(account) != (msgs, reqs)
            governor.reward(account)
            if fleet is not None and backed_off:
                await fleet.reward(account, msgs, reqs)

    async def _suspend(self, account: str, reason: str) -> None:
        """The provider suspended the account: a stored pause of it, with the reason, stops
        every daemon of the fleet (as an operator's would: `sendd ctl resume --account` lifts
        it anywhere)."""
        log.error("account_suspended", account=account, reason=reason)
        await retrying(self.pool, lambda conn: pauses.store(
            conn, "account", account, f"suspended by the provider: {reason}"),
            health=self.health, actor="sender", trouble="cannot store a suspension",
            event="suspension_retry")
        # Stored first: a read of the pauses from before the store is now stale, and dropped.
        self.accounts.suspended[account] = reason
        self.controls.paused_accounts.add(account)
        self.controls.pause_commands += 1

    async def _split(self, batch: Batch) -> Sent:
        half = len(batch.messages) // 2
        new_max = self.accounts.shrink_batches(batch.account, half)
        log.warning("batch_too_large", account=batch.account, size=len(batch.messages),
                    new_max=new_max)
        results: Sent = []
        for part in (batch.messages[:half], batch.messages[half:]):
            results += await self.send_batch(Batch(batch.account, batch.tenant_id, part))
        return results

    async def _local_trouble(self, error: str) -> None:
        """This machine could not open a connection (no file descriptors): the messages went
        back to the queue with no attempt used; pause this sender a moment rather than spin."""
        self.health.report_problem("sender", f"cannot open provider connections: {error}")
        log.error("sender_local_failure", error=error, pause=LOCAL_PAUSE)
        await trio.sleep(LOCAL_PAUSE)

    async def _note_availability(self, account: str, ticket: Ticket,
                                 responses: list[base.SendResponse]) -> None:
        """The breaker's bookkeeping; with a fleet, the others hold the account while this
        daemon's breaker is not closed (it probes for them)."""
        recovered = note_availability(self.accounts, account, ticket, responses)
        if recovered:
            self.controls.wake_pollers()
        fleet = self.accounts.fleet
        if fleet is None:
            return
        breaker = self.accounts.breakers.get(account)
        if recovered:
            await fleet.provider_up(account)
        elif breaker.state is not State.CLOSED:
            # Until its next probe has had its time: its answer extends or lifts the hold.
            next_probe = max(PROBE_BASE, breaker.retry_at - trio.current_time())
            await fleet.provider_down(account, next_probe + self.controls.account(account).timeout)


def note_availability(accounts: Accounts, account: str, ticket: Ticket,
                      responses: list[base.SendResponse]) -> bool:
    """What the answers say about the provider being there: any answer at all means it is
    (whatever it said); none means it is unreachable (or too slow to trust with more).
    True when the account just recovered."""
    breakers, now = accounts.breakers, trio.current_time()
    kinds = {r.kind for r in responses}
    failed = next((r for r in responses if r.kind in (base.AMBIGUOUS, base.UNAVAILABLE)), None)
    if kinds - {base.AMBIGUOUS, base.UNAVAILABLE, base.LOCAL}:
        if breakers.answered(account, ticket):
            log.info("account_recovered", account=account)
            return True
    elif failed is None:  # only our own trouble: nothing learned about the provider
        breakers.abandoned(account, ticket)
    elif base.AMBIGUOUS in kinds:
        if breakers.ambiguous(account, ticket, failed.error, now):
            _log_breaker(accounts, account, "no answer in time")
    elif breakers.unavailable(account, ticket, failed.error, now):
        _log_breaker(accounts, account, "unreachable")
    return False


def _log_breaker(accounts: Accounts, account: str, why: str) -> None:
    breaker = accounts.breakers.get(account)
    next_probe = max(0.0, breaker.retry_at - trio.current_time())
    if breaker.state is State.HALF_OPEN:
        log.warning("account_probing", account=account, why=why, reason=breaker.reason)
    elif breaker.failures == 1:
        log.warning("account_unavailable", account=account, why=why,
                    reason=breaker.reason, next_probe_s=round(next_probe, 1))
    else:
        log.info("account_probe_failed", account=account, why=why,
                 reason=breaker.reason, failures=breaker.failures,
                 next_probe_s=round(next_probe, 1))


async def run_sender(
    sender: Sender,
    batches: trio.MemoryReceiveChannel[Batch],
    results: trio.MemorySendChannel[BatchResult],
    unsettled: trio.MemorySendChannel[Unsettled],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send batches until the batches channel ends."""
    async with batches, results, unsettled:
        task_status.started()
        async for batch in batches:
            await hand_on(await sender.send_batch(batch), results, unsettled)


async def run_scheduled_sender(
    sender: Sender,
    scheduler: Scheduler,
    results: trio.MemorySendChannel[BatchResult],
    unsettled: trio.MemorySendChannel[Unsettled],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send what the scheduler hands out until it is closed and empty."""
    async with results, unsettled:
        task_status.started()
        while (taken := await scheduler.take()) is not None:
            if taken.release:
                log.info("batch_released", why=taken.release, account=taken.batch.account,
                         size=len(taken.batch.messages), **_tenant_fields(taken.batch))
                await results.send(released(taken.batch))
                continue
            try:
                sent = await sender.send_batch(taken.batch, taken.waited, taken.granted,
                                               taken.fleet_stamp)
            finally:
                scheduler.done(taken.batch.account)
            await hand_on(sent, results, unsettled)


async def hand_on(sent: Sent, results: trio.MemorySendChannel[BatchResult],
                  unsettled: trio.MemorySendChannel[Unsettled]) -> None:
    """Outcomes to the writer, ambiguous batches to the settler."""
    for result in sent:
        if isinstance(result, Unsettled):
            await hand_to_settler(unsettled, result)
        else:
            await results.send(result)


async def hand_to_settler(unsettled: trio.MemorySendChannel[Unsettled], item: Unsettled) -> None:
    try:
        await unsettled.send(item)
    except trio.BrokenResourceError:
        # Draining: the settler is gone. The mark stays open and the messages stay leased, so
        # whichever daemon adopts this instance's work settles them.
        log.warning("settlement_deferred", batch=item.submission_id)


def _tenant_fields(batch: Batch) -> dict[str, Any]:
    """The batch's tenant, or for a batch of several tenants without limits their number."""
    if batch.tenant_id != ANY_TENANT:
        return {"tenant": batch.tenant_id}
    tenants = batch.tenants()
    return {"tenant": next(iter(tenants))} if len(tenants) == 1 else {
        "tenant": None, "tenants": len(tenants)}


def _log_batch(batch: Batch, response: base.SendResponse, outcomes: list[Any],
               started: float) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    fields: dict[str, Any] = {
        "batch": batch.submission_id, "account": batch.account, **_tenant_fields(batch),
        "campaigns": sorted({m.campaign_id for m in batch.messages if m.campaign_id}),
        "size": len(batch.messages), "bulk_id": response.bulk_id,
        "sent_at": round(started, 4), "ms": round((time.time() - started) * 1000, 1),
        **counts,
    }
    if response.kind == base.OK:
        log.info("batch_sent", **fields)
    else:
        log.warning("batch_not_sent", outcome=response.kind, error=response.error, **fields)
