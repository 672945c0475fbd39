"""The fleet's limits: every daemon sharing a Redis reserves its grants there, so an account or
tenant is never sent to faster than its limit across all of them (`redis.url`).

The daemon's own governor (sendd.core.ratelimit) still decides what is ready here; a batch that
it lets go is then reserved in Redis (sendd.shared.scripts.RESERVE, one round trip). A refusal
says how long to wait and why: the fleet's rate, an account's 429 backoff, or the hold after
Redis lost its memory. The account's effective (backed-off) limits come back with every answer
and the local governor follows them, so this daemon's claims shrink with a 429 that another
daemon saw.

When Redis does not answer in time, the daemon falls back to a share of every limit: the limit
divided by the live daemons (the instance table, counted at each lease renewal). It says so in
the instance table (`limits_local`), and the daemons that still reach Redis read how many do
and reserve that much less, so the fleet keeps every limit also when Redis is away for only
some of them. The fallen daemon sends nothing until they have read it and their grants made
before have left the window (LOCAL_HOLD). A watch (`run_redis_watch`) pings Redis meanwhile and
rejoins, holding the fleet for a window and a probe interval so that nobody's local grants
overlap shared ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from sendd.core.ratelimit import GUARD_WINDOW, Governor, share_of
from sendd.db import leases
from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.model import Batch
from sendd.shared import scripts
from sendd.state.health import Health
from sendd.state.lease import Lease

log = structlog.get_logger()

# A reservation slower than this counts as Redis trouble. It is one round trip (~0.2 ms), but
# on a saturated machine the event loop alone can take a few hundred milliseconds to get to the
# answer: 0.25 s made a daemon of a busy bench fall back with Redis there.
REDIS_TIMEOUT = 1.0
PROBE_EVERY = 0.5  # seconds between pings while Redis is away
# After Redis was away or lost its data: the grants made meanwhile leave the window, and every
# daemon notices Redis is back (a ping, its timeout) before anything is granted again.
HOLD = GUARD_WINDOW + PROBE_EVERY + REDIS_TIMEOUT + 0.1
# A daemon that lost Redis sends nothing until the others know (its watch writes the flag
# within a probe interval, theirs read it within one more) and their grants made before have
# left the window.
LOCAL_HOLD = GUARD_WINDOW + 2 * PROBE_EVERY + 0.5
PREFIX = "sendd"

SHARED, FALLBACK = "shared", "fallback"


class Link(Protocol):
    """A connection to Redis that runs the scripts (sendd.shared.link)."""

    async def run(self, script: str, keys: list[str], args: list[Any]) -> Any: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    granted: bool
    wait: float  # seconds until a retry may succeed (refused), or until the grant (granted)
    reason: str  # granted, rate, backoff, hold, fallback, local
    # The grant's time as Redis stored it (Unix seconds, its clock): to replace it when the
    # batch misses it. "": refused, or decided locally.
    stamp: str = ""

    @property
    def at(self) -> float:
        return float(self.stamp) if self.stamp else 0.0


@dataclass
class FleetLimits:
    """The shared governor of one daemon: its link to Redis, and whether it is in use."""

    link: Link
    governor: Governor
    health: Health
    lease: Lease  # counts the live daemons at each renewal: the fallback's divisor
    mode: str = SHARED
    since: float = field(default_factory=trio.current_time)
    fallbacks: int = 0  # times this daemon fell back (metrics)
    others_local: int = 0  # other live daemons sending at their share (the instance table)
    flagged_local: bool = False  # what this daemon's row says of it

    @property
    def shared(self) -> bool:
        return self.mode == SHARED

    @property
    def fleet_size(self) -> int:
        return self.lease.live_daemons

    async def reserve(self, account: str, tenant: str, limits: tuple[int, int, int],
                      units: int, requests: int, lead: float = 0.0,
                      replace: str = "") -> Verdict:
        """Reserve `units` messages in `requests` requests `lead` seconds from now against the
        account's (messages/s, requests/s) and the tenant's messages/s `limits` (configured;
        0: unlimited), dropping first the grant stamped `replace` (one this batch missed). In
        fallback the local governor's share has decided already."""
        if not self.shared:
            return Verdict(True, 0.0, "local")
        msgs, reqs, tenant_msgs = (self._room(limit) for limit in limits)
        keys = [_fleet_key(), _account_key(account),
                *_log_keys(f"account:{account}:msgs"), *_log_keys(f"account:{account}:reqs"),
                *_log_keys(f"tenant:{tenant}:msgs")]
        args = [GUARD_WINDOW, max(0.0, lead), HOLD, msgs, reqs, tenant_msgs, units, requests,
                replace, self.lease.instance_id]
        reply = await self._call(scripts.RESERVE, keys, args)
        if reply is None:
            return Verdict(False, HOLD, "fallback")
        granted, wait_us, reason, effective_msgs, effective_reqs, stamp = reply
        reason, stamp = _text(reason), _text(stamp)
        wait = int(wait_us) / 1e6
        self.governor.follow(account, int(effective_msgs), int(effective_reqs))
        if reason == "backoff":
            self.governor.defer(account, wait)
        return Verdict(bool(int(granted)), wait, reason, stamp)

    async def reserve_batch(self, batch: Batch, requests: int, lead: float = 0.0,
                            replace: str = "") -> Verdict:
        """`reserve` for a batch of `requests` requests, against its account's and tenant's
        configured limits."""
        return await self.reserve(batch.account, batch.tenant_id,
                                  self.governor.configured(batch.account, batch.tenant_id),
                                  len(batch.messages), requests, lead, replace)

    async def penalize(self, account: str, msgs: int, reqs: int,
                       retry_after: float | None) -> None:
        """A 429 seen here slows the account for the fleet."""
        if self.shared:
            await self._call(scripts.PENALIZE, [_account_key(account)],
                             [msgs, reqs, retry_after or 0.0])

    async def reward(self, account: str, msgs: int, reqs: int) -> None:
        """A success grows the fleet's backed-off limits back (only called while backed off)."""
        if self.shared:
            await self._call(scripts.REWARD, [_account_key(account)], [msgs, reqs])

    async def provider_down(self, account: str, seconds: float) -> None:
        """This daemon's breaker of the account is open: the fleet holds the account's batches
        for `seconds` (until its next probe) while this daemon probes."""
        if self.shared:
            await self._call(scripts.PROVIDER_DOWN, [_account_key(account)],
                             [seconds, self.lease.instance_id])

    async def provider_up(self, account: str) -> None:
        if self.shared:
            await self._call(scripts.PROVIDER_UP, [_account_key(account)], [])

    async def rejoin(self) -> bool:
        """Redis answers again: hold the fleet, then share; False while it still does not."""
        try:
            with trio.fail_after(REDIS_TIMEOUT * 4):
                await self.link.ping()
                await self.link.run(scripts.REJOIN, [_fleet_key()], [HOLD])
        except Exception as error:  # noqa: BLE001 - any client error: still away
            self.health.report_problem("redis", self._fallback_text(error))
            return False
        self.mode, self.since = SHARED, trio.current_time()
        self.governor.set_share(1)
        self.health.problem_solved("redis")
        log.info("redis_rejoined", hold_s=HOLD)
        return True

    async def publish(self, pool: Any) -> None:
        """Say in the instance table whether this daemon sends at its share; read how many
        others do."""
        local = not self.shared
        async with pool.acquire() as conn:
            if local != self.flagged_local:
                await leases.set_limits_local(conn, self.lease.instance_id, local)
                self.flagged_local = local
            self.others_local = await leases.others_local(conn, self.lease.instance_id)

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "for_s": round(trio.current_time() - self.since, 1),
                "daemons": self.fleet_size, "daemons_at_their_share": self.others_local,
                "share": 1.0 if self.shared else round(1 / self.fleet_size, 3)}

    def _room(self, limit: int) -> int:
        """A limit less the shares of the daemons sending at theirs, Redis out of their
        reach (0: unlimited)."""
        if limit <= 0 or not self.others_local:
            return limit
        return max(1, limit - self.others_local * share_of(limit, self.fleet_size))

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                return await self.link.run(script, keys, args)
        except Exception as error:  # noqa: BLE001 - any client or timeout error
            self._fall_back(error)
            return None

    def _fall_back(self, error: BaseException) -> None:
        if not self.shared:
            return
        self.mode, self.since = FALLBACK, trio.current_time()
        self.fallbacks += 1
        # Nothing for a window: the fleet's grants of the last one are in Redis, out of reach.
        self.governor.set_share(self.fleet_size)
        self.governor.defer_all(LOCAL_HOLD)
        self.health.report_problem("redis", self._fallback_text(error))
        log.warning("redis_unreachable", error=describe(error), daemons=self.fleet_size,
                    share=round(1 / self.fleet_size, 3))

    def _fallback_text(self, error: BaseException) -> str:
        return (f"unreachable ({describe(error)}); sending at 1/{self.fleet_size} of each "
                "limit until it answers")


async def run_redis_watch(fleet: FleetLimits, pool: Any,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Every PROBE_EVERY seconds: while Redis is away, ping it and rejoin when it answers;
    publish this daemon's mode and read the others' (sendd.instance)."""
    task_status.started()
    while True:
        await trio.sleep(PROBE_EVERY)
        if not fleet.shared and not await fleet.rejoin():
            fleet.governor.set_share(fleet.fleet_size)  # daemons may have come or gone
        try:
            await fleet.publish(pool)
        except RETRYABLE_ERRORS as error:
            fleet.health.report_problem("redis", f"cannot publish its mode: {describe(error)}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fleet_key() -> str:
    return f"{PREFIX}:fleet"


def _account_key(account: str) -> str:
    return f"{PREFIX}:account:{account}"


def _log_keys(name: str) -> list[str]:
    return [f"{PREFIX}:{name}", f"{PREFIX}:{name}:sum"]
