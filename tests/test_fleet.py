"""A fleet: three `sendd run` processes sharing one private PostgreSQL and one private Redis
(`redis.url`), sending to the fake provider over loopback (CONTRACT.md guarantee 3 for a
fleet; sendd.shared).

Without the shared governor each daemon keeps every limit on its own, so three send at up to
three times it: each test below fails that way (the first two by the provider's peak window,
the third because the other daemons do not slow down).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis

from harness import (
    API_KEY,
    Daemon,
    FakeProvider,
    http_url,
    query,
    queue_campaigns,
    sendd_json,
    wait_campaign,
    wait_until,
    write_config,
)
from sendd.dev.pgserver import PrivateRedis, free_port

ACCOUNT_RATE, TENANT_RATE = 2_000, 1_000
STORM_KEY = "storm-key"  # the API key of the daemon that gets the 429s
RETRY_AFTER = 3  # seconds, in the fake's 429s


def fleet_configs(tmp_path: Path, database_url: str, provider_url: str, redis_url: str,
                  keys: list[str] | None = None, redis_urls: list[str] | None = None
                  ) -> list[Path]:
    """Three daemons' configs (own control sockets and HTTP ports), account `main` at 2,000
    msgs/s; `keys`: each daemon's API key, `redis_urls` each one's Redis."""
    configs = []
    for n in range(3):
        folder = tmp_path / f"daemon{n}"
        folder.mkdir()
        account = {"msgs_per_s": ACCOUNT_RATE, "max_batch": 200,
                   **({"api_key": keys[n]} if keys else {})}
        configs.append(write_config(folder / "sendd.toml", database_url, provider_url,
                                    accounts={"main": account},
                                    redis_url=redis_urls[n] if redis_urls else redis_url,
                                    pipeline={"lease_seconds": 10.0}))
    return configs


def stormed_fleet(tmp_path: Path, database_url: str, fake: FakeProvider, server: PrivateRedis,
                  messages: int) -> tuple[list[Path], list[int]]:
    """A fleet whose daemon 0 has an API key of its own (STORM_KEY: the fake's injected errors
    go to it alone), an empty Redis, and one campaign of an unlimited tenant queued."""
    redis.Redis.from_url(server.url).flushall()
    fake.control(api_keys=[API_KEY, STORM_KEY])
    configs = fleet_configs(tmp_path, database_url, fake.url, server.url,
                            keys=[STORM_KEY, API_KEY, API_KEY])
    return configs, queue_campaigns(database_url, {"open": 0},
                                    [("open", messages, "main", "OPEN")])


def start_fleet(stack: ExitStack, configs: list[Path]) -> list[Daemon]:
    return [stack.enter_context(Daemon(c, c.parent / "daemon.log").wait_ready())
            for c in configs]


def acceptances(fake: FakeProvider, url: str, campaigns: list[int]) -> list[float]:
    """When the fake accepted each message of the campaigns (Unix time), in order."""
    refs = [r["id"] for r in query(url, "SELECT id::text AS id FROM sendd.message "
                                        "WHERE campaign_id = ANY($1::bigint[])", campaigns)]
    return sorted(t for t in fake.accepted_at(refs).values() if t is not None)


def within_limits(fake: FakeProvider, url: str, ids: list[int]) -> None:
    """The busiest 1-second window at the fake, in 100 ms steps, of the account (every
    campaign) and of the limited tenant (the first campaign) is within their limits."""
    account = peak_in_steps(acceptances(fake, url, ids))
    tenant = peak_in_steps(acceptances(fake, url, ids[:1]))
    exact = fake.stats()["max_msgs_per_1s"][API_KEY]  # any window: shown when failing
    assert account <= ACCOUNT_RATE and tenant <= TENANT_RATE, (account, tenant, exact)


def peak_in_steps(times: list[float], step: float = 0.1) -> int:
    """Most arrivals in any 1-second window starting at a multiple of `step`."""
    slots = Counter(math.floor(t / step) for t in times)
    per_window = round(1 / step)
    starts = range(min(slots, default=0) - per_window, max(slots, default=0) + 1)
    return max((sum(slots.get(s + k, 0) for k in range(per_window)) for s in starts),
               default=0)


def limits_mode(config: Path) -> str:
    return sendd_json(config, "ctl", "status", "--json")["redis"]["mode"]


def no_duplicates(fake: FakeProvider) -> None:
    stats = fake.stats()
    assert stats["duplicate_references"] == 0 and stats["duplicate_sends"] == 0, stats


@pytest.mark.serial  # rates against the wall clock: not beside another test
def test_three_daemons_keep_an_account_and_a_tenant_limit_together(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider,
        redis_server: PrivateRedis) -> None:
    """Account 2,000 msgs/s, tenant `limited` 1,000 msgs/s, both with backlog: at the provider
    no 1-second window holds more than either limit, and the account runs at >= 0.9 of its
    limit while the backlog lasts. (Each daemon alone: up to 6,000 and 3,000.)"""
    redis.Redis.from_url(redis_server.url).flushall()
    configs = fleet_configs(tmp_path, database_url, fake_provider.url, redis_server.url)
    ids = queue_campaigns(database_url, {"limited": TENANT_RATE, "open": 0},
                          [("limited", 7_000, "main", "LIMITED"), ("open", 7_000, "main", "OPEN")])
    with ExitStack() as stack:
        daemons = start_fleet(stack, configs)
        for campaign_id in ids:
            wait_campaign(database_url, campaign_id, "completed", 60)
    within_limits(fake_provider, database_url, ids)
    # The account's backlog lasts until the first of the two campaigns is done (then only the
    # limited tenant's 1,000 msgs/s are left).
    both = min(max(acceptances(fake_provider, database_url, [i])) for i in ids)
    rate = accepted_rate([t for t in acceptances(fake_provider, database_url, ids) if t <= both])
    assert rate >= 0.9 * ACCOUNT_RATE, f"{rate:.0f} msgs/s"
    assert all(d.events("batch_sent") for d in daemons)  # a fleet: every daemon sent
    no_duplicates(fake_provider)


@pytest.mark.serial  # rates and a 20 s outage against the wall clock
def test_redis_away_for_20s_then_back_empty_keeps_the_limit(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider) -> None:
    """Redis stops for 20 s mid-campaign and comes back empty: the daemons fall back to a
    third of each limit (status says so), keep sending, rejoin (status says so), and no
    1-second window at the provider ever holds more than the limits."""
    server = PrivateRedis(base_dir=tmp_path).start()
    try:
        configs = fleet_configs(tmp_path, database_url, fake_provider.url, server.url)
        ids = queue_campaigns(database_url, {"limited": TENANT_RATE, "open": 0},
                              [("limited", 30_000, "main", "LIMITED"),
                               ("open", 30_000, "main", "OPEN")])
        with ExitStack() as stack:
            start_fleet(stack, configs)
            wait_until(lambda: len(acceptances(fake_provider, database_url, ids)) > 2_000, 20,
                       "the fleet to send")
            server.stop_process()
            stopped = time.time()
            wait_until(lambda: all(limits_mode(c) == "fallback" for c in configs), 10,
                       "every daemon to fall back")
            health = httpx.get(http_url(configs[0], "/healthz"), timeout=5)
            metrics = httpx.get(http_url(configs[0], "/metrics"), timeout=5).text
            time.sleep(max(0.0, stopped + 20 - time.time()))
            server.start_process()
            restarted = time.time()
            wait_until(lambda: all(limits_mode(c) == "shared" for c in configs), 10,
                       "every daemon to share again")
            wait_until(lambda: len(acceptances(fake_provider, database_url, ids)) > 0 and
                       max(acceptances(fake_provider, database_url, ids)) > restarted + 3, 20,
                       "sending after Redis came back")
    finally:
        server.stop()
    within_limits(fake_provider, database_url, ids)
    assert health.status_code == 503 and any(r.startswith("redis: unreachable")
                                             for r in health.json()["reasons"]), health.text
    assert "sendd_redis_shared 0.0" in metrics and "sendd_redis_fallbacks_total 1.0" in metrics
    times = acceptances(fake_provider, database_url, ids)
    during = sum(1 for t in times if stopped + 2 < t < restarted)
    # A third of the limit each, after a window without sending: about 2,000 x 17 s in all.
    assert during >= 0.6 * ACCOUNT_RATE * (restarted - stopped - 2), during
    no_duplicates(fake_provider)


@pytest.mark.serial  # rates against the wall clock
def test_a_daemon_that_cannot_reach_redis_keeps_to_its_share(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider,
        redis_server: PrivateRedis) -> None:
    """Daemon 0's Redis URL leads nowhere (Redis away for it alone): it sends at a third of
    each limit, says so (status, instance table), and the two that share leave it that third:
    the fleet stays within the limits. (Without the instance table's word, up to 4/3 of them.)"""
    redis.Redis.from_url(redis_server.url).flushall()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    configs = fleet_configs(tmp_path, database_url, fake_provider.url, "",
                            redis_urls=[nowhere, redis_server.url, redis_server.url])
    ids = queue_campaigns(database_url, {"limited": TENANT_RATE, "open": 0},
                          [("limited", 8_000, "main", "LIMITED"), ("open", 8_000, "main", "OPEN")])
    with ExitStack() as stack:
        daemons = start_fleet(stack, configs)
        wait_until(lambda: limits_mode(configs[0]) == "fallback", 20, "daemon 0 to fall back")
        status = sendd_json(configs[1], "ctl", "status", "--json")["redis"]
        for campaign_id in ids:
            wait_campaign(database_url, campaign_id, "completed", 60)
    assert status["mode"] == "shared" and status["daemons_at_their_share"] == 1, status
    within_limits(fake_provider, database_url, ids)
    assert all(d.events("batch_sent") for d in daemons)
    no_duplicates(fake_provider)


def test_a_suspension_seen_by_one_daemon_stops_the_others(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider) -> None:
    """Daemon 0's key is refused (401): it stores a pause of the account with the reason, so
    daemons 1 and 2 (whose key works) stop sending for it within about a second, and nothing
    fails; `sendd ctl resume --account` through any daemon lifts it."""
    configs = fleet_configs(tmp_path, database_url, fake_provider.url, "",
                            keys=["revoked-key", API_KEY, API_KEY])
    ids = queue_campaigns(database_url, {"open": 0}, [("open", 200_000, "main", "OPEN")])
    with ExitStack() as stack:
        daemons = start_fleet(stack, configs)
        wait_until(lambda: daemons[0].events("account_suspended"), 20, "the 401")
        wait_until(lambda: all(sendd_json(c, "ctl", "status", "--json")["accounts"]["main"]
                               ["paused"] for c in configs[1:]), 3, "the others to stop")
        accepted = fake_provider.stats()["accepted"]
        time.sleep(1.5)
        after = fake_provider.stats()["accepted"]
        reason = query(database_url, "SELECT reason FROM sendd.pause "
                                     "WHERE scope = 'account' AND target = 'main'")
        sendd_json(configs[1], "ctl", "resume", "--account", "main")
        wait_until(lambda: fake_provider.stats()["accepted"] > after, 10, "sending again")
    assert after - accepted <= 2 * 200, (accepted, after)  # only what was on the wire
    assert "401" in reason[0]["reason"] and reason[0]["reason"].startswith("suspended")
    failed = query(database_url, "SELECT count(*) AS n FROM sendd.message "
                                 "WHERE campaign_id = $1 AND status = 'failed'", ids[0])
    assert failed[0]["n"] == 0
    no_duplicates(fake_provider)


@pytest.mark.serial  # a pause against the wall clock
def test_a_provider_down_for_one_daemon_holds_the_others_while_it_probes(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider,
        redis_server: PrivateRedis) -> None:
    """Every request of daemon 0 is answered 503: its breaker opens, and daemons 1 and 2 hold
    the account's batches (status: waiting for the breaker) while it probes, instead of each
    finding the outage with requests of its own; its first answered probe lets them go."""
    configs, ids = stormed_fleet(tmp_path, database_url, fake_provider, redis_server, 100_000)
    with ExitStack() as stack:
        daemons = start_fleet(stack, configs)
        wait_until(lambda: len(acceptances(fake_provider, database_url, ids)) > 2_000, 20,
                   "the fleet to send")
        fake_provider.control(error_503_rate=1.0, error_key=STORM_KEY)
        wait_until(lambda: daemons[0].events("account_unavailable"), 10, "daemon 0's breaker")
        held_from = time.time() + 0.5  # what was on the wire lands
        waiting = wait_until(lambda: [w for w in sendd_json(configs[1], "ctl", "status",
                                                            "--json")["waiting"]
                                      if w["for"] == "breaker"], 5, "daemon 1 to wait")
        time.sleep(2.0)
        held_until = time.time()
        fake_provider.control(error_503_rate=0.0)
        wait_until(lambda: daemons[0].events("account_recovered"), 70, "the probe's answer")
        recovered = time.time()
        wait_until(lambda: sum(1 for t in acceptances(fake_provider, database_url, ids)
                               if t > recovered) > 2_000, 20, "the fleet to send again")
    others = [(e["sent_at"], e["size"]) for d in daemons[1:] for e in d.events("batch_sent")]
    during = sum(n for t, n in others if held_from <= t < held_until)
    assert waiting and during == 0, (waiting, during)
    no_duplicates(fake_provider)


@pytest.mark.serial  # rates against the wall clock
def test_a_429_storm_on_one_daemon_slows_all_three(
        tmp_path: Path, database_url: str, fake_provider: FakeProvider,
        redis_server: PrivateRedis) -> None:
    """Only daemon 0's requests get 429s (Retry-After 3 s): after each of its 429s, daemons 1
    and 2 send nothing either until the Retry-After has run out, since the backoff is the
    fleet's (alone, they would go on at full speed); once the storm is over the fleet's rate
    grows back. (How often daemon 0 gets a 429 depends on how soon it has its next batch
    ready, which on a loaded machine varies: so each 429's quiet time is checked, not an
    average rate.)"""
    fake_provider.control(retry_after=RETRY_AFTER)
    configs, ids = stormed_fleet(tmp_path, database_url, fake_provider, redis_server, 60_000)
    with ExitStack() as stack:
        daemons = start_fleet(stack, configs)
        wait_until(lambda: len(acceptances(fake_provider, database_url, ids)) > 4_000, 20,
                   "the fleet to send")
        calm_start = time.time()
        time.sleep(2)
        fake_provider.control(error_429_rate=1.0, error_key=STORM_KEY)
        storm_start = time.time()
        time.sleep(6)
        fake_provider.control(error_429_rate=0.0)
        time.sleep(RETRY_AFTER + 4)  # the last Retry-After, then a tenth back per success
        again = time.time()
        time.sleep(2)
        until = time.time()
        others = [(e["sent_at"], e["size"]) for d in daemons[1:] for e in d.events("batch_sent")]
        throttled = [e["sent_at"] + e["ms"] / 1000 for e in daemons[0].events("batch_not_sent")
                     if e["outcome"] == "throttled"]
    calm = sum(n for t, n in others if calm_start <= t < storm_start) / (storm_start - calm_start)
    recovered = sum(n for t, n in others if again <= t < until) / (until - again)
    # What was granted or on the wire when the 429 came lands within half a second.
    quiet = [(answer, [t for t, _ in others if answer + 0.5 <= t < answer + RETRY_AFTER - 0.5])
             for answer in throttled]
    assert calm > 0.5 * ACCOUNT_RATE, calm  # they were sending
    assert throttled and all(not sent for _, sent in quiet), quiet  # held with daemon 0
    assert recovered > 0.5 * calm, (calm, recovered)  # and the fleet's rate grew back
    no_duplicates(fake_provider)


def accepted_rate(times: list[float]) -> float:
    """Messages per second from the first acceptance to the last."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
