"""The figures and the report of a bench.py run: pure functions over plain dicts and lists.

Nothing here talks to a process or a database, so every figure can be unit-tested from made-up
data (tests/test_bench.py): percentiles, the sustained rate, database writes per message, the
channel fill parsed from /metrics, the Markdown summary and the chart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = (50, 90, 99)
# Final statuses; anything else after the run is lost or unfinished (`unknown` included: the
# fake provider answers lookups, so nothing should stay undecided).
FINAL = ("sent", "failed", "delivered", "undelivered")
ACCEPTED = ("sent", "delivered", "undelivered")
TUPLE_COUNTERS = ("n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd")
# The rows a statement writes; HOT updates are a subset of n_tup_upd, never added twice.
WRITE_COUNTERS = ("n_tup_ins", "n_tup_upd", "n_tup_del")
SMOOTHING = 5  # samples on each side (±2.5 s) in the chart's averaged throughput line
CHANNEL_GAUGES = ("sendd_channel_used", "sendd_channel_capacity")


# --- figures -----------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, Any]:
    """count, p50/p90/p99 and max, in ms, rounded to 0.1 ms (None when there are none)."""
    summary: dict[str, Any] = {"count": len(latencies_ms)}
    for q in PERCENTILES:
        value = percentile(latencies_ms, q)
        summary[f"p{q}_ms"] = None if value is None else round(value, 1)
    summary["max_ms"] = round(max(latencies_ms), 1) if latencies_ms else None
    return summary


def time_at(series: Sequence[Mapping[str, float]], done: float) -> float | None:
    """When the done count reached `done`, interpolated between the samples around it."""
    previous = None
    for point in series:
        if point["done"] >= done:
            if previous is None or point["done"] == previous["done"]:
                return point["t"]
            share = (done - previous["done"]) / (point["done"] - previous["done"])
            return previous["t"] + share * (point["t"] - previous["t"])
        previous = point
    return None


def sustained_rate(series: Sequence[Mapping[str, float]], total: int,
                   low: float = 0.1, high: float = 0.9) -> dict[str, Any]:
    """The rate between `low` and `high` shares of `total` done: start-up and tail excluded."""
    start, end = time_at(series, total * low), time_at(series, total * high)
    rate = None
    if start is not None and end is not None and end > start:
        rate = round(total * (high - low) / (end - start), 1)
    return {"msgs_per_s": rate, "from_s": _rounded(start, 3), "to_s": _rounded(end, 3)}


def with_end(series: Sequence[Mapping[str, Any]], end_t: float) -> list[dict[str, Any]]:
    """The samples with the exact moment the last message was done put in (the database
    stamps it): the samples come every 0.5 s, so the last one can be up to that late."""
    points = [dict(p) for p in series]
    if len(points) >= 2 and points[-2]["t"] < end_t < points[-1]["t"]:
        points.insert(-1, {**points[-1], "t": round(end_t, 3)})
    return points


def with_throughput(series: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the samples with `throughput`: messages done per second since the previous one."""
    result: list[dict[str, Any]] = []
    for point in series:
        rate = 0.0
        if result and point["t"] > result[-1]["t"]:
            rate = (point["done"] - result[-1]["done"]) / (point["t"] - result[-1]["t"])
        result.append({**point, "throughput": round(rate, 1)})
    return result


def moving_average(values: Sequence[float], half_width: int) -> list[float]:
    """Each value averaged with up to `half_width` neighbours on each side (the chart's smoothed
    rate: one 0.5 s sample holds only a few batches, so the raw rate jumps between multiples
    of them). Centred, so that the smoothed line does not lag behind the samples."""
    averaged = []
    for i in range(len(values)):
        window = values[max(0, i - half_width):i + half_width + 1]
        averaged.append(sum(window) / len(window))
    return averaged


def parse_channels(metrics_text: str) -> dict[str, list[float]]:
    """{channel: [used, capacity]} from a daemon's /metrics (sendd.metrics.StateCollector).

    Only the channel gauges' lines are parsed: with a thousand tenants /metrics has thousands
    of per-tenant series, and parsing them all twice a second took a third of a core from the
    daemons being measured."""
    channels: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(_channel_lines(metrics_text)):
            if family.name in CHANNEL_GAUGES:
                slot = CHANNEL_GAUGES.index(family.name)
                for sample in family.samples:
                    channel = sample.labels.get("channel", "")
                    channels.setdefault(channel, [0.0, 0.0])[slot] = sample.value
    except ValueError:  # a truncated scrape: keep what was read, the next sample will do
        pass
    return channels


def _channel_lines(metrics_text: str) -> str:
    """The samples, HELP and TYPE lines of the channel gauges alone."""
    names = tuple(f" {name} " for name in CHANNEL_GAUGES)
    kept = [line for line in metrics_text.splitlines()
            if line.startswith(CHANNEL_GAUGES)
            or line.startswith("#") and any(name in line for name in names)]
    return "\n".join(kept) + "\n" if kept else ""


def channel_fill(daemons: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per channel, used / capacity summed over the daemons (a fraction, 0..1)."""
    used: dict[str, float] = {}
    capacity: dict[str, float] = {}
    for daemon in daemons:
        for channel, (n, cap) in (daemon.get("channels") or {}).items():
            used[channel] = used.get(channel, 0.0) + n
            capacity[channel] = capacity.get(channel, 0.0) + cap
    return {ch: round(used[ch] / capacity[ch], 4) for ch in sorted(used) if capacity[ch] > 0}


def db_writes(before: Mapping[str, Any], after: Mapping[str, Any], messages: int, *,
              bench_rows: int = 0, bench_xacts: int = 0) -> dict[str, Any]:
    """Database work per message between two statistics snapshots.

    A snapshot is {"tables": {name: {n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd}},
    "xact_commit", "wal_records", "wal_bytes"}. `bench_rows` and `bench_xacts` are the
    harness's own inserts and transactions in between (transactional messages, sampling
    queries); they are subtracted so the per-message figures are the daemons' work.
    """
    tables = {}
    for name, counters in after["tables"].items():
        old = before["tables"].get(name, {})
        delta = {c: counters.get(c, 0) - old.get(c, 0) for c in TUPLE_COUNTERS}
        if any(delta.values()):
            tables[name] = delta
    rows = sum(t[c] for t in tables.values() for c in WRITE_COUNTERS) - bench_rows
    xacts = after["xact_commit"] - before["xact_commit"] - bench_xacts
    wal_records = _delta(before, after, "wal_records")
    wal_bytes = _delta(before, after, "wal_bytes")
    return {
        "tables": tables, "messages": messages, "rows_written": rows, "transactions": xacts,
        "wal_records": wal_records, "wal_bytes": wal_bytes,
        "bench_rows_subtracted": bench_rows, "bench_xacts_subtracted": bench_xacts,
        "rows_per_message": _per(rows, messages, 3),
        "transactions_per_message": _per(xacts, messages, 4),
        "wal_records_per_message": _per(wal_records, messages, 2),
        "wal_bytes_per_message": _per(wal_bytes, messages, 1),
    }


def summarize_statuses(rows: Iterable[Mapping[str, Any]],
                       rejected_expected: int) -> dict[str, Any]:
    """Outcome figures from rows of (transactional, reject_share, status, count, segments):
    the message table grouped once, after the run."""
    statuses: dict[str, int] = {}
    transactional: dict[str, int] = {}
    rejected_failed = accepted_segments = 0
    for row in rows:
        status, count = row["status"], row["count"]
        statuses[status] = statuses.get(status, 0) + count
        if row["transactional"]:
            transactional[status] = transactional.get(status, 0) + count
        if row["reject_share"] and status == "failed":
            rejected_failed += count
        if status in ACCEPTED:
            accepted_segments += row["segments"]
    return {
        "statuses": statuses, "transactional_statuses": transactional,
        "lost": sum(n for s, n in statuses.items() if s not in FINAL),
        "unknown": statuses.get("unknown", 0),
        "db_sent": sum(statuses.get(s, 0) for s in ACCEPTED),
        "accepted_segments": accepted_segments,
        "rejected_expected": rejected_expected, "rejected_failed": rejected_failed,
    }


def problems_of(outcome: Mapping[str, Any], exit_codes: Sequence[int | None]) -> list[str]:
    """What broke a guarantee (or the run), one phrase each; empty when all is well."""
    problems = []
    if outcome["duplicates"]:
        problems.append(f"{outcome['duplicates']} references sent twice to the provider")
    if outcome["lost"]:
        unfinished = ", ".join(f"{s}: {n}" for s, n in sorted(outcome["statuses"].items())
                               if s not in FINAL)
        problems.append(f"{outcome['lost']} messages lost or unfinished ({unfinished})")
    if outcome["provider_accepted"] != outcome["db_sent"]:
        problems.append(f"the provider accepted {outcome['provider_accepted']} messages, the "
                        f"database has {outcome['db_sent']} sent")
    if outcome["ledger_debited"] != outcome["accepted_segments"]:
        problems.append(f"the ledger debited {outcome['ledger_debited']} credits for "
                        f"{outcome['accepted_segments']} accepted segments")
    for number, code in enumerate(exit_codes, 1):
        if code != 0:
            problems.append(f"daemon {number} exited {code} after SIGTERM")
    return problems


# Ceilings before and after a run that differ by more than this: the machine's speed changed
# while the daemons ran, and a ratio to their mean is uncertain.
CEILING_DRIFT = 0.15


def bracketed_ceiling(before: Mapping[str, Any] | None,
                      after: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ceilings measured before and after the run, and the figure to rate the run by:
    their mean (either alone when the other was not measured or failed)."""
    if before is None and after is None:
        return None
    measured = [c for c in (before, after) if c and "error" not in c]
    if not measured:
        return {"error": (after or before or {}).get("error", "not measured"),
                "before": before, "after": after}
    rates = [c["msgs_per_s"] for c in measured]
    mean = sum(rates) / len(rates)
    return {"msgs_per_s": round(mean, 1), "rows": measured[0]["rows"],
            "claim_size": measured[0]["claim_size"], "before": before, "after": after,
            "drift": round((max(rates) - min(rates)) / mean, 3)}


# --- the mixed-tenant runs (--slow-tenant, --small-campaigns) ------------------------------------

def finish_times(finished: Sequence[float | None], origin: float, *,
                 before: float | None = None) -> dict[str, Any]:
    """When campaigns finished, in seconds from `origin` (Unix times; None: not finished): how
    many finished, the first, median, 90th percentile and last; with `before` (seconds from
    `origin`), also how many finished by then."""
    done = sorted(at - origin for at in finished if at is not None)
    times = {"finished": len(done), "first_s": _rounded(done[0] if done else None, 3)}
    for q in (50, 90):
        times[f"p{q}_s"] = _rounded(percentile(done, q), 3)
    times["last_s"] = _rounded(done[-1] if done and len(done) == len(finished) else None, 3)
    if before is not None:
        times["by_main_end"] = sum(1 for t in done if t <= before)
    return times


def per_campaign(ids: Sequence[int], tenants: Mapping[int, str],
                 finished: Mapping[int, float | None], origin: float) -> list[dict[str, Any]]:
    """Each campaign's tenant and finish, in seconds from `origin` (None: not finished)."""
    rows = []
    for i in ids:
        at = finished.get(i)
        rows.append({"campaign": i, "tenant": tenants.get(i),
                     "finished_s": None if at is None else round(at - origin, 3)})
    return rows


def slow_tenant_figures(rate: int, daemons: int, progress: Mapping[str, int] | None,
                        peak: int | None, main_s: float | None,
                        finished_s: float | None, *, shared: bool = False) -> dict[str, Any]:
    """The slow tenant beside the main campaigns. `progress`: its messages, sent, and done
    before, while and after the main campaigns ran (bench.SLOW_PROGRESS); `peak`: the most it
    had accepted in any 1 s at the provider. Without Redis limits are per daemon, so
    `daemons` x `rate` may arrive in one second; `shared` (through Redis): `rate` for the
    fleet."""
    counts = dict(progress or {})
    during = counts.get("done_during_main")
    return {"rate": rate, "allowed_peak_per_1s": rate if shared else rate * daemons,
            "peak_per_1s": peak,
            "messages": counts.get("messages"), "sent": counts.get("sent"),
            "done_before_main": counts.get("done_before_main"), "done_during_main": during,
            "rate_during_main": round(during / main_s, 1) if during is not None and main_s
            else None,
            "unsent_at_main_end": counts.get("unsent_at_main_end"), "finished_s": finished_s}


def mix_problems(mix: Mapping[str, Any] | None) -> list[str]:
    """What the mix broke: the slow tenant over its rate at the provider."""
    slow = (mix or {}).get("slow")
    if not slow:
        return []
    peak, allowed = slow["peak_per_1s"], slow["allowed_peak_per_1s"]
    if peak is not None and peak > allowed:
        return [f"the slow tenant had {peak:,} messages accepted in one second at the provider, "
                f"above its limit of {allowed:,}"]
    if peak is None and slow["sent"]:
        return ["the provider reported no per-second peak for the slow tenant's sender"]
    return []


# --- rate limits: the provider's peaks against the limits (--account-rate, --slow-tenant) -------

def limits_of(provider: Mapping[str, Any], *, daemons: int, redis: bool,
              keys: Mapping[str, Mapping[str, Any]], senders: Mapping[str, Mapping[str, Any]],
              redis_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provider's peak messages and requests in any 1 s per API key and its peak messages
    per sender, each beside its limit. `keys`: {api key: {"account", "msgs_per_s",
    "reqs_per_s"}}, `senders`: {sender: {"owner", "msgs_per_s"}} (None: no limit). With
    `redis` the daemons share each limit, which is then the fleet's; without it each daemon
    keeps its own copy, so up to `daemons` x the limit may arrive in one second."""
    msgs = provider.get("max_msgs_per_1s") or {}
    reqs = provider.get("max_reqs_per_1s") or {}
    by_sender = provider.get("max_msgs_per_1s_by_sender") or {}
    rows = []
    for key in sorted(set(keys) | set(msgs) | set(reqs)):
        info = keys.get(key, {})
        for measure, peaks, limit in (("messages", msgs, info.get("msgs_per_s")),
                                      ("requests", reqs, info.get("reqs_per_s"))):
            rows.append(_limit_row("api_key", key, f"account {info.get('account', '?')}",
                                   measure, peaks.get(key), limit, daemons, redis))
    for sender in sorted(set(senders) | set(by_sender)):
        info = senders.get(sender, {})
        if sender not in by_sender and not info.get("msgs_per_s"):
            continue  # neither seen nor limited: a sender the run did not have
        rows.append(_limit_row("sender", sender, info.get("owner") or "?", "messages",
                               by_sender.get(sender), info.get("msgs_per_s"), daemons, redis))
    return {"redis": redis, "daemons": daemons,
            "scope": "fleet" if redis or daemons == 1 else "per daemon",
            "rows": rows, "redis_state": dict(redis_state) if redis_state is not None else None}


def _limit_row(of: str, name: str, owner: str, measure: str, peak: int | None,
               limit: int | None, daemons: int, redis: bool) -> dict[str, Any]:
    allowed = None if not limit else limit if redis else limit * daemons
    return {"of": of, "name": name, "owner": owner, "measure": measure, "peak_per_1s": peak,
            "limit_per_s": limit or None, "allowed_peak_per_1s": allowed,
            "within_limit": None if peak is None or not limit else peak <= limit,
            "within_allowed": None if peak is None or allowed is None else peak <= allowed}


def limit_problems(limits: Mapping[str, Any] | None) -> list[str]:
    """An API key over what its limit allows (the fleet's with Redis, each daemon's copy
    without); the daemons never sharing through Redis when they were given it. (A tenant over
    its rate is mix_problems'.)"""
    if not limits:
        return []
    problems = []
    for row in limits["rows"]:
        if row["of"] == "api_key" and row["within_allowed"] is False:
            problems.append(f"API key {row['name']} had {row['peak_per_1s']:,} {row['measure']} "
                            f"in one second at the provider, above "
                            f"{_allowed_text(row, limits)}")
    state = limits.get("redis_state")
    if limits.get("redis") and state is not None and not state.get("shared_samples"):
        problems.append("the daemons were given Redis but never reported their limits shared "
                        "through it (sendd_redis_shared)")
    return problems


def _allowed_text(row: Mapping[str, Any], limits: Mapping[str, Any]) -> str:
    if limits["redis"] or limits["daemons"] == 1:
        return f"its limit of {row['limit_per_s']:,}"
    return (f"{limits['daemons']} x its limit of {row['limit_per_s']:,} "
            f"({row['allowed_peak_per_1s']:,})")


def parse_redis(metrics_text: str) -> dict[str, float | None]:
    """A daemon's Redis state from /metrics: sendd_redis_shared (1: its limits are shared
    through Redis, 0: Redis away) and sendd_redis_fallbacks; None when not exported."""
    state: dict[str, float | None] = {"shared": None, "fallbacks": None}
    for line in metrics_text.splitlines():
        if not line.startswith("sendd_redis_"):
            continue
        name, _, value = line.partition(" ")
        field = {"sendd_redis_shared": "shared", "sendd_redis_fallbacks": "fallbacks",
                 "sendd_redis_fallbacks_total": "fallbacks"}.get(name)
        if field is not None:
            try:
                state[field] = float(value.split()[0])
            except (ValueError, IndexError):
                pass
    return state


def redis_state(series: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over the samples: in how many every daemon reported its limits shared through Redis,
    and each daemon's last count of fallbacks (Redis lost)."""
    shared = 0
    fallbacks: list[float | None] = []
    for point in series:
        states = [d.get("redis") or {} for d in point.get("daemons", [])]
        if states and all(state.get("shared") == 1 for state in states):
            shared += 1
        fallbacks += [None] * (len(states) - len(fallbacks))
        for i, state in enumerate(states):
            if state.get("fallbacks") is not None:
                fallbacks[i] = state["fallbacks"]
    return {"samples": len(series), "shared_samples": shared,
            "fallbacks": [None if f is None else int(f) for f in fallbacks]}


# --- --compare-single: one daemon's run beside the fleet's ------------------------------------

def compare(single: Mapping[str, Any], fleet: Mapping[str, Any],
            single_dir: str) -> dict[str, Any]:
    """The two runs' headline figures side by side, and the fleet's sustained throughput over
    the one daemon's."""
    runs = [_headline(single), _headline(fleet)]
    return {"single_dir": single_dir, "runs": runs,
            "fleet_over_single": ratio(runs[1]["sustained_msgs_per_s"],
                                       runs[0]["sustained_msgs_per_s"])}


def _headline(figures: Mapping[str, Any]) -> dict[str, Any]:
    run, mix = figures["run"], figures.get("mix") or {}
    ceiling = figures.get("ceiling") or {}
    limits = figures.get("limits") or {}
    return {"daemons": figures["scenario"]["daemons"],
            "redis": figures["scenario"].get("redis", False),
            "sustained_msgs_per_s": run["sustained"]["msgs_per_s"],
            "msgs_per_s": run["msgs_per_s"], "wall_s": run["wall_s"],
            "main_msgs_per_s": (mix.get("main") or {}).get("msgs_per_s"),
            "ceiling_msgs_per_s": ceiling.get("msgs_per_s"), "ratio": figures.get("ratio"),
            "peaks": [{k: row[k] for k in ("of", "name", "measure", "peak_per_1s",
                                           "limit_per_s", "allowed_peak_per_1s")}
                      for row in limits.get("rows", [])],
            "ok": figures["ok"]}


def ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return round(part / whole, 3)


def _delta(before: Mapping[str, Any], after: Mapping[str, Any], key: str) -> int | None:
    if before[key] is None or after[key] is None:  # not collected (no pg_stat_wal)
        return None
    return after[key] - before[key]


def _per(amount: float | None, messages: int, digits: int) -> float | None:
    return round(amount / messages, digits) if messages and amount is not None else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- the Markdown summary ------------------------------------------------------------------------

def markdown(report: Mapping[str, Any]) -> str:
    """The short human summary of report.json: the scenario, one table of figures, the verdict."""
    lines = [f"# sendd benchmark, {report['date']}", "", _scenario_line(report), "",
             "| figure | value |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in _figure_rows(report)]
    lines += [*_compare_rows(report.get("compare")), *_mix_rows(report.get("mix"), report),
              *_limit_rows(report.get("limits")), "", *_table_rows(report["db_writes"]),
              *_statement_rows(report.get("statements")),
              "", _machine_line(report["machine"]),
              "", f"Command: `{report['command']}`", "", _verdict(report)]
    return "\n".join(lines) + "\n"


def _scenario_line(report: Mapping[str, Any]) -> str:
    s = report["scenario"]
    mode = (f"single-message requests, {s['batch_size']} at a time under one mark" if s["single"]
            else f"batches of {s['batch_size']}")
    return (f"Scenario: {s['messages']:,} messages in {s['campaigns']} campaign(s) of "
            f"{s['tenants']} tenant(s); {s['daemons']} daemon(s), {mode}, "
            f"{s['senders']} senders, claim chunk {s['claim_chunk']}; fake provider "
            f"{s['latency_ms']:g} ms latency (+0..{s['jitter_ms']:g} ms jitter), "
            f"429 {_pct(s['error_429'])}, 503 {_pct(s['error_503'])}, "
            f"rejected {_pct(s['reject'])}; transactional {s['transactional']:g}/s; "
            f"{_mix_scenario(s)}{_limits_scenario(s)}durable PostgreSQL; seed {s['seed']}.")


def _limits_scenario(s: Mapping[str, Any]) -> str:
    parts = []
    if s.get("account_rate"):
        parts.append(f"the account limited to {s['account_rate']:,} msgs/s")
    if s.get("redis"):
        parts.append("limits shared through Redis")
    return "".join(f"{part}; " for part in parts)


def _mix_scenario(s: Mapping[str, Any]) -> str:
    parts = []
    if s.get("small_campaigns"):
        parts.append(f"{s['small_campaigns']:,} small campaigns of {s['small_size']:,} "
                     "messages beside them, one tenant each")
    if s.get("slow_tenant") is not None:
        parts.append(f"a slow tenant limited to {s['slow_tenant']:,} msgs/s with "
                     f"{s['slow_messages']:,} messages, sending before them")
    return "".join(f"{part}; " for part in parts)


def _figure_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    run, out, writes = report["run"], report["outcome"], report["db_writes"]
    ceiling = report.get("ceiling")
    tx = report["transactional"]
    load = report["load"]
    return [
        ("sustained throughput (10% to 90% done)", _rate(run["sustained"]["msgs_per_s"])),
        ("overall throughput", f"{_rate(run['msgs_per_s'])} ({run['messages']:,} messages "
                               f"in {run['wall_s']:.2f} s)"),
        (f"wall time, {_wall_from(run)} to last message done", f"{run['wall_s']:.2f} s"),
        ("bare-PostgreSQL ceiling", _ceiling_text(ceiling)),
        ("sustained / ceiling", _fmt(report.get("ratio"), "{:.2f}")),
        ("transactional latency p50 / p90 / p99 / max", _latency_text(tx)),
        *([("... of those, beside the slow tenant's backlog alone",
            _latency_text(tx["beside_slow_alone"]))] if tx.get("beside_slow_alone") else []),
        ("peak RSS per daemon", ", ".join(f"{d['peak_rss_kb'] / 1024:.0f} MiB"
                                          for d in report["daemons"]) or "n/a"),
        ("rows written per message", _fmt(writes["rows_per_message"], "{:.2f}")),
        ("transactions per message", _fmt(writes["transactions_per_message"], "{:.4f}")),
        ("WAL per message", _wal_text(writes)),
        ("duplicates (provider)", f"{out['duplicates']:,}"),
        ("lost or unfinished", f"{out['lost']:,}"),
        ("provider accepted / database sent", f"{out['provider_accepted']:,} / "
                                              f"{out['db_sent']:,}"),
        ("rejected: expected / failed in the database", f"{out['rejected_expected']:,} / "
                                                        f"{out['rejected_failed']:,}"),
        ("CPU during the run (per message)", _cpu_text(report.get("cpu"))),
        ("load (not counted)", f"{load['messages']:,} rows in {load['insert_s']:.1f} s, "
                               f"VACUUM ANALYZE {load['vacuum_analyze_s']:.1f} s"),
    ]


def _wall_from(run: Mapping[str, Any]) -> str:
    if run.get("from_s"):
        return f"the main campaign's start ({run['from_s']:.1f} s after the daemons')"
    return "daemon start"


def _mix_rows(mix: Mapping[str, Any] | None, report: Mapping[str, Any]) -> list[str]:
    """The mixed-tenant section: the main campaigns, the slow tenant, the small campaigns."""
    if not mix:
        return []
    main = mix["main"]
    rows = [("main campaign(s)", f"{main['messages']:,} messages in {main['campaigns']:,} "
                                 f"campaign(s), done at {_seconds(main['finished_s'])} "
                                 f"({_rate(main['msgs_per_s'])})")]
    slow = mix.get("slow")
    if slow:
        rows += [
            (f"slow tenant, limited to {slow['rate']:,} msgs/s",
             f"{_count(slow['messages'])} messages, {_count(slow['sent'])} sent; peak "
             f"{_count(slow['peak_per_1s'])} in any 1 s at the provider "
             f"({_slow_limit_text(slow)})"),
            ("slow tenant beside the main campaign",
             f"{_count(slow['done_before_main'])} done before it started, "
             f"{_count(slow['done_during_main'])} while it ran "
             f"({_fmt(slow['rate_during_main'], '{:,.1f}')} msgs/s), "
             f"**{_count(slow['unsent_at_main_end'])} still unsent when it finished**; "
             f"all done at {_seconds(slow['finished_s'])}"),
        ]
    small = mix.get("small")
    if small:
        rows.append((
            f"small campaigns ({small['campaigns']:,} × {small['size']:,} messages, "
            f"{small['tenants']:,} tenants)",
            f"**last done at {_seconds(small['last_s'])}** against "
            f"{_seconds(main['finished_s'])} for the main campaign; first "
            f"{_seconds(small['first_s'])}, median {_seconds(small['p50_s'])}, p90 "
            f"{_seconds(small['p90_s'])}; {_count(small.get('by_main_end'))} of "
            f"{small['campaigns']:,} "
            "done before the main one"))
        run = report["run"]
        rows.append(("all campaign messages (main and small)",
                     f"{run['messages']:,}: {_rate(run['sustained']['msgs_per_s'])} sustained, "
                     f"{_fmt(report.get('ratio'), '{:.2f}')} of the ceiling; "
                     f"{_rate(run['msgs_per_s'])} overall"))
    return ["", f"Mixed tenants (times from {mix['from']}; every campaign's in report.json, "
                "`mix`):", "", "| figure | value |", "|---|---|",
            *(f"| {label} | {value} |" for label, value in rows)]


def _limit_rows(limits: Mapping[str, Any] | None) -> list[str]:
    """The peaks in any 1 s at the provider against the limits, and Redis's part."""
    if not limits:
        return []
    daemons = limits["daemons"]
    if limits["redis"]:
        how = (f"limits shared through Redis by the {daemons} daemons: each limit is the "
               "fleet's" if daemons > 1 else "the daemon's limits kept in Redis")
    elif daemons > 1:
        how = (f"no Redis: each of the {daemons} daemons enforces its own copy of each limit, "
               f"so the fleet may send up to {daemons} × it")
    else:
        how = "one daemon, no Redis"
    rows = ["", f"Rate limits: the provider's peak in any 1 s ({how}):", "",
            "| peak in any 1 s at the provider | limit | peak | within the limit |",
            "|---|---|---|---|"]
    for row in limits["rows"]:
        what = ("API key" if row["of"] == "api_key" else "sender")
        rows.append(f"| {what} `{row['name']}` ({row['owner']}), {row['measure']} | "
                    f"{_limit_text(row, limits)} | {_count(row['peak_per_1s'])} | "
                    f"{_within_text(row, limits)} |")
    rows += ["", _redis_text(limits)]
    return rows


def _limit_text(row: Mapping[str, Any], limits: Mapping[str, Any]) -> str:
    limit = row["limit_per_s"]
    if not limit:
        return "none of its own (the account's)" if row["of"] == "sender" else "none"
    unit = f"{limit:,} {'msgs' if row['measure'] == 'messages' else 'reqs'}/s"
    if limits["redis"]:
        return f"{unit} for the fleet" if limits["daemons"] > 1 else unit
    if limits["daemons"] > 1:
        return (f"{unit} per daemon (up to {row['allowed_peak_per_1s']:,} for "
                f"{limits['daemons']} daemons)")
    return unit


def _within_text(row: Mapping[str, Any], limits: Mapping[str, Any]) -> str:
    if row["within_limit"] is None:
        return "n/a"
    if row["within_limit"]:
        return "**yes**"
    times = f"{row['peak_per_1s'] / row['limit_per_s']:.2f} × the limit"
    if row["within_allowed"] and not limits["redis"] and limits["daemons"] > 1:
        return f"**no**: {times} (within {limits['daemons']} × it: one copy per daemon)"
    return f"**no**: {times}"


def _redis_text(limits: Mapping[str, Any]) -> str:
    if not limits["redis"]:
        return "Redis: not used (no `[redis] url`)."
    state = limits.get("redis_state") or {}
    samples, shared = state.get("samples"), state.get("shared_samples")
    fallbacks = state.get("fallbacks") or []
    share = (f"every daemon reported its limits shared (sendd_redis_shared 1) in {shared:,} of "
             f"{samples:,} samples" if samples else "no samples of the daemons' Redis state")
    lost = ", ".join(_count(f) for f in fallbacks) or "n/a"
    return (f"Redis: used (a private redis-server for the run); {share}; fallbacks per "
            f"daemon {lost}.")


def _compare_rows(compare: Mapping[str, Any] | None) -> list[str]:
    """--compare-single: the one-daemon run beside the fleet's."""
    if not compare:
        return []
    single, fleet = compare["runs"]

    def label(run: Mapping[str, Any]) -> str:
        return f"{run['daemons']} daemon{'s' if run['daemons'] > 1 else ''}"

    over = compare.get("fleet_over_single")
    rows = [("sustained throughput (10% to 90% done)", _rate(single["sustained_msgs_per_s"]),
             _rate(fleet["sustained_msgs_per_s"])
             + (f" (**{over:.2f} ×** one daemon's)" if over is not None else "")),
            ("overall throughput", _rate(single["msgs_per_s"]), _rate(fleet["msgs_per_s"])),
            ("bare-PostgreSQL ceiling / sustained ratio",
             f"{_rate(single['ceiling_msgs_per_s'])} / {_fmt(single['ratio'], '{:.2f}')}",
             f"{_rate(fleet['ceiling_msgs_per_s'])} / {_fmt(fleet['ratio'], '{:.2f}')}")]
    if single.get("main_msgs_per_s") is not None or fleet.get("main_msgs_per_s") is not None:
        rows.append(("main campaign(s), start to done", _rate(single["main_msgs_per_s"]),
                     _rate(fleet["main_msgs_per_s"])))
    peaks = {(p["of"], p["name"], p["measure"]): p for p in single["peaks"]}
    for peak in fleet["peaks"]:
        one = peaks.get((peak["of"], peak["name"], peak["measure"])) or {}
        limit = peak["limit_per_s"]
        scope = "" if not limit else (
            f" (limit {limit:,}" + (" for the fleet)" if fleet["redis"] else " per daemon)"))
        what = "API key" if peak["of"] == "api_key" else "sender"
        rows.append((f"peak {peak['measure']} in any 1 s, {what} `{peak['name']}`{scope}",
                     _count(one.get("peak_per_1s")), _count(peak["peak_per_1s"])))
    rows.append(("Redis", "yes" if single["redis"] else "no", "yes" if fleet["redis"] else "no"))
    rows.append(("result", "OK" if single["ok"] else "FAILED", "OK" if fleet["ok"] else "FAILED"))
    return ["", f"One daemon against the fleet (--compare-single: the same scenario with one "
                f"daemon, run just before; its report in {compare['single_dir']}/):", "",
            f"| figure | {label(single)} | {label(fleet)} |", "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def _slow_limit_text(slow: Mapping[str, Any]) -> str:
    """The slow tenant's limit as the fleet had it: shared through Redis, or one copy per
    daemon (bench.py sets "shared")."""
    rate, allowed = slow["rate"], slow["allowed_peak_per_1s"]
    if slow.get("shared"):
        return f"limit {rate:,} for the fleet, through Redis"
    if allowed != rate:
        return f"limit {rate:,} per daemon: {allowed:,} for the fleet without Redis"
    return f"limit {allowed:,}"


def _seconds(value: float | None) -> str:
    return _fmt(value, "{:.2f} s")


def _count(value: int | None) -> str:
    return _fmt(value, "{:,}")


def cpu_split(seconds: Mapping[str, float], messages: int) -> dict[str, Any]:
    """The CPU meter's seconds per process group, with each group's µs per message."""
    groups = {name.removesuffix("_s"): s for name, s in seconds.items() if name.endswith("_s")}
    return {"seconds": groups, "machine_busy": seconds.get("machine_busy"),
            "us_per_message": {name: round(s * 1e6 / messages, 1) if messages else None
                               for name, s in groups.items()}}


def statement_costs(rows: Sequence[Mapping[str, Any]] | None,
                    messages: int) -> list[dict[str, Any]] | None:
    """pg_stat_statements rows with the query on one line and the µs per message."""
    if rows is None:
        return None
    return [{"query": " ".join(r["query"].split()), "calls": r["calls"],
             "total_ms": round(r["total_ms"], 1), "rows": r["rows"],
             "mean_ms": round(r["total_ms"] / r["calls"], 3) if r["calls"] else None,
             "us_per_message": round(r["total_ms"] * 1000 / messages, 1) if messages else None}
            for r in rows]


def _statement_rows(statements: Sequence[Mapping[str, Any]] | None) -> list[str]:
    if not statements:
        return []
    rows = ["", "PostgreSQL time by statement (statements inside trigger functions are also "
            "counted in the statement that fired them):", "",
            "| statement | calls | total ms | mean ms | µs per message |", "|---|---|---|---|---|"]
    for s in statements:
        text = s["query"] if len(s["query"]) <= 90 else s["query"][:87] + "..."
        rows.append(f"| `{text.replace('|', '¦')}` | {s['calls']:,} | {s['total_ms']:,.0f} | "
                    f"{_fmt(s['mean_ms'], '{:.2f}')} | {_fmt(s['us_per_message'], '{:.1f}')} |")
    return rows


def _cpu_text(cpu: Mapping[str, Any] | None) -> str:
    if not cpu:
        return "n/a"
    parts = [f"{name.replace('_', ' ')} {s:.1f} s ({_fmt(cpu['us_per_message'][name], '{:.0f}')}"
             " µs)" for name, s in cpu["seconds"].items()]
    busy = cpu.get("machine_busy")
    return ", ".join(parts) + (f"; machine {busy:.0%} busy" if busy is not None else "")


def _table_rows(writes: Mapping[str, Any]) -> list[str]:
    rows = ["| table | inserted | updated (HOT) | deleted |", "|---|---|---|---|"]
    for name, d in sorted(writes["tables"].items()):
        rows.append(f"| {name} | {d['n_tup_ins']:,} | {d['n_tup_upd']:,} "
                    f"({d['n_tup_hot_upd']:,}) | {d['n_tup_del']:,} |")
    return rows


def _machine_line(machine: Mapping[str, Any]) -> str:
    return (f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
            f"{machine['memory_gib']:.1f} GiB, Linux {machine['kernel']}, "
            f"Python {machine['python']}, PostgreSQL {machine['postgresql']}; load average "
            f"{machine['loadavg_start']} at the start, {machine['loadavg_end']} at the end.")


def _verdict(report: Mapping[str, Any]) -> str:
    if report["ok"]:
        return "Result: **OK** (every message done, 0 duplicates, 0 lost)."
    return "Result: **FAILED**: " + "; ".join(report["problems"]) + "."


def _ceiling_text(ceiling: Mapping[str, Any] | None) -> str:
    if not ceiling:
        return "not measured"
    if "error" in ceiling:
        return f"failed: {ceiling['error']}"
    both = [(when, ceiling[when]) for when in ("before", "after")]
    parts = [f"{when} {_one_ceiling(c)}" for when, c in both if c]
    measured = sum(1 for _, c in both if c and "error" not in c)
    source = "the mean of" if measured == 2 else "from"
    text = (f"{_rate(ceiling['msgs_per_s'])}, {source} {' and '.join(parts)}; "
            f"claims of {ceiling['claim_size']}, {ceiling['rows']:,} rows")
    if ceiling["drift"] > CEILING_DRIFT:
        text += (f" (they differ by {ceiling['drift']:.0%}: the machine's speed changed during "
                 "the run, so the ratio is uncertain)")
    return text


def _one_ceiling(ceiling: Mapping[str, Any]) -> str:
    if "error" in ceiling:
        return f"failed ({ceiling['error']})"
    return f"{_rate(ceiling['msgs_per_s'])} ({ceiling['connections']} connection(s))"


def _wal_text(writes: Mapping[str, Any]) -> str:
    if writes["wal_bytes_per_message"] is None:
        return "n/a (no pg_stat_wal before PostgreSQL 14)"
    return (f"{writes['wal_bytes_per_message']:,.0f} bytes "
            f"({writes['wal_records_per_message']:.1f} records)")


def _latency_text(tx: Mapping[str, Any]) -> str:
    if not tx.get("count"):
        return "none sent"
    values = " / ".join(_fmt(tx[k], "{:,.0f}") for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
    return f"{values} ms ({tx['count']:,} messages, enqueue to accepted by the provider)"


def _rate(value: float | None) -> str:
    return _fmt(value, "{:,.0f} msgs/s")


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _pct(rate: float) -> str:
    return f"{rate * 100:g}%"


# --- files -------------------------------------------------------------------------------------

def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


GROUP_COLOURS = {"main": "tab:blue", "small": "tab:green", "slow": "tab:red"}


def write_chart(series: Sequence[Mapping[str, Any]], path: Path, title: str = "",
                since: str = "the daemons started") -> None:
    """Three stacked panels over time: throughput, backlog (of each group of campaigns too, in
    a mixed run), channel fill (summed over daemons)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    t = [p["t"] for p in series]
    fig, (rate_ax, backlog_ax, fill_ax) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    try:
        _plot_rate(rate_ax, t, [p["throughput"] for p in series])
        backlog_ax.plot(t, [p["backlog"] for p in series], color="tab:orange",
                        label="all but the slow tenant")
        for group in sorted({g for p in series for g in p.get("group_backlog", {})}):
            backlog_ax.plot(t, [p.get("group_backlog", {}).get(group) for p in series],
                            linewidth=0.8, label=group, color=GROUP_COLOURS.get(group))
        if len(backlog_ax.lines) > 1:
            backlog_ax.legend(loc="upper right", fontsize="small")
        backlog_ax.set_ylabel("backlog")
        for channel in sorted({ch for p in series for ch in p.get("fill", {})}):
            fill_ax.plot(t, [p.get("fill", {}).get(channel) for p in series], label=channel)
        fill_ax.set_ylabel("channel fill")
        fill_ax.set_ylim(0, 1.05)
        if fill_ax.lines:
            fill_ax.legend(loc="upper right", fontsize="small")
        fill_ax.set_xlabel(f"seconds since {since}")
        for ax in (rate_ax, backlog_ax, fill_ax):
            ax.grid(True, alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _plot_rate(ax: Any, t: Sequence[float], rates: Sequence[float]) -> None:
    """The rate per sample, and for runs long enough to need it a smoothed line over it."""
    half_width = min(SMOOTHING, len(rates) // 20)  # short runs: the samples speak for themselves
    if half_width < 1:
        ax.plot(t, rates, color="tab:blue")
    else:
        ax.plot(t, rates, color="tab:blue", alpha=0.3, linewidth=0.8, label="per sample")
        ax.plot(t, moving_average(rates, half_width), color="tab:blue",
                label=f"average of {2 * half_width + 1} samples")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_ylabel("messages/s")
