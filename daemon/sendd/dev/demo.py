"""`sendd demo`: one campaign end to end on this machine, with nothing set up beforehand.

A private PostgreSQL, the fake provider and the daemon are started in a temp dir, a campaign
is queued and watched to completion, and everything is stopped again, whatever happens. The
demo process itself talks to the database with plain asyncpg under asyncio: it is a short
script around subprocesses, and the query helpers (migrate, tenants, enqueue) take any
asyncpg-like connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import asyncpg

import sendd
from sendd.commands import tenants
from sendd.commands.enqueue import EnqueueRequest, enqueue
from sendd.core.segments import count_segments
from sendd.db import migrate
from sendd.dev import interrupts
from sendd.dev.pgserver import PrivatePostgres, ServerError, free_port
from sendd.errors import UserError

TENANT = "demo"
ACCOUNT = "demo"
API_KEY = "test-key"
TEXT = "Hello from the sendd demo"
PROVIDER_LATENCY_MS = 20
# Durable (fsync on), as in production, since it costs less than half the speed: 100,000
# messages on a busy 2-CPU machine ran at 4,700-7,800 msg/s durable, 6,700-11,800 without.
DURABLE = True
POLL_INTERVAL = 0.5  # seconds between campaign queries
PLAIN_PROGRESS_EVERY = 3.0  # seconds between progress lines when stderr is not a terminal
STALL_TIMEOUT = 120.0  # no progress for this long means the daemon is stuck
CONNECT_TIMEOUT = 10.0
PROVIDER_STOP_TIMEOUT = 10.0
DAEMON_STOP_TIMEOUT = 60.0  # the daemon drains for up to stop_timeout (30 s) before exiting
LOG_TAIL_LINES = 15
CAMPAIGN_SQL = ("SELECT status, pause_reason, sent, failed, finished_at "
                "FROM sendd.campaign WHERE id = $1")

T = TypeVar("T")


class DemoFailed(Exception):
    """The demo cannot go on; str() is one line, `log` a log whose tail explains it."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Outcome:
    sent: int
    failed: int
    elapsed: float  # seconds from daemon start to campaign completion


@dataclass
class Started:
    """What the demo started, for the summary and for stopping it."""

    workdir: Path
    postgres: PrivatePostgres
    provider: subprocess.Popen[str] | None = None
    provider_url: str = ""
    daemon: subprocess.Popen[bytes] | None = None
    daemon_log: Path | None = None
    postgres_pid: int | None = None


def run_demo(messages: int, *, durable: bool = DURABLE) -> int:
    """Run the demo; returns the exit code (0, 1 on failure, 130 on Ctrl-C)."""
    stack = ExitStack()
    code = 130
    try:
        with interrupts.stop_signals_interrupt():
            code = _run(stack, messages, durable)
    except ServerError as error:
        if not interrupts.during_interrupt(error):
            raise UserError(str(error)) from None
    except DemoFailed as error:
        _report_failure(error)
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        _stop_everything(stack)
    if code == 130:
        print("demo interrupted", file=sys.stderr)
    return code


def _run(stack: ExitStack, messages: int, durable: bool) -> int:
    progress = Progress(sys.stderr)
    started = _start_services(stack, durable, progress)
    config = _write_config(started)
    began = time.monotonic()
    campaign_id = _run_async(_prepare(started.postgres.url, started.workdir, messages))
    progress.note(f"queued {messages:,} messages in {time.monotonic() - began:.1f} s")
    daemon_start = time.time()
    daemon = _start_daemon(stack, started, config)
    progress.note(f"daemon started (pid {daemon.pid}), log in {started.daemon_log}")
    outcome = _run_async(_watch(started, campaign_id, messages, daemon_start, progress))
    _drain_daemon(started)
    stats = _provider_stats(started.provider_url)
    _stop_everything(stack)  # before the summary, so that "stopped" is true when printed
    _print_summary(messages, durable, outcome, stats, started)
    return 0


# --- starting and stopping --------------------------------------------------------------------

def _start_services(stack: ExitStack, durable: bool, progress: Progress) -> Started:
    workdir = Path(tempfile.mkdtemp(prefix="sendd-demo-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    # As root the server runs as the postgres user, which must reach its directory in here.
    workdir.chmod(0o711)
    postgres = stack.enter_context(PrivatePostgres(durable=durable, base_dir=workdir))
    started = Started(workdir, postgres, postgres_pid=postgres.postmaster_pid())
    _start_provider(stack, started)
    mode = "durable" if durable else "non-durable"
    assert started.provider is not None
    progress.note(f"PostgreSQL ({mode}) on port {postgres.port} (pid {started.postgres_pid}), "
                  f"fake provider at {started.provider_url} (pid {started.provider.pid}), "
                  f"work dir {workdir}")
    return started


def _child_env() -> dict[str, str]:
    """Our environment, minus SENDD_* (it would override the demo's config: a stray
    SENDD_DATABASE__URL would point the demo daemon at a real database), plus this package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDD_")}
    package_root = str(Path(sendd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _spawn(stack: ExitStack, argv: list[str], log: Path, stdout: Any,
           stop_timeout: float) -> subprocess.Popen[Any]:
    """A child in its own session, so a Ctrl-C at the terminal reaches only the demo,
    which then stops the children in order (the daemon first, while the database is up)."""
    log_file = stack.enter_context(log.open("ab"))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log_file,
                            env=_child_env(), start_new_session=True,
                            text=stdout is subprocess.PIPE)
    stack.callback(_stop_process, proc, stop_timeout)
    return proc


def _start_provider(stack: ExitStack, started: Started) -> None:
    log = started.workdir / "fakeprovider.log"
    argv = [sys.executable, "-m", "sendd.dev.fakeprovider", "--port", "0",
            "--latency-ms", str(PROVIDER_LATENCY_MS)]
    started.provider = _spawn(stack, argv, log, subprocess.PIPE, PROVIDER_STOP_TIMEOUT)
    assert started.provider.stdout is not None
    line = started.provider.stdout.readline()  # {"port": N} once it listens
    if not line:
        raise DemoFailed("the fake provider did not start", log)
    started.provider_url = f"http://127.0.0.1:{json.loads(line)['port']}"


def _start_daemon(stack: ExitStack, started: Started, config: Path) -> subprocess.Popen[bytes]:
    started.daemon_log = started.workdir / "daemon.log"
    argv = [sys.executable, "-m", "sendd", "--config", str(config), "run"]
    started.daemon = _spawn(stack, argv, started.daemon_log, subprocess.DEVNULL,
                            DAEMON_STOP_TIMEOUT)
    return started.daemon


def _drain_daemon(started: Started) -> None:
    """SIGTERM: the daemon finishes what is in flight and exits 0."""
    daemon = started.daemon
    assert daemon is not None
    daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(DAEMON_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"the daemon did not stop within {DAEMON_STOP_TIMEOUT:g} s of SIGTERM",
                         started.daemon_log) from None
    if code != 0:
        raise DemoFailed(f"the daemon exited {code} after SIGTERM", started.daemon_log)


def _stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _stop_everything(stack: ExitStack) -> None:
    """Unwind the stack: daemon, provider, PostgreSQL, temp dir (sendd.dev.interrupts)."""
    interrupts.unwind(stack, "sendd demo")


# --- configuration and database -----------------------------------------------------------

def _run_async(work: Coroutine[Any, Any, T]) -> T:
    # A plain asyncio loop: once trio_asyncio is imported (sendd.db does), asyncio.run would
    # build a trio-hosted loop, which a Ctrl-C can leave half closed.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(work)


def _write_config(started: Started) -> Path:
    # The control socket and HTTP port are the demo's own, so a sendd already running on
    # this machine is never disturbed.
    values = {
        "database": {"url": started.postgres.url},
        "daemon": {"log_level": "warning",
                   "control_socket": str(started.workdir / "control.sock"),
                   "http_listen": f"127.0.0.1:{free_port()}"},
        f"accounts.{ACCOUNT}": {"kind": "mitto", "base_url": started.provider_url,
                                "api_key": API_KEY},
    }
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    path = started.workdir / "sendd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_recipients(workdir: Path, messages: int) -> Path:
    path = workdir / "recipients.txt"
    with path.open("w") as out:
        out.writelines(f"+3069{i:08d}\n" for i in range(messages))  # valid Greek mobiles
    return path


async def _prepare(url: str, workdir: Path, messages: int) -> int:
    """Migrate, create the tenant with enough credits, queue the campaign; its id."""
    recipients = _write_recipients(workdir, messages)
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        await migrate.migrate(conn)
        await tenants.set_tenant(conn, TENANT, credits=messages * count_segments(TEXT))
        with recipients.open(encoding="utf-8", newline="") as stream:
            request = EnqueueRequest(tenant=TENANT, text=TEXT, account=ACCOUNT, sender="sendd",
                                     recipients=stream, source_name=str(recipients),
                                     name="demo")
            result = await enqueue(conn, request)
    finally:
        await conn.close()
    return result.campaign_id


# --- watching ----------------------------------------------------------------------------------

async def _watch(started: Started, campaign_id: int, total: int, daemon_start: float,
                 progress: Progress) -> Outcome:
    """Poll the campaign row until it completes; fail if the daemon dies or stalls."""
    conn = await asyncpg.connect(started.postgres.url, timeout=CONNECT_TIMEOUT)
    try:
        last_done, last_change = -1, time.monotonic()
        while True:
            row = await conn.fetchrow(CAMPAIGN_SQL, campaign_id)
            elapsed = time.time() - daemon_start
            progress.show(_progress_line(row["sent"], row["failed"], total, elapsed))
            if row["status"] == "completed":
                progress.end()
                return _outcome(row, daemon_start)
            _check_alive(started, row)
            done = row["sent"] + row["failed"]
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                raise DemoFailed(f"no progress for {STALL_TIMEOUT:g} s", started.daemon_log)
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        progress.end()
        await conn.close()


def _check_alive(started: Started, row: asyncpg.Record) -> None:
    assert started.daemon is not None
    code = started.daemon.poll()
    if code is not None:
        raise DemoFailed(f"the daemon exited early (code {code})", started.daemon_log)
    if row["status"] in ("paused", "cancelled"):
        reason = f": {row['pause_reason']}" if row["pause_reason"] else ""
        raise DemoFailed(f"the campaign was {row['status']}{reason}", started.daemon_log)


def _outcome(row: asyncpg.Record, daemon_start: float) -> Outcome:
    # finished_at is stamped by the database in the completing transaction, so it is not
    # late by a poll interval; both clocks are this machine's.
    finished: datetime | None = row["finished_at"]
    end = finished.timestamp() if finished is not None else time.time()
    return Outcome(row["sent"], row["failed"], max(end - daemon_start, 1e-3))


def _progress_line(sent: int, failed: int, total: int, elapsed: float) -> str:
    rate = sent / elapsed if elapsed > 0 else 0.0
    return (f"sent {sent:,}  failed {failed:,}  of {total:,}  "
            f"{rate:,.0f} msg/s  {elapsed:.1f} s")


class Progress:
    """One live line on a terminal (rewritten with \\r), else a line every few seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._open = False  # a \r line is on screen and needs its newline
        self._last_plain = float("-inf")

    def show(self, line: str) -> None:
        if self.tty:
            self._write(f"\r{line}\x1b[K")
            self._open = True
        elif time.monotonic() - self._last_plain >= PLAIN_PROGRESS_EVERY:
            self._write(line + "\n")
            self._last_plain = time.monotonic()

    def note(self, text: str) -> None:
        self.end()
        self._write(f"sendd demo: {text}\n")

    def end(self) -> None:
        if self._open:
            self._write("\n")
            self._open = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# --- results -----------------------------------------------------------------------------------

def _provider_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as response:
        return json.load(response)


def _print_summary(messages: int, durable: bool, outcome: Outcome, stats: dict[str, Any],
                   started: Started) -> None:
    assert started.daemon is not None and started.provider is not None
    mode = "durable" if durable else "non-durable"
    rows = [
        ("sent", f"{outcome.sent:,}"),
        ("failed", f"{outcome.failed:,}"),
        ("elapsed", f"{outcome.elapsed:.2f} s (daemon start to campaign completed)"),
        ("throughput", f"{outcome.sent / outcome.elapsed:,.0f} messages/s"),
        ("provider", f"accepted {stats['accepted']:,}, "
                     f"duplicate references {stats['duplicate_references']:,}"),
        ("daemon log", f"{started.daemon_log} (removed with the work dir)"),
        ("stopped", f"daemon pid {started.daemon.pid}, fake provider pid "
                    f"{started.provider.pid}, postgres pid {started.postgres_pid}"),
    ]
    print(f"sendd demo: {messages:,} messages, PostgreSQL {mode}, provider latency "
          f"{PROVIDER_LATENCY_MS} ms")
    for label, value in rows:
        print(f"  {label:<12} {value}")


def _report_failure(error: DemoFailed) -> None:
    print(f"sendd demo: {error}", file=sys.stderr)
    if error.log is None:
        return
    tail = _log_lines(error.log)
    if tail:
        print(f"last lines of {error.log}:\n{tail}", file=sys.stderr)
    else:
        print(f"{error.log} is empty", file=sys.stderr)


def _log_lines(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])
