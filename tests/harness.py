"""Real processes for end-to-end tests: the fake provider, `sendd` commands and daemons.

Everything here is plain synchronous code around subprocesses, so tests read top to bottom:
start a provider, configure, enqueue, run a daemon, wait, check the rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from sendd.commands.tenants import set_tenant
from sendd.db import migrate
from sendd.dev.pgserver import PrivatePostgres, free_port

REPO = Path(__file__).resolve().parents[1]
SENDD = [sys.executable, "-m", "sendd"]
API_KEY = "test-key"

# Fast settings for tests: short leases, short retries, small batches to exercise batching.
TEST_PIPELINE = {
    "claim_chunk": 500, "poll_interval": 0.2, "linger_ms": 10, "senders": 4,
    "writer_flush_ms": 10, "lease_seconds": 6.0, "settle_seconds": 5.0,
}
TEST_RETRY = {"max_attempts": 5, "base_delay": 0.05, "max_delay": 0.5, "jitter": 0.2}


def env() -> dict[str, str]:
    """The environment for child processes: this checkout's package, no stray SENDD_ vars."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SENDD_")}
    clean["PYTHONPATH"] = str(REPO / "daemon")
    return clean


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1):
    """Poll until predicate() is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stays(predicate: Callable[[], Any], seconds: float, what: str, interval: float = 0.1) -> None:
    """Check predicate() for `seconds`, every `interval`: fail as soon as it stops holding.

    For what must *not* happen (nothing more sent after a pause), where a bare sleep and one
    check at the end would say less and fail later."""
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            raise AssertionError(f"{what} stopped holding after "
                                 f"{seconds - (deadline - time.monotonic()):.1f}s")
        if time.monotonic() >= deadline:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# --- the message state machine, written out independently of the schema's SQL -----------------

STATUSES = ["queued", "sending", "sent", "delivered", "undelivered", "failed", "unknown",
            "cancelled"]
# The whole allowed set: every other (old, new) pair must be refused.
ALLOWED = {
    ("queued", "sending"), ("queued", "cancelled"),
    ("sending", "queued"), ("sending", "sent"), ("sending", "failed"),
    ("sending", "unknown"), ("sending", "cancelled"),
    ("unknown", "sent"), ("unknown", "queued"), ("unknown", "failed"),
    ("unknown", "delivered"), ("unknown", "undelivered"),
    ("sent", "delivered"), ("sent", "undelivered"),
}


def assert_user_error(result: subprocess.CompletedProcess[str], *mentions: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr naming `mentions`, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert result.stdout == "", result.stdout
    for mention in mentions:
        assert mention in lines[0], lines[0]
    return lines[0]


# --- timing and systemd ----------------------------------------------------------------------

def busiest_window(grants: list[tuple[float, int]], window: float = 1.0) -> int:
    """Most units in any half-open window [s, s + window); it suffices to start at grant times."""
    return max((sum(n for t, n in grants if s <= t < s + window) for s, _ in grants), default=0)


def received(sock: socket.socket) -> list[str]:
    """Every notify message waiting on a non-blocking datagram socket (a fake NOTIFY_SOCKET)."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


# --- database -------------------------------------------------------------------------------

@contextmanager
def fresh_database(pg_server: PrivatePostgres, label: str) -> Iterator[str]:
    """A new, empty database on a private server (no schema), dropped afterwards; `label` (a
    test's name) goes into the database's name, which helps when reading server logs."""
    stem = re.sub(r"[^a-z0-9_]+", "_", label.lower())[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def scalar(url: str, sql: str, *args: Any) -> Any:
    rows = query(url, sql, *args)
    return rows[0][0] if rows else None


def status_counts(url: str, campaign_id: int | None = None) -> dict[str, int]:
    rows = query(url, "SELECT status, count(*) FROM sendd.message "
                      "WHERE $1::bigint IS NULL OR campaign_id = $1 GROUP BY status", campaign_id)
    return {r["status"]: r["count"] for r in rows}


def campaign(url: str, campaign_id: int) -> dict[str, Any]:
    """The campaign's row."""
    return dict(query(url, "SELECT * FROM sendd.campaign WHERE id = $1", campaign_id)[0])


def wait_campaign(url: str, campaign_id: int, status: str, timeout: float,
                  interval: float = 0.2) -> dict[str, Any]:
    """Wait until the campaign has `status`; its row then."""
    return wait_until(lambda: (row := campaign(url, campaign_id))["status"] == status and row,
                      timeout, f"campaign {campaign_id} to be {status}", interval=interval)


def send_debits(url: str, tenant: str) -> int:
    """What the tenant was billed for sending: -(its ledger deltas with reason 'send')."""
    return -scalar(url, "SELECT coalesce(sum(delta), 0) FROM sendd.credit_ledger "
                        "WHERE tenant_id = $1 AND reason = 'send'", tenant)


# --- fake provider --------------------------------------------------------------------------

class FakeProvider:
    """`python -m sendd.dev.fakeprovider` as a real process on a free loopback port."""

    def __init__(self, *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sendd.dev.fakeprovider", "--port", "0", *flags],
            stdout=subprocess.PIPE, env=env(), text=True,
        )
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fake provider did not start")
        self.port = json.loads(line)["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_stats", timeout=10).json()

    def references(self) -> Any:
        return httpx.get(f"{self.url}/_references", timeout=30).json()

    def accepted_at(self, references: list[str]) -> dict[str, float | None]:
        """When the fake first accepted each reference (Unix time), None if never."""
        return httpx.post(f"{self.url}/_accepted_at", json=references, timeout=30).json()

    def control(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_control", json=settings, timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> FakeProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- configuration and commands -------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


_HTTP_PORTS: dict[Path, int] = {}
_HTTP_LISTEN: dict[Path, str] = {}  # config file -> the http_listen it was last written with


def _http_port(config_path: Path) -> int:
    """A free port per config file, kept when a test rewrites the file (a reload must not see
    the HTTP address change)."""
    return _HTTP_PORTS.setdefault(config_path, free_port())


def write_config(path: Path, database_url: str, provider_url: str, *,
                 accounts: dict[str, dict[str, Any]] | None = None,
                 pipeline: dict[str, Any] | None = None,
                 retry: dict[str, Any] | None = None,
                 daemon: dict[str, Any] | None = None, redis_url: str = "") -> Path:
    """A config file for tests: one `main` mitto account at the fake provider by default."""
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": database_url},
        # Free ports and paths of the test's own: never the defaults (9464, /run/sendd).
        "daemon": {"log_level": "info", "http_listen": f"127.0.0.1:{_http_port(path)}",
                   "control_socket": str(path.parent / "control.sock"), **(daemon or {})},
        "pipeline": {**TEST_PIPELINE, **(pipeline or {})},
        "retry": {**TEST_RETRY, **(retry or {})},
        **({"redis": {"url": redis_url}} if redis_url else {}),
    }
    _HTTP_LISTEN[path] = sections["daemon"]["http_listen"]
    accounts = accounts or {"main": {}}
    for name, overrides in accounts.items():
        sections[f"accounts.{name}"] = {"kind": "mitto", "base_url": provider_url,
                                         "api_key": API_KEY, "timeout": 1.5, **overrides}
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def http_url(config: Path, path: str = "") -> str:
    """The daemon's HTTP endpoint (`/healthz`, `/metrics`) as `write_config` set it up."""
    return f"http://{_HTTP_LISTEN[config]}{path}"


def sendd(config: Path, *args: str, stdin: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a `sendd` command; with check, fail showing its stderr."""
    result = subprocess.run([*SENDD, "--config", str(config), *args], input=stdin,
                            capture_output=True, text=True, env=env(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"sendd {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.strip()}")
    return result


def sendd_json(config: Path, *args: str, stdin: str | None = None) -> Any:
    return json.loads(sendd(config, *args, stdin=stdin).stdout)


def numbers(count: int, start: int = 0) -> list[str]:
    """Valid, distinct Greek mobile numbers."""
    return [f"+3069{start + i:08d}" for i in range(count)]


def write_recipients(path: Path, recipients: Iterable[str]) -> Path:
    path.write_text("\n".join(recipients) + "\n")
    return path


def setup_database(config: Path, tenants: dict[str, int]) -> None:
    """Migrate and create tenants with the given credits."""
    sendd(config, "migrate")
    for tenant, credits in tenants.items():
        sendd(config, "tenant", "set", tenant, "--credits", str(credits))


def enqueue(config: Path, tmp: Path, tenant: str, recipients: list[str], *extra: str,
            text: str = "Hello from sendd") -> dict[str, Any]:
    path = write_recipients(tmp / f"recipients-{tenant}-{time.monotonic_ns()}.txt", recipients)
    return sendd_json(config, "enqueue", "--tenant", tenant, "--text", text,
                      "--recipients", str(path), *extra)


# --- the daemon -----------------------------------------------------------------------------

class Daemon:
    """`sendd run` as a real process; its JSON log lines are kept in a file."""

    def __init__(self, config: Path, log_path: Path, extra_env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "a")  # noqa: SIM115 -- closed in wait()
        self.process = subprocess.Popen([*SENDD, "--config", str(config), "run"],
                                        stderr=self._log, stdout=self._log,
                                        env={**env(), **(extra_env or {})})

    def wait_ready(self, timeout: float = 30) -> Daemon:
        wait_until(lambda: self.process.poll() is not None or '"daemon_ready"' in self.log(),
                   timeout, "the daemon to be ready")
        if self.process.poll() is not None:
            raise AssertionError(f"the daemon exited {self.process.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            if f'"{name}"' in line:
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return found

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_db(url: str, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Migrate the fresh database, then run work(conn) on one asyncpg connection."""

    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            await migrate.migrate(conn)
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


# A campaign to queue: (tenant, messages, account, sender).
Spec = tuple[str, int, str, str]


def queue_campaigns(url: str, rates: dict[str, int], campaigns: list[Spec],
                    start: int = 0) -> list[int]:
    """Migrate (when needed), create the tenants with their rates (`sendd tenant set T --rate R`
    does the same) and plenty of credits, and queue each campaign with an application's direct
    inserts (a draft, its messages, then started; README, "Set up a database and send"): as
    `sendd enqueue` would, but tens of thousands in well under a second. Distinct recipients
    from `start` on; the campaigns' ids."""

    async def work(conn: Any) -> list[int]:
        for tenant, rate in rates.items():
            await set_tenant(conn, tenant, credits=1_000_000, rate=rate)
        ids, first = [], start
        for tenant, count, account, sender in campaigns:
            campaign_id = await conn.fetchval(
                "INSERT INTO sendd.campaign (tenant_id, name) VALUES ($1, $2) RETURNING id",
                tenant, f"{tenant} {len(ids)}")
            await conn.execute(
                "INSERT INTO sendd.message (tenant_id, campaign_id, account, sender, recipient, "
                "body) SELECT $1, $2, $3, $4, '+3069' || lpad(g::text, 8, '0'), "
                "'Hello from sendd' FROM generate_series($5::int, $6::int) AS g",
                tenant, campaign_id, account, sender, first, first + count - 1)
            await conn.execute("UPDATE sendd.campaign SET status = 'sending', "
                               "started_at = now() WHERE id = $1", campaign_id)
            ids.append(campaign_id)
            first += count
        return ids

    return with_db(url, work)
