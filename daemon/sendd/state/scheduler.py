"""The scheduler: campaign batches waiting to be sent, keyed by what they wait for.

The batcher puts batches in; senders take only a batch that may go now. A batch waits here,
not in a sender, for its tenant's or account's rate, a 429's Retry-After, or a free slot of its
account (each account has at most `max_in_flight` requests on the wire, so a provider that takes
10 s per request holds that many senders, never all of them). So a limited, throttled or slow
tenant or account never holds back another.

Among the batches that may go, tenants take turns by weighted fair queueing: each tenant has a
virtual time that grows by the messages it sent divided by its weight, and the tenant furthest
behind goes first (a tenant that comes back from idle starts level with the others, not with
credit for the time it was away). Tenants without a rate limit share batches (model.ANY_TENANT,
one "tenant" here): their shares are set where they are claimed (sendd.actors.poller). Between
accounts, the one with fewer requests on the wire goes first.

A batch of a paused tenant or account (the operator's pauses, `Controls`) or of a stopped
campaign (`stop_campaigns`, told by sendd.actors.stopper) is handed out at once, to be
released (put back in the database untouched), never to be sent.

How many messages wait here per tenant and account is what the pollers read to size their
claims (about a second of each limit: `room_for_tenant`, `room_for_account`).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

import trio

from sendd.model import Batch, Message
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls

Key = tuple[str, str]  # (account, tenant)

# A batch waiting for its rate is handed out this long before its grant: its sender writes the
# submission mark meanwhile and sends at the grant time, instead of marking after it and being
# late (a late batch waits for a later grant: under load that cost a limited tenant up to half
# its rate).
MARK_LEAD = 0.05

# What a waiting tenant or account waits for (status, metrics, `ctl watch`); FLEET: Redis's
# hold after it was away or lost its data, or this daemon falling back to its share.
RATE, BACKOFF, BREAKER, PAUSE, CONCURRENCY, SENDER, FLEET = (
    "rate", "backoff", "breaker", "pause", "concurrency", "sender", "fleet")
_HELD_FOR = {"rate": RATE, "backoff": BACKOFF, "breaker": BREAKER, "hold": FLEET,
             "fallback": FLEET}


@dataclass(slots=True)
class Taken:
    """A batch a sender took: to send at `granted` (its rate grant, reserved: now, or up to
    MARK_LEAD ahead) or, when `release` says why, to put back untouched. `waited`: seconds it
    spent in the scheduler."""

    batch: Batch
    release: str | None
    waited: float
    granted: float = 0.0
    fleet_stamp: str = ""  # its grant in the fleet's limits, to replace if it is missed


@dataclass(frozen=True)
class ChannelLike:
    current_buffer_used: int
    max_buffer_size: int
    tasks_waiting_send: int
    tasks_waiting_receive: int


@dataclass(slots=True)
class _Queued:
    batch: Batch
    since: float


@dataclass
class Scheduler:
    accounts: Accounts
    controls: Controls
    # Batches that may go now, beyond which `put` waits (backpressure on the batcher); batches
    # waiting for a limit do not count (the claims are sized to the limits instead).
    capacity: int
    queues: dict[Key, deque[_Queued]] = field(default_factory=dict)
    in_flight: Counter[str] = field(default_factory=Counter)  # account -> requests on the wire
    # Claimed messages not yet taken by a sender (on their way here, or here), by tenant and by
    # account: what the claims are sized by.
    waiting_tenant: Counter[str] = field(default_factory=Counter)
    waiting_account: Counter[str] = field(default_factory=Counter)
    stopped: set[int] = field(default_factory=set)  # campaigns paused or cancelled
    closed: bool = False
    _virtual: dict[str, float] = field(default_factory=dict)  # tenant -> virtual time
    # Keys the fleet's limits refused (sendd.shared.limits): until when, and why.
    _held: dict[Key, tuple[float, str]] = field(default_factory=dict)
    _reserving: set[Key] = field(default_factory=set)  # keys a taker is asking Redis about
    _ready: int = 0  # batches that could go at the last look
    _putting: int = 0  # batchers waiting for space
    _taking: int = 0  # senders waiting for a batch
    _changed: trio.Event = field(default_factory=trio.Event)  # for the senders in `take`
    _space: trio.Event = field(default_factory=trio.Event)  # for the batcher in `put`

    async def put(self, batch: Batch) -> None:
        """Queue a batch; waits while `capacity` batches could already go."""
        while self._ready >= self.capacity and not self.closed:
            space = self._space
            self._putting += 1
            try:
                await space.wait()
            finally:
                self._putting -= 1
        key = (batch.account, batch.tenant_id)
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
            self._level(batch.tenant_id)
        queue.append(_Queued(batch, trio.current_time()))
        self._ready += 1  # until a look says otherwise
        self._wake()

    def claimed(self, messages: list[Message]) -> None:
        """Messages claimed for this pipeline: they count against their limits' room from
        now until a sender takes them."""
        self.waiting_tenant.update(m.tenant_id for m in messages)
        self.waiting_account.update(m.account for m in messages)

    def close(self) -> None:
        """Nothing more comes: `take` returns None once the queues are empty."""
        self.closed = True
        self._wake()

    async def take(self) -> Taken | None:
        """The next batch that may go, as soon as there is one; None once closed and empty."""
        while True:
            now = trio.current_time()
            key, wake_at = self._choose(now)
            if key is not None:
                fleet = await self._fleet_grant(key, now)
                if fleet is None:
                    continue  # refused: the key is held
                taken = self._pop(key, trio.current_time())
                stamp, at = fleet
                if stamp and taken.release is None:
                    taken.granted, taken.fleet_stamp = max(taken.granted, at), stamp
                return taken
            if self.closed and not self.queues:
                return None
            self._taking += 1
            try:
                await self._wait_for_change(wake_at)
            finally:
                self._taking -= 1

    def done(self, account: str) -> None:
        """A request taken for `account` has ended (answered, failed or timed out)."""
        self.in_flight[account] -= 1
        self._wake()

    def stop_campaigns(self, campaigns: set[int]) -> None:
        """Campaigns paused or cancelled: their waiting messages are released, not sent."""
        self.stopped = campaigns
        if campaigns:
            self._wake()

    def campaigns(self) -> set[int]:
        """The campaigns with messages waiting here."""
        return {m.campaign_id for queue in self.queues.values() for q in queue
                for m in q.batch.messages if m.campaign_id is not None}

    def wake(self) -> None:
        """Something a waiting batch depends on changed (a pause, a limit, a breaker)."""
        self._wake()

    def max_in_flight(self, account: str) -> int:
        """Requests the account may have on the wire: its own setting, else all the senders
        when it is the only account and half of them when there are others."""
        config = self.controls.config
        own = self.controls.account(account).max_in_flight
        if own:
            return own
        senders = config.pipeline.senders
        return senders if len(config.accounts) == 1 else max(1, math.ceil(senders / 2))

    def room_for_tenant(self, tenant: str, one_batch: int) -> int | None:
        """Messages a claim may add for a limited tenant: about a second of its limit (at least
        one batch) and one batch more, less what it has claimed and not sent; None: unlimited.
        The batch more is the next one on its way while this one waits for its grant: behind a
        saturating campaign a claim takes a few hundred milliseconds to reach the scheduler,
        and with a second's worth alone the tenant got 70 % of its limit."""
        limit = self.accounts.governor.tenant_limit(tenant)
        if limit <= 0:
            return None
        return max(limit, one_batch) + one_batch - self.waiting_tenant[tenant]

    def room_for_account(self, account: str, one_batch: int) -> int:
        """Messages a claim may add for an account: what its requests on the wire can carry
        (twice), and about a second of its (backed-off) message limit, less what waits already;
        none while a 429's Retry-After lasts longer than a second."""
        if self.accounts.governor.backing_off(account) > 1.0:
            return 0
        # Enough for every request it may have on the wire twice over (the next ones are being
        # claimed and batched while these are out: with only once, the pollers of a lone fast
        # account stopped claiming while the senders were busy), and a second of its limit.
        room = 2 * self.max_in_flight(account) * one_batch
        limit, _ = self.accounts.governor.effective(account)
        if limit > 0:
            room = min(room, max(limit, one_batch))
        return room - self.waiting_account[account]

    def statistics(self) -> ChannelLike:
        """Its fill as a memory channel reports it (status and metrics show it as "batches"):
        the batches that could go at the last look, against `capacity`."""
        batches = sum(len(queue) for queue in self.queues.values())
        return ChannelLike(min(self._ready, batches), self.capacity, self._putting,
                           self._taking)

    def waiting_for(self) -> dict[Key, tuple[str, int]]:
        """Per (account, tenant) with messages here: what the first batch waits for, and how
        many messages wait."""
        now = trio.current_time()
        out = {}
        for key, queue in self.queues.items():
            count = sum(len(q.batch.messages) for q in queue)
            out[key] = (self._blocker(key, queue[0].batch, now) or SENDER, count)
        return out

    def _choose(self, now: float) -> tuple[Key | None, float]:
        """The key whose first batch goes next, or None and when to look again."""
        best: Key | None = None
        best_rank: tuple[float, int] = (math.inf, 0)
        wake_at = math.inf
        ready = 0
        for key, queue in self.queues.items():
            if key in self._reserving:
                continue  # its first batch is being asked about; the answer wakes the takers
            batch = queue[0].batch
            if self._to_release(batch):
                return key, now
            account, tenant = key
            if self.in_flight[account] >= self.max_in_flight(account):
                continue  # `done` wakes the takers
            held = self._held.get(key)
            if held is not None and held[0] > now:
                wake_at = min(wake_at, held[0])
                continue
            at = self._earliest(batch, now)
            if at > now + MARK_LEAD:
                wake_at = min(wake_at, at - MARK_LEAD)
                continue
            ready += len(queue)
            rank = (self._virtual[tenant], self.in_flight[account])
            if rank < best_rank:
                best, best_rank = key, rank
        self._ready = ready
        if ready < self.capacity:
            self._make_space()
        return best, wake_at

    async def _fleet_grant(self, key: Key, now: float) -> tuple[str, float] | None:
        """With limits shared by a fleet: reserve the key's first batch there; its stamp and
        when the grant falls here ("", 0: no fleet), or None when refused (the key is then held
        as long as the refusal says). Other takers skip the key meanwhile, so the batch asked
        about is the one taken.

        A limited batch's grant is placed MARK_LEAD ahead, the time its mark takes: a request
        that leaves later than its grant must be granted again (sendd.actors.sender)."""
        fleet = self.accounts.fleet
        batch = self.queues[key][0].batch
        if fleet is None or not fleet.shared or self._to_release(batch):
            return "", 0.0
        limited = any(self.accounts.governor.configured(*key))
        lead = max(self._earliest(batch, now) - now, MARK_LEAD if limited else 0.0)
        self._reserving.add(key)
        try:
            verdict = await fleet.reserve_batch(batch, self.controls.requests(batch), lead)
        finally:
            self._reserving.discard(key)
            self._wake()
        if not verdict.granted:
            self._held[key] = (trio.current_time() + verdict.wait,
                               _HELD_FOR.get(verdict.reason, RATE))
            return None
        return verdict.stamp, trio.current_time() + verdict.wait

    def _pop(self, key: Key, now: float) -> Taken:
        queue = self.queues[key]
        queued = queue.popleft()
        if not queue:
            del self.queues[key]
            self._held.pop(key, None)
        batch = queued.batch
        self.waiting_tenant.subtract(m.tenant_id for m in batch.messages)
        self.waiting_account[batch.account] -= len(batch.messages)
        self._ready = max(0, self._ready - 1)
        if self._ready < self.capacity:
            self._make_space()
        release = self._to_release(batch)
        if release:
            return Taken(batch, release, now - queued.since)
        granted = self._reserve(batch)
        self.in_flight[batch.account] += 1
        weight = self.controls.tenant_weights.get(batch.tenant_id, 1.0)
        self._virtual[batch.tenant_id] += len(batch.messages) / weight
        return Taken(batch, None, now - queued.since, granted)

    def _earliest(self, batch: Batch, now: float) -> float:
        return self.accounts.governor.earliest(batch.account, batch.tenant_id,
                                               len(batch.messages),
                                               self.controls.requests(batch), now)

    def _reserve(self, batch: Batch) -> float:
        return self.accounts.governor.reserve(batch.account, batch.tenant_id,
                                              len(batch.messages), self.controls.requests(batch))

    def _to_release(self, batch: Batch) -> str | None:
        """Why the batch is put back at once, if it is: an operator pause, a stopped campaign,
        or an account that cannot be sent to now (suspended, or its breaker open between
        probes; the pollers claim nothing for it meanwhile)."""
        controls = self.controls
        if (controls.paused_all or batch.account in controls.paused_accounts
                or controls.paused_tenants and any(
                    m.tenant_id in controls.paused_tenants for m in batch.messages)):
            return "paused"
        if self.stopped and any(m.campaign_id in self.stopped for m in batch.messages):
            return "campaign_stopped"
        if not self.accounts.may_send(batch.account):
            return "account_unavailable"
        return None

    def _blocker(self, key: Key, batch: Batch, now: float) -> str | None:
        account, tenant = key
        if not self.accounts.may_send(account):
            return BREAKER
        if self._to_release(batch):
            return PAUSE
        held = self._held.get(key)
        if held is not None and held[0] > now:
            return held[1]
        if self.accounts.governor.backing_off(account) > 0:
            return BACKOFF
        if self._earliest(batch, now) > now:
            return RATE
        if self.in_flight[account] >= self.max_in_flight(account):
            return CONCURRENCY
        return None

    def _level(self, tenant: str) -> None:
        """A tenant coming back comes in level with the least-served waiting one."""
        others = [self._virtual[k[1]] for k in self.queues if k[1] != tenant]
        floor = min(others) if others else 0.0
        self._virtual[tenant] = max(self._virtual.get(tenant, 0.0), floor)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._make_space()  # closed, or a batch taken

    def _make_space(self) -> None:
        self._space.set()
        self._space = trio.Event()

    async def _wait_for_change(self, until: float) -> None:
        with trio.move_on_at(until):
            await self._changed.wait()
