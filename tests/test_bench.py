"""The load harness (load/bench.py): one small run end to end, and its pure figures.

The end-to-end run starts its own PostgreSQL, fake provider and daemon, exactly as an operator
would run it, and checks the report it writes; the unit tests check the arithmetic behind the
figures on made-up data.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from harness import env
from sendd.db import migrate

LOAD = Path(__file__).resolve().parents[1] / "load"
sys.path.insert(0, str(LOAD))

import bench  # noqa: E402 -- load/ is not a package
import cpu  # noqa: E402
import dataset  # noqa: E402
import report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "report"
    args = ["--messages", "20000", "--tenants", "2", "--campaigns", "3", "--transactional", "20",
            "--ceiling-messages", "20000", "--error-429", "0.02", "--error-503", "0.02",
            "--reject", "0.01", "--statements", "--out", str(out)]
    result = subprocess.run([sys.executable, str(LOAD / "bench.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, env=env(), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    figures = json.loads((out / "report.json").read_text())

    outcome = figures["outcome"]
    campaign_rows = outcome["campaigns"]
    assert len(campaign_rows) == 3 and {c["tenant_id"] for c in campaign_rows} == {
        "bench-1", "bench-2"}
    assert all(c["status"] == "completed" for c in campaign_rows), campaign_rows
    assert sum(c["total"] for c in campaign_rows) == 20_000
    assert figures["series"][-1]["done"] == 20_000 and figures["series"][-1]["backlog"] == 0
    assert outcome["duplicates"] == 0 and outcome["lost"] == 0, outcome
    assert outcome["provider_accepted"] == outcome["db_sent"], outcome
    assert outcome["rejected_expected"] == 200 == outcome["rejected_failed"], outcome
    assert outcome["statuses"]["failed"] == 200, outcome  # the rejected ones, nothing else
    assert figures["ok"] and figures["problems"] == []

    run = figures["run"]
    assert run["msgs_per_s"] > 0 and run["wall_s"] > 0
    assert run["sustained"]["msgs_per_s"] > 0
    ceiling = figures["ceiling"]  # measured before and after the run, rated by their mean
    for measured in (ceiling["before"], ceiling["after"]):
        assert measured["msgs_per_s"] > 0
        assert {t["connections"] for t in measured["trials"]} == {1, 2}
    assert ceiling["msgs_per_s"] == pytest.approx(
        (ceiling["before"]["msgs_per_s"] + ceiling["after"]["msgs_per_s"]) / 2, abs=0.1)
    assert 0 < figures["ratio"] == pytest.approx(
        run["sustained"]["msgs_per_s"] / figures["ceiling"]["msgs_per_s"], rel=1e-2)

    tx = figures["transactional"]
    assert tx["inserted"] > 0 and tx["count"] == tx["inserted"], tx
    assert outcome["transactional_statuses"] == {"sent": tx["inserted"]}, outcome
    assert 0 < tx["p50_ms"] <= tx["p90_ms"] <= tx["p99_ms"] <= tx["max_ms"], tx

    assert [d["exit_code"] for d in figures["daemons"]] == [0]
    assert figures["daemons"][0]["peak_rss_kb"] > 0
    writes = figures["db_writes"]
    # At least a claim and an outcome per message; retries (429/503) add more.
    assert writes["rows_per_message"] >= 2, writes
    assert writes["transactions_per_message"] > 0 and writes["wal_bytes_per_message"] > 0
    assert writes["tables"]["message"]["n_tup_upd"] >= 2 * 20_000, writes
    # The retry settings for error runs, and the daemon's own pipeline defaults otherwise.
    assert figures["config"]["retry"]["max_attempts"] == 10
    assert figures["config"]["pipeline"]["claim_chunk"] == 1000

    # Where the CPU went, and PostgreSQL's time per statement (--statements).
    cpu_seconds = figures["cpu"]["seconds"]
    assert cpu_seconds["daemons"] > 0 and cpu_seconds["postgres_backends"] > 0, figures["cpu"]
    assert 0 < figures["cpu"]["machine_busy"] <= 1
    # The campaign claim (sendd.db.claims), among the costliest statements of a run.
    assert any("sendd.claim_affordable(" in s["query"] or "sendd.claim_budgets(" in s["query"]
               for s in figures["statements"]), figures["statements"]

    assert (out / "chart.png").read_bytes().startswith(PNG_SIGNATURE)
    summary = (out / "report.md").read_text()
    assert summary in result.stdout  # printed at the end, too
    sustained = f"{run['sustained']['msgs_per_s']:,.0f} msgs/s"
    for mention in (sustained, f"{figures['ceiling']['msgs_per_s']:,.0f} msgs/s",
                    f"{figures['ratio']:.2f}", f"{tx['p50_ms']:,.0f} / ",
                    "| duplicates (provider) | 0 |", "| lost or unfinished | 0 |",
                    "| CPU during the run (per message) | postgres backends ",
                    "PostgreSQL time by statement", "Result: **OK**"):
        assert mention in summary, (mention, summary)


@pytest.mark.slow
def test_bench_mixed_tenants_end_to_end(tmp_path):
    """A slow tenant sending before the main campaign, small campaigns of their own tenants
    beside it and the transactional trickle: the mix section, the slow tenant held to its rate
    at the provider, every small campaign's finish."""
    out = tmp_path / "report"
    args = ["--messages", "3000", "--slow-tenant", "20", "--slow-messages", "150",
            "--small-campaigns", "20", "--small-size", "10", "--transactional", "10",
            "--reject", "0.01", "--ceiling-messages", "0", "--no-chart", "--out", str(out)]
    result = subprocess.run([sys.executable, str(LOAD / "bench.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, env=env(), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((out / "report.json").read_text())
    assert figures["ok"] and figures["problems"] == [], figures["problems"]

    outcome = figures["outcome"]
    assert outcome["duplicates"] == 0 and outcome["lost"] == 0, outcome
    # 3,000 + 20 x 10 + 150 recipients numbered on: 1 % of 3,350 rejected, all of them failed.
    assert outcome["rejected_expected"] == 33 == outcome["rejected_failed"], outcome
    assert figures["run"]["messages"] == 3200  # the main and small campaigns, not the slow one
    assert figures["run"]["from_s"] > bench.SLOW_LEAD_S
    assert all(c["status"] == "completed" for c in outcome["campaigns"]), outcome["campaigns"]

    mix = figures["mix"]
    assert mix["from"] == bench.MAIN_START
    slow = mix["slow"]
    assert slow["messages"] == 150 and slow["sent"] == 150 - 1, slow  # one +99 among them
    assert 0 < slow["peak_per_1s"] <= 20, slow
    assert slow["done_before_main"] > 0
    assert (slow["done_before_main"] + slow["done_during_main"] + slow["unsent_at_main_end"]
            == 150), slow
    assert slow["finished_s"] >= mix["main"]["finished_s"] or slow["unsent_at_main_end"] == 0
    small = mix["small"]
    assert (small["campaigns"], small["tenants"], small["finished"]) == (20, 20, 20), small
    assert len(small["per_campaign"]) == 20
    assert {row["tenant"] for row in small["per_campaign"]} == {f"small-{i}" for i in
                                                                range(1, 21)}
    assert small["last_s"] == max(row["finished_s"] for row in small["per_campaign"])
    tx = figures["transactional"]
    assert tx["inserted"] > 0 and tx["count"] == tx["inserted"], tx

    summary = (out / "report.md").read_text()
    for mention in ("Mixed tenants", "| slow tenant, limited to 20 msgs/s |",
                    "| small campaigns (20 × 10 messages, 20 tenants) |", "Result: **OK**"):
        assert mention in summary, (mention, summary)


@pytest.mark.parametrize("argv, mention", [
    (["--tenants", "2", "--campaigns", "1"], "--campaigns (1) must be at least --tenants (2)"),
    (["--reject", "1.5"], "argument --reject: must be between 0 and 1"),
    (["--messages", "lots"], "argument --messages: not an integer"),
    (["--batch-size", "0"], "argument --batch-size: must be between 1 and 1,000"),
    (["--error-429", "nan"], "argument --error-429: must be between 0 and 1"),
    (["--slow-messages", "100"], "--slow-messages needs --slow-tenant"),
    (["--small-size", "10"], "--small-size needs --small-campaigns"),
    (["--slow-tenant", "0"], "argument --slow-tenant: must be between 1 and 1,000,000"),
    (["--messages", "99999999", "--small-campaigns", "1"], "must not exceed 99,999,999"),
])
def test_bad_arguments_get_one_line_and_exit_2(argv, mention, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and mention in err, err


def test_defaults():
    args = bench.parse_args(["--messages", "500000"])
    assert (args.messages, args.tenants, args.campaigns, args.daemons) == (500_000, 1, 1, 1)
    assert args.ceiling_messages == 200_000 and args.batch_size == 1000
    assert args.out.parent == LOAD / "reports"
    settings = bench.daemon_settings(args)
    assert settings["account"] == {"max_batch": 1000, "single": False, "timeout": 10.0}
    assert settings["retry"]["base_delay"] == 3.0  # no provider errors: the daemon's retries
    single = bench.daemon_settings(bench.parse_args(["--single", "--error-503", "0.1"]))
    assert single["account"]["single"] is True and single["retry"]["base_delay"] == 0.5
    assert single["account"]["max_batch"] == bench.SINGLE_GROUP


def test_mix_defaults():
    plain = bench.parse_args([])
    assert (plain.slow_tenant, plain.small_campaigns, bench.all_messages(plain)) == (
        None, 0, 100_000)
    scenario = bench.scenario_of(plain)
    assert (scenario["slow_tenant"], scenario["slow_messages"], scenario["small_campaigns"],
            scenario["small_size"]) == (None, 0, 0, 0)

    mixed = bench.parse_args(["--messages", "1000", "--slow-tenant", "50",
                              "--small-campaigns", "30"])
    assert (mixed.slow_messages, mixed.small_size) == (1000, 100)  # 20 s of its rate; 100
    assert bench.all_messages(mixed) == 1000 + 30 * 100 + 1000
    given = bench.parse_args(["--slow-tenant", "5", "--slow-messages", "7",
                              "--small-campaigns", "2", "--small-size", "3"])
    assert {k: bench.scenario_of(given)[k] for k in ("slow_tenant", "slow_messages",
                                                     "small_campaigns", "small_size")} == {
        "slow_tenant": 5, "slow_messages": 7, "small_campaigns": 2, "small_size": 3}


def test_groups_label_every_campaign_and_run_the_main_and_small_ones():
    main = dataset.Campaigns([1, 2], ["bench-1", "bench-1"])
    small = dataset.Campaigns([3, 4, 5], ["small-1", "small-2", "small-3"])
    slow = dataset.Campaigns([6], ["slow"])
    assert not bench.Groups(main).mixed
    assert bench.Groups(main).labelled() == ([1, 2], ["main", "main"])
    groups = bench.Groups(main, small, slow)
    assert groups.mixed and groups.run_ids() == [1, 2, 3, 4, 5]
    assert groups.labelled() == ([1, 2, 3, 4, 5, 6],
                                 ["main", "main", "small", "small", "small", "slow"])
    assert bench.Groups(main, slow=slow).run_ids() == [1, 2]


# --- the pure figures ---------------------------------------------------------------------------

def test_finish_times_from_the_origin():
    origin = 1000.0
    finished = [1003.0, 1001.0, None, 1002.0, 1005.0]
    times = report.finish_times(finished, origin, before=3.0)
    # One not finished: no last time (the run would have failed), the rest still told.
    assert times == {"finished": 4, "first_s": 1.0, "p50_s": 2.5, "p90_s": 4.4, "last_s": None,
                     "by_main_end": 3}
    done = report.finish_times([1001.5, 1000.25], origin)
    assert (done["first_s"], done["last_s"], "by_main_end" in done) == (0.25, 1.5, False)
    assert report.finish_times([], origin)["last_s"] is None
    rows = report.per_campaign([7, 8], {7: "small-1", 8: "small-2"}, {7: 1002.5, 8: None},
                               origin)
    assert rows == [{"campaign": 7, "tenant": "small-1", "finished_s": 2.5},
                    {"campaign": 8, "tenant": "small-2", "finished_s": None}]


def test_slow_tenant_figures_and_its_limit():
    progress = {"messages": 1000, "sent": 990, "done_before_main": 150,
                "done_during_main": 500, "unsent_at_main_end": 350}
    slow = report.slow_tenant_figures(50, 1, progress, 50, 10.0, 20.5)
    assert slow == {"rate": 50, "allowed_peak_per_1s": 50, "peak_per_1s": 50,
                    "messages": 1000, "sent": 990, "done_before_main": 150,
                    "done_during_main": 500, "rate_during_main": 50.0,
                    "unsent_at_main_end": 350, "finished_s": 20.5}
    assert report.mix_problems({"slow": slow}) == []
    # Limits are per daemon: three daemons may send three times the rate.
    assert report.slow_tenant_figures(50, 3, progress, 120, 10.0, 20.5)[
        "allowed_peak_per_1s"] == 150
    over = report.slow_tenant_figures(50, 1, progress, 51, 10.0, 20.5)
    assert report.mix_problems({"slow": over}) == [
        "the slow tenant had 51 messages accepted in one second at the provider, above its "
        "limit of 50"]
    unseen = report.slow_tenant_figures(50, 1, progress, None, 10.0, 20.5)
    assert "no per-second peak" in report.mix_problems({"slow": unseen})[0]
    unknown = report.slow_tenant_figures(50, 1, None, None, None, None)
    assert unknown["rate_during_main"] is None and unknown["sent"] is None
    assert report.mix_problems({"slow": unknown}) == []
    assert report.mix_problems(None) == [] == report.mix_problems({"main": {}})


def _figures(mix=None, **run):
    """A made-up report.json, as bench.figures_of builds it."""
    writes = report.db_writes({"tables": {}, "xact_commit": 0, "wal_records": 0, "wal_bytes": 0},
                              {"tables": {}, "xact_commit": 0, "wal_records": 0, "wal_bytes": 0},
                              1000)
    scenario = bench.scenario_of(bench.parse_args(["--messages", "1000", "--out", "/tmp/x"]))
    return {"date": "2026-12-03T12:00:00+00:00", "command": "bench", "scenario": scenario,
            "machine": {"nproc": 2, "cpu_model": "cpu", "memory_gib": 1.0, "kernel": "6",
                        "python": "3.11", "postgresql": "15", "loadavg_start": "0",
                        "loadavg_end": "0"},
            "run": {"messages": 1000, "wall_s": 2.0, "msgs_per_s": 500.0,
                    "sustained": {"msgs_per_s": 600.0}, **run},
            "load": {"messages": 1000, "insert_s": 0.1, "vacuum_analyze_s": 0.1},
            "transactional": {"count": 0}, "daemons": [], "db_writes": writes,
            "outcome": {"duplicates": 0, "lost": 0, "provider_accepted": 1000, "db_sent": 1000,
                        "rejected_expected": 0, "rejected_failed": 0},
            "ceiling": None, "ratio": 0.5, "mix": mix, "ok": True, "problems": []}


def test_the_mix_section_of_the_summary():
    plain = report.markdown(_figures())
    assert "Mixed tenants" not in plain
    assert "| wall time, daemon start to last message done | 2.00 s |" in plain

    slow = report.slow_tenant_figures(
        50, 1, {"messages": 1000, "sent": 1000, "done_before_main": 100,
                "done_during_main": 100, "unsent_at_main_end": 800}, 50, 2.0, 20.0)
    small = {"campaigns": 3, "size": 100, "tenants": 3, "finished": 3, "first_s": 0.5,
             "p50_s": 1.0, "p90_s": 1.4, "last_s": 1.5, "by_main_end": 3, "per_campaign": []}
    mix = {"from": bench.MAIN_START, "main": {"campaigns": 1, "messages": 700,
                                              "finished_s": 2.0, "msgs_per_s": 350.0},
           "slow": slow, "small": small}
    summary = report.markdown(_figures(mix, from_s=3.5))
    for mention in (
            "| wall time, the main campaign's start (3.5 s after the daemons') to last message "
            "done | 2.00 s |",
            f"Mixed tenants (times from {bench.MAIN_START}",
            "| main campaign(s) | 700 messages in 1 campaign(s), done at 2.00 s (350 msgs/s) |",
            "| slow tenant, limited to 50 msgs/s | 1,000 messages, 1,000 sent; peak 50 in any "
            "1 s at the provider (limit 50) |",
            "100 done before it started, 100 while it ran (50.0 msgs/s), **800 still unsent "
            "when it finished**; all done at 20.00 s",
            "| small campaigns (3 × 100 messages, 3 tenants) | **last done at 1.50 s** against "
            "2.00 s for the main campaign; first 0.50 s, median 1.00 s, p90 1.40 s; 3 of 3 "
            "done before the main one |",
            "| all campaign messages (main and small) | 1,000: 600 msgs/s sustained, 0.50 of "
            "the ceiling; 500 msgs/s overall |"):
        assert mention in summary, (mention, summary)
    assert "| slow tenant" not in report.markdown(
        _figures({**mix, "from": bench.DAEMON_START, "slow": None}))
    scenario = {**_figures()["scenario"], "slow_tenant": 50, "slow_messages": 1000,
                "small_campaigns": 3, "small_size": 100}
    line = report._scenario_line({"scenario": scenario})
    assert ("3 small campaigns of 100 messages beside them, one tenant each; a slow tenant "
            "limited to 50 msgs/s with 1,000 messages, sending before them; durable") in line

def test_the_ceiling_is_rated_by_the_mean_of_before_and_after_and_drift_is_told():
    def measured(rate: float) -> dict:
        return {"msgs_per_s": rate, "rows": 1000, "claim_size": 100, "connections": 2}

    steady = report.bracketed_ceiling(measured(50_000.0), measured(54_000.0))
    assert steady["msgs_per_s"] == 52_000.0 and steady["drift"] == pytest.approx(0.077, abs=1e-3)
    text = report._ceiling_text(steady)
    assert text.startswith("52,000 msgs/s, the mean of before 50,000 msgs/s (2 connection(s)) "
                           "and after 54,000 msgs/s") and "uncertain" not in text

    drifted = report.bracketed_ceiling(measured(40_000.0), measured(60_000.0))
    assert "differ by 40%" in report._ceiling_text(drifted)

    one_failed = report.bracketed_ceiling({"error": "boom"}, measured(50_000.0))
    assert one_failed["msgs_per_s"] == 50_000.0
    assert "50,000 msgs/s, from before failed (boom) and after 50,000" in \
        report._ceiling_text(one_failed)
    assert "error" in report.bracketed_ceiling({"error": "boom"}, {"error": "boom"})
    assert report.bracketed_ceiling(None, None) is None


def test_percentiles_interpolate_between_ranks():
    values = [40.0, 10.0, 30.0, 20.0]  # unsorted on purpose
    assert report.percentile(values, 0) == 10.0
    assert report.percentile(values, 50) == 25.0
    assert report.percentile(values, 90) == pytest.approx(37.0)
    assert report.percentile(values, 100) == 40.0
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([], 50) is None
    summary = report.latency_summary([float(v) for v in range(1, 101)])
    assert summary == {"count": 100, "p50_ms": 50.5, "p90_ms": 90.1, "p99_ms": 99.0,
                       "max_ms": 100.0}
    assert report.latency_summary([])["p99_ms"] is None


def _series(*points):
    return [{"t": t, "done": done, "backlog": 1000 - done} for t, done in points]


def test_sustained_rate_is_interpolated_between_samples():
    # 100 done at t=1, then 800 more over 4 s: 10% (100) at t=1, 90% (900) at t=5.
    series = _series((0, 0), (1, 100), (3, 500), (5, 900), (6, 1000))
    assert report.time_at(series, 300) == 2.0
    assert report.sustained_rate(series, 1000) == {"msgs_per_s": 200.0, "from_s": 1.0,
                                                   "to_s": 5.0}
    # Crossings inside an interval: 10% at 0.5 s, 90% at 1.25 s of (0, 0) -> (1.5, 1200)...
    coarse = _series((0, 0), (1.5, 1000))
    assert report.sustained_rate(coarse, 1000)["msgs_per_s"] == pytest.approx(666.7, abs=0.1)
    # Never reached: no rate rather than a made-up one.
    assert report.sustained_rate(_series((0, 0), (1, 50)), 1000)["msgs_per_s"] is None


def test_throughput_and_the_exact_end():
    series = report.with_end(_series((0, 0), (0.5, 400), (1.0, 1000)), 0.8)
    assert [p["t"] for p in series] == [0, 0.5, 0.8, 1.0]
    rates = [p["throughput"] for p in report.with_throughput(series)]
    assert rates == [0.0, 800.0, 2000.0, 0.0]
    # An end outside the last interval changes nothing.
    assert len(report.with_end(_series((0, 0), (1.0, 1000)), 1.5)) == 2


def test_moving_average():
    assert report.moving_average([3.0, 6.0, 9.0, 0.0], 1) == [4.5, 6.0, 5.0, 4.5]
    assert report.moving_average([5.0], 10) == [5.0]
    assert report.moving_average([1.0, 2.0], 0) == [1.0, 2.0]


def test_channel_fill_from_metrics():
    text = ('# HELP sendd_channel_used Items buffered\n'
            'sendd_channel_used{channel="batches"} 6.0\n'
            'sendd_channel_used{channel="claims"} 1.0\n'
            'sendd_channel_capacity{channel="batches"} 8.0\n'
            'sendd_channel_capacity{channel="claims"} 4.0\n'
            'sendd_messages_total{outcome="sent"} 5.0\n')
    channels = report.parse_channels(text)
    assert channels == {"batches": [6.0, 8.0], "claims": [1.0, 4.0]}
    # Thousands of per-tenant series (a thousand small tenants) are skipped, not parsed.
    tenants = "".join(f'sendd_messages_total{{outcome="sent",tenant="t{i}"}} 1.0\n'
                      for i in range(5000))
    assert report.parse_channels(tenants + text + tenants) == channels
    assert report.parse_channels(text.replace("# HELP sendd_channel_used Items buffered\n",
                                              "")) == channels
    assert report.parse_channels("") == {} == report.parse_channels("sendd_channel_used{ 1")
    other = {"channels": {"batches": [2.0, 8.0], "claims": [3.0, 4.0]}}
    assert report.channel_fill([{"channels": channels}, other, {"channels": {}}]) == {
        "batches": 0.5, "claims": 0.5}


def _snapshot(message, submission, xacts, wal_records, wal_bytes):
    names = ("n_tup_ins", "n_tup_upd", "n_tup_del", "n_tup_hot_upd")
    return {"tables": {"message": dict(zip(names, message, strict=True)),
                       "submission": dict(zip(names, submission, strict=True))},
            "xact_commit": xacts, "wal_records": wal_records, "wal_bytes": wal_bytes}


def test_cpu_split_per_message():
    split = report.cpu_split({"postgres_backends_s": 3.0, "daemons_s": 1.5, "machine_busy": 0.9},
                             100_000)
    assert split == {"seconds": {"postgres_backends": 3.0, "daemons": 1.5}, "machine_busy": 0.9,
                     "us_per_message": {"postgres_backends": 30.0, "daemons": 15.0}}
    assert report._cpu_text(split) == ("postgres backends 3.0 s (30 µs), daemons 1.5 s (15 µs); "
                                       "machine 90% busy")


def test_cpu_meter_counts_a_process_group():
    meter = cpu.CpuMeter(lambda: {"me": [os.getpid()], "gone": [2**22 + 1]})
    meter.start()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU
        pass
    meter.sample()
    figures = meter.figures()
    assert 0.2 <= figures["me_s"] <= 1.0 and figures["gone_s"] == 0.0, figures
    assert 0 < figures["machine_busy"] <= 1


def test_writes_per_message():
    before = _snapshot((1000, 0, 0, 0), (0, 0, 0, 0), 50, 10_000, 1_000_000)
    after = _snapshot((1010, 2020, 0, 20), (10, 0, 10, 0), 150, 30_000, 3_000_000)
    writes = report.db_writes(before, after, 1010, bench_rows=10, bench_xacts=49)
    assert writes["tables"]["message"] == {"n_tup_ins": 10, "n_tup_upd": 2020,
                                           "n_tup_del": 0, "n_tup_hot_upd": 20}
    # 10 + 2020 + 10 + 10 rows, less the harness's 10 inserts; HOT updates are not added again.
    assert writes["rows_written"] == 2040
    assert writes["rows_per_message"] == pytest.approx(2040 / 1010, abs=1e-3)
    assert writes["transactions"] == 51
    assert writes["wal_bytes_per_message"] == pytest.approx(2_000_000 / 1010, abs=0.1)
    assert report.db_writes(before, before, 0)["rows_per_message"] is None
    no_wal = {**before, "wal_records": None, "wal_bytes": None}  # PostgreSQL 13
    assert report.db_writes(no_wal, no_wal, 10)["wal_bytes_per_message"] is None


def test_outcome_and_problems():
    rows = [
        {"transactional": False, "reject_share": False, "status": "sent", "count": 97,
         "segments": 97},
        {"transactional": False, "reject_share": True, "status": "failed", "count": 3,
         "segments": 3},
        {"transactional": True, "reject_share": False, "status": "sent", "count": 5,
         "segments": 10},
        {"transactional": True, "reject_share": False, "status": "queued", "count": 1,
         "segments": 1},
    ]
    outcome = report.summarize_statuses(rows, rejected_expected=3)
    assert outcome["statuses"] == {"sent": 102, "failed": 3, "queued": 1}
    assert outcome["transactional_statuses"] == {"sent": 5, "queued": 1}
    assert (outcome["lost"], outcome["db_sent"], outcome["accepted_segments"]) == (1, 102, 107)
    assert outcome["rejected_failed"] == 3
    checked = {**outcome, "duplicates": 0, "provider_accepted": 102, "ledger_debited": 107}
    assert report.problems_of(checked, [0]) == ["1 messages lost or unfinished (queued: 1)"]
    broken = {**checked, "lost": 0, "duplicates": 2, "provider_accepted": 104}
    assert report.problems_of(broken, [0, 1]) == [
        "2 references sent twice to the provider",
        "the provider accepted 104 messages, the database has 102 sent",
        "daemon 2 exited 1 after SIGTERM"]


def test_rejections_are_spread_and_exact():
    assert dataset.expected_rejections(20_000, 0.01) == 200
    assert dataset.expected_rejections(10, 0.0) == 0
    assert dataset.expected_rejections(10, 1.0) == 10
    assert dataset.campaign_tenants(5, ["a", "b"]) == ["a", "b", "a", "b", "a"]
    assert dataset.tenant_names(2, "small") == ["small-1", "small-2"]


def test_loading_messages(database_url):
    """dataset.insert_messages in chunks: counts, campaign totals (the schema's trigger), the
    reject share and valid-looking recipients."""
    async def load() -> tuple[list, list]:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate.migrate(conn)
            for tenant in ("t1", "t2"):
                await conn.execute("INSERT INTO sendd.tenant (id) VALUES ($1)", tenant)
            campaigns = await dataset.create_campaigns(conn, ["t1", "t2", "t1"])
            await dataset.insert_messages(conn, "sendd.message", 1001, campaigns,
                                          reject_rate=0.07, chunk=300)
            totals = await conn.fetch("SELECT tenant_id, total FROM sendd.campaign ORDER BY id")
            rows = await conn.fetch(
                "SELECT recipient LIKE '+99%' AS rejected, count(*), min(length(recipient)), "
                "count(DISTINCT recipient) AS distinct FROM sendd.message GROUP BY 1 ORDER BY 1")
            return totals, rows
        finally:
            await conn.close()

    totals, rows = asyncio.run(load())
    assert [(r["tenant_id"], r["total"]) for r in totals] == [("t1", 334), ("t2", 334),
                                                              ("t1", 333)]
    assert [(r["rejected"], r["count"], r["distinct"]) for r in rows] == [
        (False, 1001 - 70, 1001 - 70), (True, 70, 70)]
    assert rows[0]["min"] == len("+306900000000")


def test_chart_is_a_png(tmp_path):
    for samples in (11, 200):  # short runs plot the samples only, long ones smooth them too
        points = [{"t": t / 2, "done": 10 * t, "backlog": 2000 - 10 * t,
                   "fill": {"claims": t / samples, "batches": 0.5}} for t in range(samples)]
        if samples == 11:  # a mixed run: each group's backlog too
            for point in points:
                point["group_backlog"] = {"main": point["backlog"], "slow": 100}
        path = tmp_path / f"chart-{samples}.png"
        report.write_chart(report.with_throughput(points), path, "test")
        assert path.read_bytes().startswith(PNG_SIGNATURE)
