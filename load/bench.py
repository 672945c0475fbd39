"""Load harness: run one sendd scenario end to end on this machine and write a report.

    .venv/bin/python load/bench.py                                  # 100,000 messages, 1 daemon
    .venv/bin/python load/bench.py --messages 1000000 --daemons 3
    .venv/bin/python load/bench.py --messages 20000 --single   # one request per message
    .venv/bin/python load/bench.py --transactional 50 --error-429 0.02 --error-503 0.02 \\
        --reject 0.01 --tenants 2 --campaigns 3
    .venv/bin/python load/bench.py --messages 300000 --slow-tenant 50    # beside a slow tenant
    .venv/bin/python load/bench.py --messages 300000 --small-campaigns 1000  # 1,000 small ones
    .venv/bin/python load/bench.py --daemons 3 --redis --account-rate 20000 --slow-tenant 500 \\
        --compare-single          # fleet-wide limits through Redis, beside one daemon's run

Everything runs in a private temp dir and is stopped at the end, whatever happens (Ctrl-C
too): a durable private PostgreSQL (sendd.dev.pgserver), the fake provider
(`python -m sendd.dev.fakeprovider`), with --redis a private redis-server
(sendd.dev.pgserver.PrivateRedis, no persistence) named in every daemon's `[redis] url` so that
they share the account's and the tenants' limits, and K daemons (`python -m sendd run`, each
with its own config, HTTP port and control socket). The steps:

1. migrate and create the tenants with `sendd` itself, create the campaigns with an INSERT and
   generate the messages inside PostgreSQL (load/dataset.py; `sendd enqueue` validates every
   number and is too slow for millions), then VACUUM ANALYZE; timed, not counted in throughput;
2. measure the bare-PostgreSQL ceiling on the same server (load/ceiling.py) a first time;
   snapshot the database statistics, start the daemons, sample every 0.5 s (messages done,
   backlog, throughput, channel fill from each daemon's /metrics, RSS from /proc) while an
   optional task trickles transactional messages in at --transactional per second;
   with --slow-tenant, the slow tenant's campaign alone is sending at first: the other
   campaigns are loaded as drafts and started together (one UPDATE, and the NOTIFY an insert
   would send) once it is sending, and the figures count from then;
3. once every campaign message is done (but the slow tenant's): stop the trickle, wait for the
   transactional messages, then for the slow tenant's campaign, read each daemon's peak RSS,
   stop the daemons (SIGTERM: they drain), snapshot again;
4. check the outcome: duplicates at the provider, unfinished messages, provider-accepted versus
   stored-as-sent, the credit ledger, the slow tenant's rate at the provider;
5. measure the ceiling a second time; the report gives both and rates the daemons against
   their mean (this VM's speed drifts by tens of percent within minutes: the two tell);
6. write DIR/report.json (everything, with the time series), DIR/report.md (the summary, also
   printed) and DIR/chart.png (throughput, backlog, channel fill over time; load/report.py).
   Both give the provider's peak messages and requests in any 1 s per API key and per sender
   beside the limits (--account-rate, --slow-tenant): with --redis each limit is the fleet's,
   without it each daemon keeps its own copy, so K daemons may send up to K times it.

--compare-single runs the whole scenario twice, back to back: with one daemon first (into
DIR/single-daemon, its own database, the same dataset and options), then with the K daemons;
DIR/report.md sets their throughput and peaks side by side.

Exit status: 0 when every message was done with 0 duplicates and 0 lost (and the other checks
held), 1 otherwise (the reasons are printed), 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "tests"), str(Path(__file__).resolve().parent)]

import ceiling  # noqa: E402 -- these need the path set-up above
import cpu  # noqa: E402
import dataset  # noqa: E402
import report  # noqa: E402
from harness import API_KEY, Daemon, FakeProvider, setup_database, write_config  # noqa: E402
from harness import sendd as sendd_command  # noqa: E402
from sendd.commands.tenants import set_tenant  # noqa: E402
from sendd.config import PipelineConfig, RetryConfig  # noqa: E402
from sendd.dev import interrupts  # noqa: E402
from sendd.dev.pgserver import (  # noqa: E402
    PrivatePostgres,
    PrivateRedis,
    ServerError,
    free_port,
    log_tail,
)

SAMPLE_INTERVAL = 0.5  # seconds between samples of the time series
PROGRESS_EVERY = 3.0  # seconds between progress lines
STALL_TIMEOUT = 120.0  # no message done for this long: the run is stuck
READY_TIMEOUT = 60.0  # for a daemon's /readyz to answer 200
READY_POLL = 0.05  # seconds between /readyz polls until every daemon is ready
STOP_TIMEOUT = 60.0  # for a daemon to drain after SIGTERM (its own stop_timeout is 30 s)
TRANSACTIONAL_TIMEOUT = 120.0  # for the last transactional messages once the campaigns are done
TRANSACTIONAL_PRIORITY = 10
CREDIT_MARGIN = 1_000_000  # on top of every tenant's messages: transactional ones, retries
# Quick retries when the provider is told to fail: 429/503 then cost seconds, not minutes.
FAST_RETRY = {"base_delay": 0.5, "max_delay": 5.0, "max_attempts": 10}
ACCOUNT_TIMEOUT = 10.0  # the daemon's default; the test harness's 1.5 s is for fault tests
# --slow-tenant: the main campaign starts this long after the slow tenant's first message is done,
# so that its claims, batches and rate waits are in the pipeline when the big one arrives.
SLOW_LEAD_S = 2.0
SLOW_TENANT = "slow"
SLOW_SENDER = "slow"  # its messages' sender: the fake provider counts peaks per sender
SLOW_DEFAULT_SECONDS = 20  # --slow-messages defaults to this many seconds of its rate
SMALL_DEFAULT_SIZE = 100
SINGLE_DIR = "single-daemon"  # --compare-single: the one-daemon run's report, inside --out
TRANSACTIONAL_NOTE = ("from the insert (created_at, the database's clock) to the arrival of the "
                      "request at the provider, which accepts on arrival (the fake's "
                      "/_accepted_at; same machine, same clock)")

BULK_BATCH = 1000  # the provider's largest bulk request
SINGLE_GROUP = 100  # one-message requests sent together under one submission mark
PIPELINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
RETRY_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RetryConfig)}

CAMPAIGN_SUMS = """
SELECT coalesce(sum(total), 0)::bigint AS total,
       coalesce(sum(sent + failed + unknown + cancelled), 0)::bigint AS done
FROM sendd.campaign WHERE id = ANY($1::bigint[])
"""
# The same per group of campaigns ($2: each id's group, "main", "small" or "slow").
GROUP_SUMS = """
SELECT g.label, coalesce(sum(c.total), 0)::bigint AS total,
       coalesce(sum(c.sent + c.failed + c.unknown + c.cancelled), 0)::bigint AS done
FROM unnest($1::bigint[], $2::text[]) AS g(id, label)
JOIN sendd.campaign c ON c.id = g.id GROUP BY g.label
"""
# Start the drafts at once, and wake the pollers as queuing messages would (the NOTIFY goes out
# at the commit): the daemons find them as they find a campaign that was there at their start.
START_CAMPAIGNS = """
WITH started AS (
    UPDATE sendd.campaign SET status = 'sending', started_at = now()
    WHERE id = ANY($1::bigint[]) AND status = 'draft' RETURNING id)
SELECT count(*) AS started, pg_notify('sendd_queued', '') IS NULL AS notified FROM started
"""
# The slow tenant's messages against the main campaigns' start ($2) and end ($3), all in the
# database's clock (finished_at is stamped in the writer's transaction, as the campaign's is).
SLOW_PROGRESS = """
SELECT count(*) AS messages,
       count(*) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')) AS sent,
       count(*) FILTER (WHERE finished_at < $2) AS done_before_main,
       count(*) FILTER (WHERE finished_at >= $2 AND finished_at <= $3) AS done_during_main,
       count(*) FILTER (WHERE finished_at IS NULL OR finished_at > $3) AS unsent_at_main_end
FROM sendd.message WHERE campaign_id = ANY($1::bigint[])
"""
INSERT_TRANSACTIONAL = """
INSERT INTO sendd.message (tenant_id, account, sender, recipient, body, priority)
VALUES ($1, $2, $3, $4, $5, $6)
"""
TRANSACTIONAL_PENDING = """
SELECT count(*) FROM sendd.message
WHERE campaign_id IS NULL AND status IN ('queued', 'sending')
"""
STAT_TABLES = """
SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd
FROM pg_stat_user_tables WHERE schemaname = 'sendd'
"""
# --statements: every statement's PostgreSQL time, those inside the trigger functions too ("all").
STATEMENTS_SETTINGS = {"shared_preload_libraries": "pg_stat_statements",
                       "pg_stat_statements.track": "all"}
STATEMENTS_RESET = "SELECT pg_stat_statements_reset()"
TOP_STATEMENTS = """
SELECT query, calls, total_exec_time AS total_ms, rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT 12
"""
STAT_XACTS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
STAT_WAL = "SELECT wal_records, wal_bytes FROM pg_stat_wal"
STATUS_COUNTS = """
SELECT campaign_id IS NULL AS transactional, recipient LIKE '+99%' AS reject_share, status,
       count(*) AS count, sum(segments)::bigint AS segments
FROM sendd.message GROUP BY 1, 2, 3
"""
LEDGER_DEBITED = ("SELECT -coalesce(sum(delta), 0)::bigint FROM sendd.credit_ledger "
                  "WHERE reason = 'send'")
TRANSACTIONAL_SENT = """
SELECT id::text AS reference, extract(epoch FROM created_at)::float8 AS created
FROM sendd.message
WHERE campaign_id IS NULL AND status IN ('sent', 'delivered', 'undelivered')
"""
CAMPAIGN_ROWS = """
SELECT id, tenant_id, status, total, sent, failed, unknown, cancelled, started_at, finished_at,
       extract(epoch FROM started_at)::float8 AS started_epoch,
       extract(epoch FROM finished_at)::float8 AS finished_epoch
FROM sendd.campaign ORDER BY id
"""


class BenchFailed(Exception):
    """The run could not go on; str() is one line."""


# --- the command line -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, no usage dump: the brief error is what scripts and people read.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:,} and {high:,}, got {text}")
        return value
    return parse


def _number_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (exit 2 with one line on bad ones); defaults filled in where they depend."""
    parser = _Parser(prog="load/bench.py", description=__doc__.split("\n\n")[0],
                     epilog="Everything else the harness does is described in load/bench.py.")
    _campaign_options(parser.add_argument_group("the campaign"))
    _mix_options(parser.add_argument_group(
        "mixed tenants", "other tenants' campaigns beside the main one (--messages); they "
        "combine with each other and with --transactional"))
    _provider_options(parser.add_argument_group("the fake provider"))
    _daemon_options(parser.add_argument_group("the daemons"))
    _report_options(parser.add_argument_group("the report"))
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    _check_mix(parser, args)
    if args.batch_size is None:
        args.batch_size = SINGLE_GROUP if args.single else BULK_BATCH
    return args


def _campaign_options(group: Any) -> None:
    group.add_argument("--messages", metavar="N", type=_int_in(1, dataset.MAX_MESSAGES),
                       default=100_000,
                       help="campaign messages (default 100000; 5000000 works)")
    group.add_argument("--tenants", metavar="N", type=_int_in(1, 1000), default=1,
                       help="tenants, each with enough credits (default 1)")
    group.add_argument("--campaigns", metavar="N", type=_int_in(1, 10_000), default=1,
                       help="campaigns, spread round-robin over the tenants, messages "
                            "round-robin over the campaigns (default 1; at least --tenants)")
    group.add_argument("--transactional", type=_number_in(0, 10_000), default=0.0,
                       metavar="RATE", help="transactional messages per second inserted one "
                       "by one while the campaign runs (with --slow-tenant, until its "
                       "campaign is done too: the latency beside its backlog alone is "
                       "reported apart); their latency is reported (default 0)")


def _mix_options(group: Any) -> None:
    group.add_argument("--slow-tenant", metavar="RATE", type=_int_in(1, 1_000_000),
                       default=None,
                       help=f"add a tenant {SLOW_TENANT!r} limited to RATE msgs/s (`sendd tenant "
                            "set slow --rate RATE`) whose campaign is already sending when the "
                            "main one starts (from its first message done, "
                            f"{SLOW_LEAD_S:g} s later); the figures count from the main "
                            "campaign's start. Reports the slow tenant's peak in any 1 s at "
                            "the provider (at most RATE per daemon without --redis; with "
                            "--redis, RATE for the fleet), "
                            "what it sent while the main campaign ran and how many of its "
                            "messages were still unsent when the main one finished; the run "
                            "then waits for it to finish")
    group.add_argument("--slow-messages", metavar="N",
                       type=_int_in(1, dataset.MAX_MESSAGES), default=None,
                       help="the slow tenant's campaign (default "
                            f"{SLOW_DEFAULT_SECONDS} x RATE: {SLOW_DEFAULT_SECONDS} s of "
                            "sending; make it longer than the main campaign takes)")
    group.add_argument("--small-campaigns", metavar="K", type=_int_in(0, 10_000), default=0,
                       help="K more campaigns of --small-size messages, queued and started "
                            "together with the main one, each in a tenant of its own "
                            "(small-1 ... small-K), not spread over --tenants: the daemons "
                            "share claims and senders between tenants (each tenant's share "
                            "then between its campaigns), so K + 1 tenants competing is the "
                            "hardest test of that fairness. Reports when each finished "
                            "(report.json), the last against the main one, and the throughput "
                            "of all messages against the ceiling (default 0)")
    group.add_argument("--small-size", metavar="M", type=_int_in(1, 1_000_000), default=None,
                       help=f"messages per small campaign (default {SMALL_DEFAULT_SIZE})")


def _provider_options(group: Any) -> None:
    group.add_argument("--latency-ms", metavar="MS", type=_number_in(0, 60_000), default=20.0,
                       help="response latency per request (default 20)")
    group.add_argument("--jitter-ms", metavar="MS", type=_number_in(0, 60_000), default=0.0,
                       help="extra random latency per request, 0..MS (default 0)")
    group.add_argument("--error-429", type=_number_in(0, 1), default=0.0, metavar="RATE",
                       help="share of requests answered 429 with Retry-After (default 0)")
    group.add_argument("--error-503", type=_number_in(0, 1), default=0.0, metavar="RATE",
                       help="share of requests answered 503 (default 0)")
    group.add_argument("--reject", type=_number_in(0, 1), default=0.0, metavar="RATE",
                       help="share of recipients the provider rejects as invalid numbers; "
                            "they must end failed (default 0)")
    group.add_argument("--seed", metavar="N", type=int, default=1,
                       help="the provider's random seed (default 1)")


def _daemon_options(group: Any) -> None:
    group.add_argument("--daemons", metavar="K", type=_int_in(1, 32), default=1,
                       help="daemons sharing the database (default 1)")
    group.add_argument("--batch-size", metavar="N", type=_int_in(1, 1000), default=None,
                       help="the account's max_batch: messages per request, or with --single "
                            f"per group of concurrent requests under one submission mark "
                            f"(default {BULK_BATCH}, with --single {SINGLE_GROUP})")
    group.add_argument("--single", action="store_true",
                       help="single-message mode: every message is its own request, to the "
                            "provider's one-message endpoint (the account's single = true)")
    group.add_argument("--senders", metavar="N", type=_int_in(1, 256),
                       default=PIPELINE_DEFAULTS["senders"],
                       help="pipeline.senders (default: the daemon's, "
                            f"{PIPELINE_DEFAULTS['senders']})")
    group.add_argument("--claim-chunk", metavar="N", type=_int_in(1, 100_000),
                       default=PIPELINE_DEFAULTS["claim_chunk"],
                       help="pipeline.claim_chunk, also the ceiling's claim size (default: "
                            f"the daemon's, {PIPELINE_DEFAULTS['claim_chunk']})")
    group.add_argument("--account-rate", metavar="N", type=_int_in(0, 1_000_000), default=0,
                       help="the account's msgs_per_s: at most N per daemon without --redis; "
                            "with --redis, N for the fleet (default 0: unlimited)")
    group.add_argument("--redis", action="store_true",
                       help="start a private redis-server for the run and give every daemon "
                            "its [redis] url: the daemons share the account's and the tenants' "
                            "limits (without it each daemon enforces its own copy)")


def _report_options(group: Any) -> None:
    group.add_argument("--out", type=Path, metavar="DIR",
                       help="report directory (default load/reports/<timestamp>)")
    group.add_argument("--no-chart", action="store_true", help="skip chart.png")
    group.add_argument("--ceiling-messages", metavar="N", type=_int_in(0, dataset.MAX_MESSAGES),
                       help="rows for the bare-PostgreSQL ceiling, measured before and after "
                            "the run (default min(messages, 200000); 0 skips it)")
    group.add_argument("--statements", action="store_true",
                       help="load pg_stat_statements and list the statements that took the "
                            "most PostgreSQL time during the run (for profiling)")
    group.add_argument("--compare-single", action="store_true",
                       help="with --daemons K (2 or more): run the same scenario with one "
                            f"daemon first (report in DIR/{SINGLE_DIR}), then with K, and "
                            "report both side by side; twice the time")
    group.add_argument("--keep-dir", action="store_true",
                       help="keep the work dir (daemon configs and logs) for debugging; "
                            "PostgreSQL's own directory is removed either way")


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.campaigns < args.tenants:
        parser.error(f"--campaigns ({args.campaigns}) must be at least --tenants "
                     f"({args.tenants}), so that every tenant has a campaign")
    if args.campaigns > args.messages:
        parser.error(f"--campaigns ({args.campaigns}) must not exceed --messages")
    if args.compare_single and args.daemons < 2:
        parser.error("--compare-single needs --daemons 2 or more")
    if args.ceiling_messages is None:
        args.ceiling_messages = min(args.messages, 200_000)
    if args.out is None:
        args.out = REPO / "load" / "reports" / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a directory")


def _check_mix(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.slow_messages is not None and args.slow_tenant is None:
        parser.error("--slow-messages needs --slow-tenant")
    if args.small_size is not None and not args.small_campaigns:
        parser.error("--small-size needs --small-campaigns")
    if args.slow_tenant is not None and args.slow_messages is None:
        args.slow_messages = min(SLOW_DEFAULT_SECONDS * args.slow_tenant, dataset.MAX_MESSAGES)
    if args.small_size is None:
        args.small_size = SMALL_DEFAULT_SIZE
    if all_messages(args) > dataset.MAX_MESSAGES:
        parser.error(f"--messages, the small campaigns' and the slow tenant's messages together "
                     f"({all_messages(args):,}) must not exceed {dataset.MAX_MESSAGES:,}")


def small_messages(args: argparse.Namespace) -> int:
    return args.small_campaigns * args.small_size if args.small_campaigns else 0


def slow_messages(args: argparse.Namespace) -> int:
    return args.slow_messages if args.slow_tenant is not None else 0


def all_messages(args: argparse.Namespace) -> int:
    """Every campaign message loaded: the main campaigns', the small ones', the slow tenant's."""
    return args.messages + small_messages(args) + slow_messages(args)


def scenario_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"messages": args.messages, "tenants": args.tenants, "campaigns": args.campaigns,
            "transactional": args.transactional, "latency_ms": args.latency_ms,
            "jitter_ms": args.jitter_ms, "error_429": args.error_429,
            "error_503": args.error_503, "reject": args.reject, "seed": args.seed,
            "daemons": args.daemons, "batch_size": args.batch_size,
            "single": args.single, "senders": args.senders,
            "claim_chunk": args.claim_chunk, "ceiling_messages": args.ceiling_messages,
            "slow_tenant": args.slow_tenant, "slow_messages": slow_messages(args),
            "small_campaigns": args.small_campaigns,
            "small_size": args.small_size if args.small_campaigns else 0,
            "account_rate": args.account_rate, "redis": args.redis}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"load/bench.py: error: --out {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        with interrupts.stop_signals_interrupt():
            figures = run_compared(args) if args.compare_single else run_bench(args)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (BenchFailed, ServerError) as error:
        if interrupts.during_interrupt(error):  # e.g. the cleanup of a PostgreSQL start cut short
            print("bench: interrupted; everything it started is stopped", file=sys.stderr)
            return 130
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, httpx.HTTPError) as error:
        print(f"bench: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    summary = report.markdown(figures)
    print(summary)
    print(f"report: {args.out / 'report.md'} (and report.json"
          f"{'' if args.no_chart else ', chart.png'})")
    for problem in figures["problems"]:
        print(f"bench: {problem}", file=sys.stderr)
    return 0 if figures["ok"] else 1


# --- the run ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fleet:
    """The daemons, with what the harness learns about them along the way."""

    daemons: list[Daemon]
    ports: list[int]
    logs: list[Path]
    ready_s: list[float | None]
    peak_rss_kb: list[int]
    redis: bool = False  # the daemons share their limits through Redis: watch their state

    def alive_or_fail(self) -> None:
        for i, daemon in enumerate(self.daemons):
            code = daemon.process.poll()
            if code is not None:
                raise BenchFailed(f"daemon {i + 1} exited early (code {code}): "
                                  f"{log_tail(self.logs[i])}")


def run_compared(args: argparse.Namespace) -> dict[str, Any]:
    """--compare-single: the scenario with one daemon (into DIR/single-daemon), then with the
    K daemons; the K daemons' report, with both runs side by side in its "compare", and the
    one-daemon run's problems among its own."""
    single_args = argparse.Namespace(**{**vars(args), "daemons": 1, "compare_single": False,
                                        "out": args.out / SINGLE_DIR})
    single_args.out.mkdir(parents=True, exist_ok=True)
    say(f"--compare-single: the scenario with 1 daemon first (report in {single_args.out})")
    single = run_bench(single_args)
    say(f"--compare-single: now with {args.daemons} daemons")
    figures = run_bench(args)
    figures["compare"] = report.compare(single, figures, SINGLE_DIR)
    figures["problems"] += [f"the one-daemon run: {p}" for p in single["problems"]]
    figures["ok"] = not figures["problems"]
    _write_report(figures, args, chart=False)  # the chart is the K daemons' run's, as written
    return figures


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole scenario and return the report (also written to args.out)."""
    stack = ExitStack()
    try:
        return _run(stack, args)
    finally:
        interrupts.unwind(stack, "bench")


def _run(stack: ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    started_at, loadavg_start = datetime.now().astimezone(), os.getloadavg()
    workdir = _workdir(stack, args.keep_dir)
    settings = STATEMENTS_SETTINGS if args.statements else None
    pg = stack.enter_context(PrivatePostgres(durable=True, base_dir=workdir,
                                             extra_settings=settings))
    say(f"PostgreSQL (durable) on port {pg.port}, work dir {workdir}")
    fake = stack.enter_context(_provider(args))
    redis_url = _redis(stack, workdir) if args.redis else ""
    configs, ports = _write_configs(workdir, pg.url, fake.url, args, redis_url)
    tenants = dataset.tenant_names(args.tenants)
    _setup(configs[0], tenants, args)
    groups, load = _run_async(_load(pg.url, args, tenants))
    ceiling_before = _ceiling(pg.url, args, "before the run")
    if args.statements:
        _run_async(_statements(pg.url, STATEMENTS_RESET))
    before = _run_async(stats_snapshot(pg.url))
    fleet, t0 = _start_fleet(stack, configs, ports, args.redis)
    meter = _cpu_meter(pg, fleet, fake)
    watched = _run_async(_watch(pg.url, fleet, groups, args, tenants[0], t0, meter))
    _stop_fleet(fleet)
    provider = fake.stats()
    after = _run_async(stats_snapshot(pg.url))  # before anything else touches the database
    statements = _run_async(_statements(pg.url, TOP_STATEMENTS)) if args.statements else None
    outcome = _run_async(_outcome(pg.url, args, provider, fake, groups))
    results = Results(started_at, loadavg_start, load, groups, watched, fleet, before, after,
                      provider, outcome,
                      report.bracketed_ceiling(ceiling_before,
                                               _ceiling(pg.url, args, "after the run")),
                      _run_async(_server_version(pg.url)),
                      meter.figures(), statements)
    figures = figures_of(args, results)
    _write_report(figures, args)
    return figures


def _run_async(work: Any) -> Any:
    # A plain selector loop, as sendd demo uses: Ctrl-C cancels the running task cleanly.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(work)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- starting and stopping ----------------------------------------------------------------------

def _workdir(stack: ExitStack, keep: bool) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="sendd-bench-"))
    # As root the server runs as the postgres user, which must reach its directory in here.
    workdir.chmod(0o711)
    if keep:
        stack.callback(say, f"work dir kept: {workdir}")
    else:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return workdir


def _redis(stack: ExitStack, workdir: Path) -> str:
    """--redis: a private redis-server for the run (stopped after the daemons); its URL."""
    redis = stack.enter_context(PrivateRedis(base_dir=workdir))
    say(f"Redis on port {redis.port}: every daemon's [redis] url")
    return redis.url


def _provider(args: argparse.Namespace) -> FakeProvider:
    flags = ["--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms),
             "--error-429-rate", str(args.error_429), "--error-503-rate", str(args.error_503),
             "--seed", str(args.seed)]
    try:
        return FakeProvider(*flags)
    except RuntimeError as error:  # it exited before printing its port; its stderr says why
        raise BenchFailed(str(error)) from None


def daemon_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config sections every daemon gets: the daemon's own defaults (not the test suite's
    fast ones) except for what the scenario sets."""
    pipeline = {**PIPELINE_DEFAULTS, "senders": args.senders, "claim_chunk": args.claim_chunk}
    retry = dict(RETRY_DEFAULTS)
    if args.error_429 or args.error_503:
        retry |= FAST_RETRY
    account = {"max_batch": args.batch_size, "single": args.single,
               "timeout": ACCOUNT_TIMEOUT}
    if args.account_rate:
        account["msgs_per_s"] = args.account_rate
    return {"pipeline": pipeline, "retry": retry, "account": account}


def _write_configs(workdir: Path, database_url: str, provider_url: str,
                   args: argparse.Namespace,
                   redis_url: str = "") -> tuple[list[Path], list[int]]:
    settings = daemon_settings(args)
    configs, ports = [], []
    for number in range(1, args.daemons + 1):
        home = workdir / f"daemon-{number}"
        home.mkdir()
        port = free_port()
        # warning, not info: info logs a line per batch, per message in single-message mode.
        daemon = {"log_level": "warning", "http_listen": f"127.0.0.1:{port}",
                  "control_socket": str(home / "control.sock")}
        configs.append(write_config(home / "sendd.toml", database_url, provider_url,
                                    accounts={dataset.ACCOUNT: settings["account"]},
                                    pipeline=settings["pipeline"], retry=settings["retry"],
                                    daemon=daemon, redis_url=redis_url))
        ports.append(port)
    return configs, ports


def _setup(config: Path, tenants: list[str], args: argparse.Namespace) -> None:
    """Migrate and create the tenants with `sendd` itself (the small campaigns' tenants are
    created by _load, with the same code but without a process each)."""
    try:
        setup_database(config, dict.fromkeys(tenants, args.messages + CREDIT_MARGIN))
        if args.slow_tenant is not None:
            sendd_command(config, "tenant", "set", SLOW_TENANT,
                          "--credits", str(args.slow_messages + CREDIT_MARGIN),
                          "--rate", str(args.slow_tenant))
    except AssertionError as error:  # the harness reports a failed command this way
        raise BenchFailed(str(error).splitlines()[0]) from None


def _start_fleet(stack: ExitStack, configs: list[Path], ports: list[int],
                 redis: bool = False) -> tuple[Fleet, float]:
    logs = [config.parent / "daemon.log" for config in configs]
    fleet = Fleet([], ports, logs, [None] * len(configs), [0] * len(configs), redis)
    t0 = time.time()
    for config, log in zip(configs, logs, strict=True):
        daemon = Daemon(config, log)
        stack.callback(daemon.stop)
        fleet.daemons.append(daemon)
    for daemon in fleet.daemons:
        _check_is_python(daemon.process.pid)
    say(f"{len(configs)} daemon(s) started: pids "
        + ", ".join(str(d.process.pid) for d in fleet.daemons))
    return fleet, t0


def _cpu_meter(pg: PrivatePostgres, fleet: Fleet, fake: FakeProvider) -> cpu.CpuMeter:
    """CPU time from now to the end of the run, per process group."""
    postmaster = pg.postmaster_pid()

    def groups() -> dict[str, list[int]]:
        server = cpu.descendants(postmaster) if postmaster is not None else []
        backends = [pid for pid in server if cpu.is_client_backend(pid)]
        return {"postgres_backends": backends,
                "postgres_other": [pid for pid in server if pid not in backends],
                "daemons": [d.process.pid for d in fleet.daemons],
                "fake_provider": [fake.process.pid], "harness": [os.getpid()],
                **({"redis": redis} if redis else {})}

    # --redis: the redis-server, a child of this process (PrivateRedis started it).
    redis = [pid for pid in cpu.descendants(os.getpid()) if _comm(pid) == "redis-server"]

    meter = cpu.CpuMeter(groups)
    meter.start()
    return meter


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _check_is_python(pid: int) -> None:
    """RSS is read from /proc/<pid>: that pid must be the daemon's Python, not a wrapper."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return  # already gone: the run notices and says why
    if "python" not in Path(exe).name:
        raise BenchFailed(f"daemon pid {pid} runs {exe}, not Python: RSS would be wrong")


def _stop_fleet(fleet: Fleet) -> None:
    """Read each daemon's peak RSS, then SIGTERM them all at once and wait for their drains."""
    for i, daemon in enumerate(fleet.daemons):
        fleet.peak_rss_kb[i] = proc_status_kb(daemon.process.pid, "VmHWM") or 0
    for daemon in fleet.daemons:
        daemon.signal(signal.SIGTERM)
    for daemon in fleet.daemons:
        try:
            daemon.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.stop()  # a second SIGTERM stops it at once; then SIGKILL
    say("daemons stopped")


# --- loading ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Groups:
    """The campaigns of a run by role: the main ones (--messages), the small ones
    (--small-campaigns) and the slow tenant's (--slow-tenant). The run's figures are the main
    and small campaigns'; the slow tenant's campaign is watched beside them."""

    main: dataset.Campaigns
    small: dataset.Campaigns | None = None
    slow: dataset.Campaigns | None = None

    @property
    def mixed(self) -> bool:
        return self.small is not None or self.slow is not None

    def run_ids(self) -> list[int]:
        return [*self.main.ids, *(self.small.ids if self.small else ())]

    def labelled(self) -> tuple[list[int], list[str]]:
        """Every campaign id, and each one's group: the arguments of GROUP_SUMS."""
        ids: list[int] = []
        labels: list[str] = []
        for label, campaigns in (("main", self.main), ("small", self.small),
                                 ("slow", self.slow)):
            if campaigns is not None:
                ids += campaigns.ids
                labels += [label] * len(campaigns.ids)
        return ids, labels


async def _load(url: str, args: argparse.Namespace,
                tenants: list[str]) -> tuple[Groups, dict[str, Any]]:
    """The campaigns and their messages, recipients numbered on across the groups; with a slow
    tenant the others are drafts, started once it is sending (_start_beside_slow)."""
    total = all_messages(args)
    sending = args.slow_tenant is None
    conn = await asyncpg.connect(url)
    try:
        tenants_s = await _small_tenants(conn, args)
        main = await dataset.create_campaigns(
            conn, dataset.campaign_tenants(args.campaigns, tenants), sending=sending)
        small = slow = None
        if args.small_campaigns:
            small = await dataset.create_campaigns(
                conn, dataset.tenant_names(args.small_campaigns, "small"), prefix="small",
                sending=sending)
        if args.slow_tenant is not None:
            slow = await dataset.create_campaigns(conn, [SLOW_TENANT], prefix="slow")
        say(f"loading {total:,} messages into {args.campaigns} campaign(s)"
            + (f", {args.small_campaigns:,} small ones of {args.small_size:,}" if small else "")
            + (f", the slow tenant's of {args.slow_messages:,}" if slow else ""))
        insert_s = 0.0
        start = 0
        for campaigns, count, sender in ((main, args.messages, dataset.SENDER),
                                         (small, small_messages(args), dataset.SENDER),
                                         (slow, slow_messages(args), SLOW_SENDER)):
            if campaigns is None:
                continue
            insert_s += await dataset.insert_messages(
                conn, "sendd.message", count, campaigns, reject_rate=args.reject, start=start,
                sender=sender, progress=_load_progress(count))
            start += count
        vacuum_s = await dataset.vacuum_analyze(conn, "sendd.message")
    finally:
        await conn.close()
    say(f"loaded in {insert_s:.1f} s ({total / insert_s:,.0f} rows/s), "
        f"VACUUM ANALYZE {vacuum_s:.1f} s")
    load = {"messages": total, "insert_s": round(insert_s, 2),
            "rows_per_s": round(total / insert_s), "vacuum_analyze_s": round(vacuum_s, 2)}
    if tenants_s is not None:
        load["small_tenants_s"] = round(tenants_s, 2)
    return Groups(main, small, slow), load


async def _small_tenants(conn: asyncpg.Connection, args: argparse.Namespace) -> float | None:
    """Create the small campaigns' tenants as `sendd tenant set` does (its own function, in
    this process: a thousand `sendd` processes would take minutes); the seconds it took."""
    if not args.small_campaigns:
        return None
    say(f"creating {args.small_campaigns:,} tenants for the small campaigns")
    started = time.monotonic()
    for tenant in dataset.tenant_names(args.small_campaigns, "small"):
        await set_tenant(conn, tenant, credits=args.small_size + CREDIT_MARGIN)
    return time.monotonic() - started


def _load_progress(total: int) -> Callable[[int, float], None]:
    def show(rows: int, seconds: float) -> None:
        if rows < total:
            say(f"  {rows:,} of {total:,} rows ({seconds:.1f} s)")
    return show


# --- database statistics ------------------------------------------------------------------------

async def stats_snapshot(url: str) -> dict[str, Any]:
    """Tuple, transaction and WAL counters, once every other connection has closed.

    A backend publishes its statistics when it exits (and when idle, at most once a second),
    and before PostgreSQL 15 through a collector that lags a little: the second of sleep lets
    the backends that just closed (the loader's, the daemons') land in the counters.
    """
    await asyncio.sleep(1.0)
    conn = await asyncpg.connect(url)
    try:
        # One transaction: one consistent snapshot, and one commit to account for.
        async with conn.transaction(readonly=True):
            tables = {r["relname"]: {c: r[c] for c in report.TUPLE_COUNTERS}
                      for r in await conn.fetch(STAT_TABLES)}
            xacts = await conn.fetchval(STAT_XACTS)
            # pg_stat_wal is PostgreSQL 14+; the schema supports 13.
            has_wal = await conn.fetchval("SELECT to_regclass('pg_stat_wal') IS NOT NULL")
            wal = await conn.fetchrow(STAT_WAL) if has_wal else None
    finally:
        await conn.close()
    return {"tables": tables, "xact_commit": xacts,
            "wal_records": wal and wal["wal_records"], "wal_bytes": wal and int(wal["wal_bytes"])}


async def _statements(url: str, sql: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return [dict(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()


class CountingConnection:
    """An asyncpg connection that counts its statements: each one outside a transaction block
    is a transaction of its own, to be subtracted from the daemons' transaction count."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements = 0

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self.statements += 1
        return await self.conn.execute(sql, *args)


# --- watching the run -----------------------------------------------------------------------------

@dataclasses.dataclass
class Watched:
    series: list[dict[str, Any]]
    total: int
    end_s: float  # from the origin to the last (main or small) campaign's finished_at
    transactional_inserted: int
    bench_statements: int  # the harness's own transactions between the snapshots
    # The Unix time the figures count from: the daemons' start, or with a slow tenant the main
    # campaigns' start, `origin_s` seconds after the daemons'.
    origin: float
    origin_s: float


async def _watch(url: str, fleet: Fleet, groups: Groups, args: argparse.Namespace,
                 tenant: str, t0: float, meter: cpu.CpuMeter) -> Watched:
    """Sample until every campaign message is done, trickling transactional messages in (from
    the daemons' readiness, or with a slow tenant from the main campaigns' start, until the
    slow tenant's campaign is done too); then wait for the transactional messages."""
    conn = CountingConnection(await asyncpg.connect(url))
    trickle_conn = CountingConnection(await asyncpg.connect(url))
    ready, started, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    go = started if groups.slow is not None else ready
    trickle = asyncio.create_task(
        _trickle(trickle_conn, args.transactional, tenant, go, stop))
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            readiness = asyncio.create_task(_watch_readiness(http, fleet, t0, ready))
            try:
                origin = t0
                if groups.slow is not None:
                    origin = await _start_beside_slow(conn, fleet, groups, readiness, ready, t0)
                    meter.start()  # the CPU of the main campaigns' run, not of the lead
                    started.set()
                series = await _sample_until_done(conn, http, fleet, groups, origin,
                                                  readiness, meter)
            finally:
                readiness.cancel()
        if groups.slow is not None:
            # The trickle goes on beside the slow tenant's backlog alone (reported apart).
            await _wait_campaigns(conn, fleet, list(groups.slow.ids), "the slow tenant's")
        stop.set()
        inserted = await trickle
        if inserted:
            await _wait_transactional(conn, fleet)
        finished = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at)) FROM sendd.campaign "
            "WHERE id = ANY($1::bigint[])", groups.run_ids())
    finally:
        trickle.cancel()
        await conn.conn.close()
        await trickle_conn.conn.close()
    end_s = float(finished) - origin if finished is not None else series[-1]["t"]
    # +1: the "before" statistics snapshot's own transaction commits after it read the count.
    statements = conn.statements + trickle_conn.statements + 1
    return Watched(series, series[-1]["done"] + series[-1]["backlog"], end_s, inserted,
                   statements, origin, round(origin - t0, 3))


async def _start_beside_slow(conn: CountingConnection, fleet: Fleet, groups: Groups,
                             readiness: asyncio.Task[None], ready: asyncio.Event,
                             t0: float) -> float:
    """Once every daemon is ready and the slow tenant's first message is done, wait
    SLOW_LEAD_S more and start the other campaigns; the Unix time they were started."""
    assert groups.slow is not None
    slow_ids = list(groups.slow.ids)
    deadline = time.monotonic() + READY_TIMEOUT + STALL_TIMEOUT
    first_done: float | None = None
    while first_done is None or time.monotonic() - first_done < SLOW_LEAD_S:
        if readiness.done():
            readiness.result()  # raises if a daemon never got ready
        fleet.alive_or_fail()
        if first_done is None and ready.is_set():
            if (await conn.fetchrow(CAMPAIGN_SUMS, slow_ids))["done"]:
                first_done = time.monotonic()
        if time.monotonic() > deadline:
            raise BenchFailed(f"the slow tenant sent nothing in {READY_TIMEOUT + STALL_TIMEOUT:g}"
                              f" s: {log_tail(fleet.logs[0])}")
        await asyncio.sleep(0.05)
    origin = time.time()
    row = await conn.fetchrow(START_CAMPAIGNS, groups.run_ids())
    slow = await conn.fetchrow(CAMPAIGN_SUMS, slow_ids)
    say(f"  {origin - t0:6.1f} s  the slow tenant has {slow['done']:,} of {slow['total']:,} "
        f"done: {row['started']:,} campaign(s) started beside it; times from here on count "
        "from their start")
    return origin


async def _sample_until_done(conn: CountingConnection, http: httpx.AsyncClient, fleet: Fleet,
                             groups: Groups, origin: float, readiness: asyncio.Task[None],
                             meter: cpu.CpuMeter) -> list[dict[str, Any]]:
    """The time series (and the CPU meter's samples), until every main and small campaign
    message is done; times from `origin`."""
    series: list[dict[str, Any]] = []
    last_progress = last_change = time.monotonic()
    while True:
        point = await _sample(conn, http, fleet, groups, origin)
        meter.sample()
        if readiness.done():
            readiness.result()  # raises if a daemon never got ready
        if series and point["done"] != series[-1]["done"]:
            last_change = time.monotonic()
        series.append(point)
        if point["backlog"] <= 0:
            _progress_line(series)
            return series
        fleet.alive_or_fail()
        if time.monotonic() - last_change > STALL_TIMEOUT:
            raise BenchFailed(f"no message done for {STALL_TIMEOUT:g} s "
                              f"({point['done']:,} of {point['done'] + point['backlog']:,} "
                              f"done): {log_tail(fleet.logs[0])}")
        if time.monotonic() - last_progress >= PROGRESS_EVERY:
            _progress_line(series)
            last_progress = time.monotonic()
        await asyncio.sleep(max(0.0, origin + len(series) * SAMPLE_INTERVAL - time.time()))


async def _sample(conn: CountingConnection, http: httpx.AsyncClient, fleet: Fleet,
                  groups: Groups, origin: float) -> dict[str, Any]:
    rows = await conn.fetch(GROUP_SUMS, *groups.labelled())
    t = time.time() - origin
    daemons = await asyncio.gather(*(_daemon_state(http, fleet, i)
                                     for i in range(len(fleet.daemons))))
    backlog = {r["label"]: r["total"] - r["done"] for r in rows}
    running = [r for r in rows if r["label"] != "slow"]
    point = {"t": round(t, 3), "done": sum(r["done"] for r in running),
             "backlog": sum(r["total"] - r["done"] for r in running),
             "fill": report.channel_fill(daemons), "daemons": daemons}
    if groups.mixed:
        point["group_backlog"] = backlog
    return point


async def _daemon_state(http: httpx.AsyncClient, fleet: Fleet, i: int) -> dict[str, Any]:
    metrics = await _get(http, f"http://127.0.0.1:{fleet.ports[i]}/metrics")
    state = {"rss_kb": proc_status_kb(fleet.daemons[i].process.pid, "VmRSS"),
             "channels": report.parse_channels(metrics or "")}
    if fleet.redis:
        state["redis"] = report.parse_redis(metrics or "")
    return state


async def _watch_readiness(http: httpx.AsyncClient, fleet: Fleet, t0: float,
                           ready: asyncio.Event) -> None:
    """Note when each daemon first answers /readyz, polling often (the transactional trickle
    starts then); set `ready` once all have."""
    while None in fleet.ready_s:
        for i, port in enumerate(fleet.ports):
            if fleet.ready_s[i] is not None:
                continue
            if await _get(http, f"http://127.0.0.1:{port}/readyz") is not None:
                fleet.ready_s[i] = round(time.time() - t0, 3)
        if time.time() - t0 > READY_TIMEOUT and None in fleet.ready_s:
            slow = fleet.ready_s.index(None)
            raise BenchFailed(f"daemon {slow + 1} not ready after {READY_TIMEOUT:g} s: "
                              f"{log_tail(fleet.logs[slow])}")
        await asyncio.sleep(READY_POLL)
    ready.set()


async def _get(http: httpx.AsyncClient, url: str) -> str | None:
    """The body of a 200 answer, else None (not listening yet, busy, draining)."""
    try:
        response = await http.get(url)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _progress_line(series: list[dict[str, Any]]) -> None:
    point = series[-1]
    total = point["done"] + point["backlog"]
    earlier = next((p for p in reversed(series) if point["t"] - p["t"] >= PROGRESS_EVERY),
                   series[0])
    span = point["t"] - earlier["t"]
    rate = (point["done"] - earlier["done"]) / span if span > 0 else 0.0
    rss = ", ".join(f"{(d['rss_kb'] or 0) / 1024:.0f}" for d in point["daemons"])
    groups = point.get("group_backlog") or {}
    left = "".join(f"  {label} left {groups[label]:,}" for label in ("main", "small", "slow")
                   if label in groups)
    say(f"  {point['t']:6.1f} s  done {point['done']:,} of {total:,} "
        f"({100 * point['done'] / max(total, 1):.0f}%)  backlog {point['backlog']:,}  "
        f"{rate:,.0f} msgs/s  RSS {rss} MiB{left}")


async def _trickle(conn: CountingConnection, rate: float, tenant: str, ready: asyncio.Event,
                   stop: asyncio.Event) -> int:
    """Insert transactional messages one by one at `rate` a second from `ready` (every daemon
    up: the latency is the pipeline's, not the daemons' start-up; with a slow tenant, the main
    campaigns started) until `stop`; the count.

    Times are absolute (start + k / rate), so a slow insert is caught up, not lost.
    """
    if rate <= 0:
        return 0
    await _first(ready, stop)
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), 0
    while not stop.is_set():
        await conn.execute(INSERT_TRANSACTIONAL, tenant, dataset.ACCOUNT, dataset.SENDER,
                           f"+30699{sent % 10_000_000:07d}", "Your code is 1234",
                           TRANSACTIONAL_PRIORITY)
        sent += 1
        delay = start + sent / rate - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
    return sent


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of the events is set."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _wait_campaigns(conn: CountingConnection, fleet: Fleet, ids: list[int],
                          whose: str) -> None:
    """Wait until every message of the campaigns is done (the slow tenant's, at its rate)."""
    last_progress = last_change = time.monotonic()
    last_done = -1
    while True:
        row = await conn.fetchrow(CAMPAIGN_SUMS, ids)
        if row["done"] >= row["total"]:
            return
        fleet.alive_or_fail()
        if row["done"] != last_done:
            last_done, last_change = row["done"], time.monotonic()
        elif time.monotonic() - last_change > STALL_TIMEOUT:
            raise BenchFailed(f"{whose} campaign: no message done for {STALL_TIMEOUT:g} s "
                              f"({row['done']:,} of {row['total']:,}): "
                              f"{log_tail(fleet.logs[0])}")
        if time.monotonic() - last_progress >= PROGRESS_EVERY:
            say(f"  waiting for {whose} campaign: {row['done']:,} of {row['total']:,} done")
            last_progress = time.monotonic()
        await asyncio.sleep(SAMPLE_INTERVAL)


async def _wait_transactional(conn: CountingConnection, fleet: Fleet) -> None:
    """Wait for the last transactional messages; ones still pending show up as lost."""
    deadline = time.monotonic() + TRANSACTIONAL_TIMEOUT
    while await conn.fetchval(TRANSACTIONAL_PENDING):
        fleet.alive_or_fail()
        if time.monotonic() > deadline:
            say(f"transactional messages still pending after {TRANSACTIONAL_TIMEOUT:g} s")
            return
        await asyncio.sleep(0.1)


def proc_status_kb(pid: int, field: str) -> int | None:
    """A kB field of /proc/<pid>/status (VmRSS: resident now, VmHWM: the peak), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# --- after the run --------------------------------------------------------------------------------

async def _outcome(url: str, args: argparse.Namespace, provider: dict[str, Any],
                   fake: FakeProvider, groups: Groups) -> dict[str, Any]:
    """Final statuses, lost, duplicates, provider versus database, ledger, transactional, and
    where the slow tenant's messages were when the main campaigns started and finished."""
    conn = await asyncpg.connect(url)
    try:
        rows = [dict(r) for r in await conn.fetch(STATUS_COUNTS)]
        debited = await conn.fetchval(LEDGER_DEBITED)
        created = {r["reference"]: r["created"] for r in await conn.fetch(TRANSACTIONAL_SENT)}
        campaigns = [dict(r) for r in await conn.fetch(CAMPAIGN_ROWS)]
        slow = await _slow_progress(conn, groups, campaigns)
    finally:
        await conn.close()
    accepted = fake.accepted_at(list(created)) if created else {}
    latencies = [(at, (accepted[ref] - at) * 1000) for ref, at in created.items()
                 if accepted.get(ref) is not None]
    # The groups' recipients are numbered on from one another (_load): one telescoping sum.
    expected = dataset.expected_rejections(all_messages(args), args.reject)
    return {**report.summarize_statuses(rows, expected), "ledger_debited": debited,
            "duplicates": provider["duplicate_references"],
            "provider_accepted": provider["accepted"], "provider_rejected": provider["rejected"],
            "campaigns": campaigns, "transactional_latencies_ms": latencies,
            "slow_progress": slow}


async def _slow_progress(conn: asyncpg.Connection, groups: Groups,
                         campaigns: list[dict[str, Any]]) -> dict[str, int] | None:
    """The slow tenant's messages: sent, and done before, while and after the main campaigns
    ran (from their first start to their last finish, the database's timestamps)."""
    if groups.slow is None:
        return None
    main = [c for c in campaigns if c["id"] in set(groups.main.ids)]
    starts = [c["started_at"] for c in main if c["started_at"] is not None]
    ends = [c["finished_at"] for c in main if c["finished_at"] is not None]
    if not starts or len(ends) < len(main):
        return None
    row = await conn.fetchrow(SLOW_PROGRESS, list(groups.slow.ids), min(starts), max(ends))
    return dict(row)


def _ceiling(url: str, args: argparse.Namespace, when: str) -> dict[str, Any] | None:
    """The ceiling's figures; a failed measurement is reported, it does not sink the run."""
    if not args.ceiling_messages:
        return None
    say(f"measuring the bare-PostgreSQL ceiling {when} with {args.ceiling_messages:,} rows")
    try:
        result = _run_async(ceiling.measure(url, args.ceiling_messages, args.claim_chunk))
    except (ceiling.CeilingFailed, asyncpg.PostgresError) as error:
        say(f"  the ceiling could not be measured: {error}")
        return {"error": str(error)}
    for trial in result["trials"]:
        say(f"  {trial['connections']} connection(s): {trial['msgs_per_s']:,.0f} msgs/s")
    return result


def machine_info(server_version: str, loadavg_start: tuple[float, ...]) -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpu_model": _cpu_model(),
            "memory_gib": round(_meminfo_kb("MemTotal") / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "postgresql": server_version,
            "loadavg_start": " ".join(f"{x:.2f}" for x in loadavg_start),
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kb(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclasses.dataclass
class Results:
    """Everything a run gathered, in the order it gathered it."""

    started_at: datetime
    loadavg_start: tuple[float, ...]
    load: dict[str, Any]
    groups: Groups
    watched: Watched
    fleet: Fleet
    before: dict[str, Any]
    after: dict[str, Any]
    provider: dict[str, Any]
    outcome: dict[str, Any]
    ceiling: dict[str, Any] | None
    server_version: str
    cpu: dict[str, float]
    statements: list[dict[str, Any]] | None


def figures_of(args: argparse.Namespace, r: Results) -> dict[str, Any]:
    """report.json: the scenario, the figures, the checks and the time series."""
    series = report.with_throughput(report.with_end(r.watched.series, r.watched.end_s))
    sustained = report.sustained_rate(series, r.watched.total)
    outcome = dict(r.outcome)
    # (created, latency) pairs: those created after the main campaigns finished waited
    # beside the slow tenant's backlog alone.
    timed = outcome.pop("transactional_latencies_ms")
    main_end = r.watched.origin + r.watched.end_s
    latencies = [ms for _, ms in timed]
    beside_slow = [ms for created, ms in timed if created > main_end]
    mix = mix_of(args, r.groups, r.watched, outcome.pop("slow_progress"), outcome["campaigns"],
                 r.provider)
    exit_codes = [d.process.returncode for d in r.fleet.daemons]
    limits = limits_of(args, r.provider, series)
    problems = (report.problems_of(outcome, exit_codes) + report.mix_problems(mix)
                + report.limit_problems(limits))
    best = (r.ceiling or {}).get("msgs_per_s")
    # The database's work covers the slow tenant's messages too; the CPU meter (with a slow
    # tenant, from the main campaigns' start to their end) those it did meanwhile.
    slow = (mix or {}).get("slow") or {}
    processed = r.watched.total + r.watched.transactional_inserted
    return {
        "date": r.started_at.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(r.server_version, r.loadavg_start),
        "scenario": scenario_of(args), "config": daemon_settings(args), "load": r.load,
        "run": {"messages": r.watched.total, "wall_s": round(r.watched.end_s, 3),
                "msgs_per_s": round(r.watched.total / r.watched.end_s, 1),
                "sustained": sustained, "daemon_ready_s": r.fleet.ready_s,
                "from": MAIN_START if r.groups.slow is not None else DAEMON_START,
                "from_s": r.watched.origin_s},
        "transactional": {"rate": args.transactional,
                          "inserted": r.watched.transactional_inserted,
                          **report.latency_summary(latencies), "note": TRANSACTIONAL_NOTE,
                          "beside_slow_alone": (report.latency_summary(beside_slow)
                                                if r.groups.slow is not None else None)},
        "daemons": [{"pid": d.process.pid, "peak_rss_kb": r.fleet.peak_rss_kb[i],
                     "exit_code": exit_codes[i], "ready_s": r.fleet.ready_s[i]}
                    for i, d in enumerate(r.fleet.daemons)],
        "db_writes": report.db_writes(
            r.before, r.after, processed + slow_messages(args),
            bench_rows=r.watched.transactional_inserted, bench_xacts=r.watched.bench_statements),
        "db_stats": {"before": r.before, "after": r.after},
        "statements": report.statement_costs(r.statements, r.watched.total),
        "cpu": report.cpu_split(r.cpu, processed + slow.get("done_during_main", 0)),
        "mix": mix, "limits": limits, "outcome": outcome, "provider": r.provider,
        "ceiling": r.ceiling, "ratio": report.ratio(sustained["msgs_per_s"], best),
        "ok": not problems, "problems": problems,
        "series": series,
    }


def limits_of(args: argparse.Namespace, provider: dict[str, Any],
              series: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json's "limits": the provider's peaks per API key and per sender beside the
    limits the daemons were given, and whether they shared them through Redis."""
    return report.limits_of(
        provider, daemons=args.daemons, redis=args.redis,
        keys={API_KEY: {"account": dataset.ACCOUNT, "msgs_per_s": args.account_rate or None,
                        "reqs_per_s": None}},
        senders={SLOW_SENDER: {"owner": f"tenant {SLOW_TENANT}", "msgs_per_s": args.slow_tenant},
                 dataset.SENDER: {"owner": "the main campaign; transactional, small campaigns",
                                  "msgs_per_s": None}},
        redis_state=report.redis_state(series) if args.redis else None)


DAEMON_START = "the daemons' start"
MAIN_START = "the main campaign's start (the daemons running, the slow tenant sending)"


def mix_of(args: argparse.Namespace, groups: Groups, watched: Watched,
           slow_progress: dict[str, int] | None, campaigns: list[dict[str, Any]],
           provider: dict[str, Any]) -> dict[str, Any] | None:
    """report.json's "mix": the main campaigns' finish, the slow tenant's rate and progress,
    each small campaign's finish; None when the run had neither."""
    if not groups.mixed:
        return None
    finished = {c["id"]: c["finished_epoch"] for c in campaigns}
    tenants = {c["id"]: c["tenant_id"] for c in campaigns}
    main = report.finish_times([finished.get(i) for i in groups.main.ids], watched.origin)
    main_s = main["last_s"]
    mix: dict[str, Any] = {
        "from": MAIN_START if groups.slow is not None else DAEMON_START,
        "main": {"campaigns": len(groups.main.ids), "messages": args.messages,
                 "finished_s": main_s,
                 "msgs_per_s": round(args.messages / main_s, 1) if main_s else None},
    }
    if groups.slow is not None:
        peaks = provider.get("max_msgs_per_1s_by_sender") or {}
        slow_end = report.finish_times([finished.get(i) for i in groups.slow.ids],
                                       watched.origin)["last_s"]
        mix["slow"] = {"tenant": SLOW_TENANT, "sender": SLOW_SENDER, "lead_s": SLOW_LEAD_S,
                       **report.slow_tenant_figures(args.slow_tenant, args.daemons,
                                                    slow_progress, peaks.get(SLOW_SENDER),
                                                    main_s, slow_end, shared=args.redis),
                       "shared": args.redis}
    if groups.small is not None:
        times = report.finish_times([finished.get(i) for i in groups.small.ids],
                                    watched.origin, before=main_s)
        mix["small"] = {"campaigns": len(groups.small.ids), "size": args.small_size,
                        "tenants": len(set(groups.small.tenants)), **times,
                        "per_campaign": report.per_campaign(groups.small.ids, tenants,
                                                            finished, watched.origin)}
    return mix


def _write_report(figures: dict[str, Any], args: argparse.Namespace,
                  chart: bool = True) -> None:
    report.write_json(figures, args.out / "report.json")
    (args.out / "report.md").write_text(report.markdown(figures))
    if chart and not args.no_chart:
        s = figures["scenario"]
        title = (f"{s['messages']:,} messages, {s['daemons']} daemon(s), batch {s['batch_size']}"
                 f", provider {s['latency_ms']:g} ms")
        if s.get("redis"):
            title += ", limits shared through Redis"
        if s.get("account_rate"):
            title += f", account at {s['account_rate']:,} msgs/s"
        if s["small_campaigns"]:
            title += f", {s['small_campaigns']:,} small campaigns of {s['small_size']:,}"
        since = "the daemons started"
        if s["slow_tenant"] is not None:
            title += f", a tenant at {s['slow_tenant']:,} msgs/s"
            since = "the main campaign started"
        report.write_chart(figures["series"], args.out / "chart.png", title, since)


if __name__ == "__main__":
    raise SystemExit(main())
