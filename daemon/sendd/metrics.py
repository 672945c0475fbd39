"""Prometheus metrics: one registry per daemon (never the global one).

Histograms are observed where the work happens (sender, writer). Everything that is state
already (outcome counts, channel fill, restart counts, breakers) is read from the daemon's
state at scrape time by `StateCollector`, not copied. The database gauges (backlog, leases)
are refreshed by their own actor (sendd.actors.gauges), never on the scrape path.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sendd.core.breaker import State
from sendd.state.accounts import Accounts
from sendd.state.health import Health

_SIZES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """This daemon's registry and the instruments the actors observe."""

    def __init__(self, health: Health, accounts: Accounts) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.provider_request = Histogram(
            "sendd_provider_request_seconds", "Provider send request duration",
            ["account"], buckets=_SECONDS, registry=r)
        self.batch_size = Histogram(
            "sendd_batch_size", "Messages per provider request", buckets=_SIZES, registry=r)
        self.rate_wait = Histogram(
            "sendd_rate_wait_seconds", "Time waited for the rate governor",
            buckets=(0, *_SECONDS), registry=r)
        self.flush_seconds = Histogram(
            "sendd_writer_flush_seconds", "Writer flush duration, retries included",
            buckets=_SECONDS, registry=r)
        self.flush_size = Histogram(
            "sendd_writer_flush_size", "Outcomes stored per writer flush",
            buckets=_SIZES, registry=r)
        self.queued = Gauge(
            "sendd_queued_messages",
            "Messages waiting or in flight: unfinished campaign messages and queued transactional "
            "ones (refreshed every 5 s)",
            registry=r)
        self.active_leases = Gauge(
            "sendd_active_leases", "Live sendd.instance leases (refreshed every 5 s)",
            registry=r)
        self.unstorable = Counter(
            "sendd_unstorable_outcomes",
            "Outcomes the database refused as given: stored without their texts (stripped), or "
            "left to settlement", ["handling"], registry=r)
        self.stale_marks = Gauge(
            "sendd_stale_marks",
            "This daemon's submission marks open far longer than a request and its settlement "
            "take (messages stuck in 'sending'; checked by the reaper)", registry=r)
        r.register(StateCollector(health, accounts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Reads the daemon's own counters, channels and breakers at scrape time."""

    def __init__(self, health: Health, accounts: Accounts) -> None:
        self.health = health
        self.accounts = accounts

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on what is running

    def collect(self) -> Iterator[Metric]:
        rt = self.health
        messages = CounterMetricFamily("sendd_messages", "Messages stored, by outcome",
                                       labels=["outcome", "account", "tenant"])
        for (outcome, account, tenant), count in sorted(rt.outcomes_by.items()):
            messages.add_metric([outcome, account, tenant], count)
        yield messages
        used = GaugeMetricFamily("sendd_channel_used", "Items buffered in a pipeline channel",
                                 labels=["channel"])
        capacity = GaugeMetricFamily("sendd_channel_capacity", "Pipeline channel capacity",
                                     labels=["channel"])
        for name, channel in sorted(rt.channels.items()):
            stats = channel.statistics()
            used.add_metric([name], stats.current_buffer_used)
            capacity.add_metric([name], stats.max_buffer_size)
        yield used
        yield capacity
        waiting = GaugeMetricFamily(
            "sendd_waiting_messages",
            "Claimed campaign messages waiting to be sent, by what the next of them waits for",
            labels=["account", "tenant", "reason"])
        for entry in rt.waiting():
            waiting.add_metric([entry["account"], entry["tenant"], entry["for"]],
                               entry["messages"])
        yield waiting
        yield _breaker_states(self.accounts)
        fleet = self.accounts.fleet
        if fleet is not None:
            yield GaugeMetricFamily(
                "sendd_redis_shared", "1 while the limits are shared through Redis, 0 while "
                "this daemon sends at its share of them (Redis away)",
                value=float(fleet.shared))
            yield CounterMetricFamily(
                "sendd_redis_fallbacks", "Times this daemon lost Redis and fell back to its "
                "share of the limits", value=fleet.fallbacks)
        unserved = GaugeMetricFamily(
            "sendd_unserved_messages", "Queued messages whose account no running daemon serves",
            labels=["account"])
        for account, waiting in sorted(rt.unserved.accounts.items()):
            unserved.add_metric([account], waiting)
        yield unserved
        restarts = CounterMetricFamily("sendd_actor_restarts", "Actor restarts by the supervisor",
                                       labels=["actor"])
        for actor in sorted(set(rt.actors) | set(rt.restarts)):
            restarts.add_metric([actor], rt.restarts.get(actor, 0))
        yield restarts


def _breaker_states(accounts: Accounts) -> GaugeMetricFamily:
    """1 for each account's current breaker state (closed: its provider answers)."""
    family = GaugeMetricFamily(
        "sendd_account_breaker", "Account circuit breaker state (1 = current)",
        labels=["account", "state"])
    for account in sorted(accounts.providers):
        current = accounts.breakers.get(account).state
        for state in State:
            family.add_metric([account, state.value], float(state is current))
    return family
