"""The fleet's limits in Redis (sendd.shared): the reservation script against a real, private
redis-server, and the fallback to a local share when Redis goes away and the rejoin after.

Time here is Redis's and the wall clock's (the scripts read Redis's TIME), so the windows are
checked on the grant times Redis reports, not on when the test happened to look.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import trio

from harness import busiest_window
from sendd.core.ratelimit import GUARD_WINDOW, Governor
from sendd.db.connection import run
from sendd.dev.pgserver import PrivateRedis, free_port
from sendd.shared import limits
from sendd.shared.limits import FALLBACK, HOLD, SHARED, FleetLimits
from sendd.shared.link import RedisLink
from sendd.state.health import Health
from sendd.state.lease import Lease

T = TypeVar("T")


def fresh(redis_server: PrivateRedis) -> None:
    """An empty Redis that the fleet has already been using (no hold for a fresh start)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.hset("sendd:fleet", mapping={"born": 0, "hold_until": 0})
    client.close()


def with_fleet(url: str, work: Callable[[FleetLimits], Awaitable[T]],
               accounts: dict[str, tuple[int, int]] | None = None, live: int = 1) -> T:
    """Run `work` under trio (with the asyncio bridge) with a FleetLimits on `url`."""

    async def main() -> T:
        governor = Governor()
        for name, (msgs, reqs) in (accounts or {"main": (500, 0)}).items():
            governor.set_account(name, msgs, reqs)
        lease = Lease("test", trio.current_time() + 60)
        lease.live_daemons = live
        fleet = FleetLimits(RedisLink(url), governor, Health(stall_seconds=60), lease)
        try:
            return await work(fleet)
        finally:
            await fleet.link.aclose()

    return run(main)


async def reserve_until_granted(fleet: FleetLimits, units: int, deadline: float,
                                tenant: str = "t", tenant_limit: int = 0) -> list[Any]:
    grants = []
    while trio.current_time() < deadline:
        msgs, reqs, _ = fleet.governor.configured("main", tenant)
        verdict = await fleet.reserve("main", tenant, (msgs, reqs, tenant_limit), units, 1)
        if verdict.granted:
            grants.append(verdict)
            await trio.sleep(verdict.wait)
        else:
            await trio.sleep(verdict.wait)
    return grants


def test_concurrent_reservations_never_exceed_the_limit_in_any_window(
        redis_server: PrivateRedis) -> None:
    """Six reservers of random batch sizes against 500 msgs/s for 3 s: no window of the
    governor's length holds more than 500 by Redis's grant times, and the limit is used."""
    fresh(redis_server)
    rng = random.Random(7)
    sizes = [rng.choice([1, 7, 50, 120, 250, 500]) for _ in range(6)]

    async def work(fleet: FleetLimits) -> list[tuple[float, int]]:
        grants: list[tuple[float, int]] = []
        deadline = trio.current_time() + 3.0

        async def reserver(units: int) -> None:
            grants.extend((v.at, units) for v in
                          await reserve_until_granted(fleet, units, deadline))

        async with trio.open_nursery() as nursery:
            for units in sizes:
                nursery.start_soon(reserver, units)
        return grants

    grants = with_fleet(redis_server.url, work)
    assert busiest_window(grants, GUARD_WINDOW) <= 500, busiest_window(grants, GUARD_WINDOW)
    total = sum(n for _, n in grants)
    span = max(t for t, _ in grants) - min(t for t, _ in grants)
    assert total >= 0.8 * 500 * span, (total, span)  # the limit is used, not only kept


def test_two_daemons_share_a_tenant_limit(redis_server: PrivateRedis) -> None:
    """Two FleetLimits (two daemons) on one tenant limited to 100 msgs/s, account unlimited:
    together never more than 100 in a window."""
    fresh(redis_server)

    async def one(fleet: FleetLimits) -> list[tuple[float, int]]:
        verdicts = await reserve_until_granted(fleet, 20, trio.current_time() + 2.5,
                                               tenant="slow", tenant_limit=100)
        return [(v.at, 20) for v in verdicts]

    async def both() -> list[tuple[float, int]]:
        results: list[list[tuple[float, int]]] = []

        async def daemon() -> None:
            governor = Governor()
            governor.set_account("main", 0, 0)
            fleet = FleetLimits(RedisLink(redis_server.url), governor, Health(60),
                                Lease("d", trio.current_time() + 60))
            try:
                results.append(await one(fleet))
            finally:
                await fleet.link.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon)
            nursery.start_soon(daemon)
        assert all(results) and len(results) == 2  # both got grants
        return [g for r in results for g in r]

    grants = run(both)
    assert busiest_window(grants, GUARD_WINDOW) <= 100


def test_a_fresh_redis_grants_nothing_for_the_hold(redis_server: PrivateRedis) -> None:
    """An empty Redis (restarted: the fleet's last grants are lost) holds every grant for
    HOLD seconds; then grants."""
    redis.Redis.from_url(redis_server.url).flushall()

    async def work(fleet: FleetLimits) -> tuple[Any, Any]:
        first = await fleet.reserve("main", "t", (500, 0, 0), 10, 1)
        await trio.sleep(first.wait)
        return first, await fleet.reserve("main", "t", (500, 0, 0), 10, 1)

    first, then = with_fleet(redis_server.url, work)
    assert not first.granted and first.reason == "hold"
    assert HOLD - 0.1 <= first.wait <= HOLD + 0.001
    assert then.granted


def test_a_429_slows_the_account_for_every_daemon(redis_server: PrivateRedis) -> None:
    """One daemon's 429 (Retry-After 1 s) halves the fleet's limit and holds everyone's
    grants; the other daemon's local governor follows; successes grow it back."""
    fresh(redis_server)

    async def work(fleet: FleetLimits) -> dict[str, Any]:
        await fleet.penalize("main", 500, 0, 1.0)
        other = FleetLimits(RedisLink(redis_server.url), Governor(), Health(60), fleet.lease)
        other.governor.set_account("main", 500, 0)
        try:
            held = await other.reserve("main", "t", (500, 0, 0), 10, 1)
            backoff = other.governor.backing_off("main")
            await trio.sleep(held.wait)
            after = await other.reserve("main", "t", (500, 0, 0), 10, 1)
            halved = other.governor.effective("main")
            for _ in range(10):
                await other.reward("main", 500, 0)
            await trio.sleep(0.01)
            grown = await other.reserve("main", "t", (500, 0, 0), 10, 1)
            return {"held": held, "backoff": backoff, "after": after, "halved": halved,
                    "grown": other.governor.effective("main"), "last": grown}
        finally:
            await other.link.aclose()

    seen = with_fleet(redis_server.url, work)
    assert not seen["held"].granted and seen["held"].reason == "backoff"
    assert 0.8 < seen["held"].wait <= 1.0 and 0.8 < seen["backoff"] <= 1.0
    assert seen["after"].granted and seen["halved"] == (250, 0)
    assert seen["last"].granted and seen["grown"] == (500, 0)


def test_redis_away_falls_back_to_a_share_and_rejoins(tmp_path: Any) -> None:
    """Redis stops: the next reservation falls back (mode, health, no grant for a window, then
    a third of each limit with three live daemons); Redis starts again, empty: the watch
    rejoins and the fleet holds for HOLD before the first shared grant."""
    server = PrivateRedis(base_dir=tmp_path).start()
    try:
        fresh(server)

        async def work(fleet: FleetLimits) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            seen["before"] = (await fleet.reserve("main", "t", (600, 0, 0), 10, 1)).granted
            server.stop_process()
            seen["away"] = await fleet.reserve("main", "t", (600, 0, 0), 10, 1)
            seen["mode"], seen["problems"] = fleet.mode, fleet.health.current_problems()
            seen["share"] = fleet.governor.effective("main")
            seen["deferred"] = fleet.governor.backing_off("main")
            seen["local"] = await fleet.reserve("main", "t", (600, 0, 0), 10, 1)
            seen["still"] = await fleet.rejoin(), fleet.mode  # what the watch does
            server.start_process()
            seen["back"] = await fleet.rejoin(), fleet.mode, fleet.health.current_problems()
            seen["rejoined"] = await fleet.reserve("main", "t", (600, 0, 0), 10, 1)
            seen["effective"] = fleet.governor.effective("main")
            return seen

        seen = with_fleet(server.url, work, {"main": (600, 0)}, live=3)
    finally:
        server.stop()
    assert seen["before"]
    assert not seen["away"].granted and seen["away"].reason == "fallback"
    assert seen["mode"] == FALLBACK and "redis" in seen["problems"], seen
    assert "1/3" in seen["problems"]["redis"]
    assert seen["share"] == (200, 0) and seen["deferred"] > GUARD_WINDOW - 0.1
    assert seen["local"].granted and seen["local"].reason == "local"  # the local share decides
    assert seen["still"] == (False, FALLBACK)
    assert seen["back"] == (True, SHARED, {})  # the problem is gone with it
    assert not seen["rejoined"].granted and seen["rejoined"].reason == "hold"
    assert seen["effective"] == (600, 0)


def test_the_daemons_at_their_share_are_left_room(redis_server: PrivateRedis) -> None:
    """Of three live daemons one cannot reach Redis and sends a third of 600 msgs/s on its
    own: the ones that share reserve at most 400 between them."""
    fresh(redis_server)

    async def work(fleet: FleetLimits) -> list[tuple[float, int]]:
        fleet.others_local = 1
        verdicts = await reserve_until_granted(fleet, 50, trio.current_time() + 2.5)
        return [(v.at, 50) for v in verdicts]

    grants = with_fleet(redis_server.url, work, {"main": (600, 0)}, live=3)
    assert 350 <= busiest_window(grants, GUARD_WINDOW) <= 400, busiest_window(grants)


def test_an_unreachable_redis_at_start_falls_back_at_once() -> None:
    """A URL nobody answers on: the first reservation falls back within the timeout."""

    async def work(fleet: FleetLimits) -> tuple[Any, float]:
        start = trio.current_time()
        verdict = await fleet.reserve("main", "t", (500, 0, 0), 10, 1)
        return verdict, trio.current_time() - start

    verdict, took = with_fleet(f"redis://127.0.0.1:{free_port()}/0", work)
    assert verdict.reason == "fallback" and took <= limits.REDIS_TIMEOUT + 0.2


@pytest.mark.parametrize("limit", [0, 3])
def test_a_share_is_never_zero_and_unlimited_stays_unlimited(limit: int) -> None:
    governor = Governor()
    governor.set_account("main", limit, 0)
    governor.set_share(4)
    assert governor.effective("main") == ((1 if limit else 0), 0)
    assert SHARED != FALLBACK
