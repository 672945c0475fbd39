"""The control socket (CONTRACT.md): one JSON object a line in each direction.

    {"cmd": "pause", "scope": "tenant", "id": "acme"}  ->  {"ok": true, ...}
                                                       or  {"ok": false, "error": "..."}

Three layers, top to bottom: the protocol (pure: a line in, a `Request` or a `BadRequest` out),
the commands (what a request does to the running daemon), and the server (a Unix socket, peer
credentials checked, one task per connection). No client can slow the pipeline down: there are
at most MAX_CONNECTIONS of them, `status` reads memory only, and the commands that need the
database (campaign pause/resume, tenant rates, `watch`) share a limiter of DB_CONCURRENCY.

No client can lock an operator out either: a request line must be finished within LINE_TIMEOUT
of its first byte, and when every slot is taken a newcomer is let in by closing the connection
idle the longest (waiting for a request, stuck mid-line, or watching).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import trio

from sendd import leases
from sendd.commands import campaigns
from sendd.config import DEFAULTS_SOURCE, AccountConfig, Config, ConfigError, load_config
from sendd.db.connection import CONNECTION_ERRORS
from sendd.errors import UserError
from sendd.listeners import connection_limit, serve_bounded
from sendd.runtime import Runtime

MAX_LINE = 64 * 1024  # bytes in one request line, newline excluded
MAX_CONNECTIONS = 64
FD_SHARE = 1 / 8  # of the process's descriptor limit, at most, for control connections
LISTEN_BACKLOG = 128  # connections the kernel queues while every slot is busy
SOCKET_MODE = 0o660
IDLE_TIMEOUT = 600.0  # a connection that sends nothing for this long is closed
LINE_TIMEOUT = 5.0  # once a request line has begun, the rest must arrive within this time
SEND_TIMEOUT = 10.0  # a client that does not read its replies for this long is dropped
LINGER = 1.0  # after a last error reply: how long to swallow what the client still sends
DB_TIMEOUT = 10.0
DB_CONCURRENCY = 2  # pool connections the control socket may hold at once
WATCH_INTERVAL = 1.0
REQUEST_INTERVAL = 0.02  # seconds between one connection's requests (at most 50 a second)
STATUS_TTL = 0.1  # one status reply serves every client that asks within this time
RECEIVE_SIZE = 16 * 1024

SCOPES = ("all", "tenant", "campaign", "account")
MAX_RATE = 1_000_000  # as for accounts.*.msgs_per_s in the configuration
# Account settings a reload applies live, at once.
LIVE_ACCOUNT_KEYS = ("msgs_per_s", "reqs_per_s", "max_batch")
# Settings a reload applies by draining the pipeline and starting a new one (in-flight work
# finishes first). The rest (database, sockets, logging, the lease length) need a restart.
REBUILDABLE = ("pipeline.", "retry.", "accounts.", "daemon.stop_timeout", "daemon.stall_seconds")


# --- protocol: pure, no I/O ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BadRequest:
    error: str


class _Invalid(Exception):
    """An argument that cannot be used as given; the text says which and why."""


def parse_request(line: bytes) -> Request | BadRequest:
    """One request line (its newline removed) as a Request, or a BadRequest naming the problem."""
    if len(line) > MAX_LINE:
        return BadRequest(f"request line longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return BadRequest("malformed request: not UTF-8 text")
    except json.JSONDecodeError as error:
        return BadRequest(f"malformed JSON: {error}")
    except (ValueError, RecursionError):  # an absurdly long number, nesting too deep
        return BadRequest("malformed JSON: a value is too large or nested too deeply")
    if not isinstance(obj, dict):
        return BadRequest('a request must be a JSON object, like {"cmd": "status"}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        return BadRequest('a request needs "cmd", a string, like {"cmd": "status"}')
    parse_args = _ARGUMENTS.get(cmd)
    if parse_args is None:
        return BadRequest(f"unknown command {_show(cmd)} (commands: {', '.join(_ARGUMENTS)})")
    try:
        return Request(cmd, parse_args({k: v for k, v in obj.items() if k != "cmd"}))
    except _Invalid as error:
        return BadRequest(f"{cmd}: {error}")


def _no_args(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, ())
    return {}


def _scope_args(args: dict[str, Any]) -> dict[str, Any]:
    _only(args, ("scope", "id"))
    scope = args.get("scope")
    if scope not in SCOPES:
        expected = ", ".join(f'"{s}"' for s in SCOPES)
        raise _Invalid(f'"scope" must be one of {expected}, got {_show(scope)}')
    if scope == "all":
        if args.get("id") is not None:
            raise _Invalid('"scope": "all" takes no "id"')
        return {"scope": scope, "id": None}
    if "id" not in args:
        raise _Invalid(f'"id" is required with "scope": "{scope}"')
    if scope == "campaign":
        return {"scope": scope, "id": _integer(args["id"], "id", 1, 2**63 - 1)}
    return {"scope": scope, "id": _name(args["id"], "id")}


def _rate_args(args: dict[str, Any]) -> dict[str, Any]:
    targets = [key for key in ("account", "tenant") if key in args]
    if len(targets) != 1:
        raise _Invalid('give exactly one of "account" and "tenant"')
    target = targets[0]
    if target == "tenant" and "reqs_per_s" in args:
        raise _Invalid('"reqs_per_s" applies to accounts only; tenants have "msgs_per_s"')
    _only(args, (target, "msgs_per_s", "reqs_per_s"))
    if "msgs_per_s" not in args:
        raise _Invalid('"msgs_per_s" is required (0 = unlimited)')
    parsed = {target: _name(args[target], target),
              "msgs_per_s": _integer(args["msgs_per_s"], "msgs_per_s", 0, MAX_RATE)}
    if target == "account":
        reqs = args.get("reqs_per_s")
        parsed["reqs_per_s"] = None if reqs is None else _integer(reqs, "reqs_per_s", 0, MAX_RATE)
    return parsed


_ARGUMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "status": _no_args,
    "pause": _scope_args,
    "resume": _scope_args,
    "drain": _no_args,
    "set-rate": _rate_args,
    "reload": _no_args,
    "watch": _no_args,
}


def _only(args: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        accepted = f"accepted: {', '.join(allowed)}" if allowed else "it takes none"
        raise _Invalid(f"unknown argument {_show(unknown[0])} ({accepted})")


def _integer(value: Any, key: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:  # `type is`: true is not 1 here
        raise _Invalid(f'"{key}" must be an integer between {lo} and {hi}, got {_show(value)}')
    return value


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise _Invalid(f'"{key}" must be a name of 1 to 200 printable characters, '
                       f"got {_show(value)}")
    return value


def _show(value: Any) -> str:
    # JSON keeps the text on one line and tells "5" from 5; long values are cut.
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def plan_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload runs with: the old configuration with the live account settings of the new
    one. Returns it, the keys applied and the keys that need a restart (names, never values)."""
    pending = [key for key in sorted(_sections(old) | _sections(new))
               if _sections(old).get(key) != _sections(new).get(key)]
    applied: list[str] = []
    accounts = dict(old.accounts)
    for name in sorted(old.accounts.keys() | new.accounts.keys()):
        if name not in old.accounts or name not in new.accounts:
            pending.append(f"accounts.{name}")
            continue
        was, now = old.accounts[name], new.accounts[name]
        for f in dataclasses.fields(AccountConfig):
            if getattr(was, f.name) != getattr(now, f.name):
                live = f.name in LIVE_ACCOUNT_KEYS
                (applied if live else pending).append(f"accounts.{name}.{f.name}")
        accounts[name] = dataclasses.replace(
            was, **{key: getattr(now, key) for key in LIVE_ACCOUNT_KEYS})
    return dataclasses.replace(old, accounts=accounts), applied, pending


def _sections(config: Config) -> dict[str, Any]:
    return {f"{section.name}.{f.name}": getattr(getattr(config, section.name), f.name)
            for section in dataclasses.fields(config) if section.name not in ("accounts", "source")
            for f in dataclasses.fields(getattr(config, section.name))}


WATCH_QUERY = """
SELECT id, tenant_id, name, status, total, sent, failed, unknown, cancelled
FROM sendd.campaign WHERE status IN ('sending', 'paused') ORDER BY id
"""


def campaign_progress(rows: list[Any], previous: dict[int, int],
                      elapsed: float) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Progress per campaign from WATCH_QUERY rows, with the rate since the `previous` sample
    (campaign -> processed) `elapsed` seconds ago; returns it and the sample for next time."""
    progress, sample = [], {}
    for row in rows:
        processed = row["sent"] + row["failed"] + row["unknown"] + row["cancelled"]
        sample[row["id"]] = processed
        before = previous.get(row["id"])
        rate = None
        if before is not None and elapsed > 0:
            rate = round(max(0, processed - before) / elapsed, 1)
        remaining = max(0, row["total"] - processed)
        progress.append({
            "id": row["id"], "tenant": row["tenant_id"], "name": row["name"],
            "status": row["status"], "total": row["total"], "sent": row["sent"],
            "failed": row["failed"], "processed": processed, "msgs_per_s": rate,
            "eta_s": round(remaining / rate, 1) if rate else None,
        })
    return progress, sample


# --- commands: what a request does to the running daemon -----------------------------------

Handler = Callable[[Runtime, trio.CapacityLimiter, dict[str, Any]], Awaitable[dict[str, Any]]]


async def status(runtime: Runtime, db: trio.CapacityLimiter,
                 args: dict[str, Any]) -> dict[str, Any]:
    """Everything from memory: never waits for the database or the pipeline."""
    return {
        "ok": True,
        "instance_id": runtime.instance_id,
        "pid": os.getpid(),
        "uptime_s": round(trio.current_time() - runtime.started, 1),
        "config": runtime.config.source,
        "draining": runtime.drain.is_set(),
        "actors": {name: {"restarts": runtime.restarts[name]} for name in runtime.actors},
        "channels": {name: _fill(end) for name, end in runtime.channels.items()},
        "accounts": {name: _account_status(runtime, name) for name in runtime.config.accounts},
        "suspended": dict(runtime.suspended),
        "unserved_accounts": dict(runtime.unserved.accounts),
        "problems": runtime.current_problems(),
        "paused": _paused(runtime),
        "outcomes": dict(runtime.outcomes),
    }


def _fill(end: Any) -> dict[str, int]:
    stats = end.statistics()
    return {"used": stats.current_buffer_used, "capacity": stats.max_buffer_size,
            "senders_waiting": stats.tasks_waiting_send,
            "receivers_waiting": stats.tasks_waiting_receive}


def _account_status(runtime: Runtime, name: str) -> dict[str, Any]:
    account = runtime.config.accounts[name]
    msgs, reqs = runtime.governor.effective(name)
    return {
        "msgs_per_s": msgs, "reqs_per_s": reqs,  # effective: lower while backing off a 429
        "configured_msgs_per_s": account.msgs_per_s, "configured_reqs_per_s": account.reqs_per_s,
        "max_batch": min(account.max_batch, runtime.batch_cap.get(name, account.max_batch)),
        "paused": name in runtime.paused_accounts, "suspended": runtime.suspended.get(name),
        "breaker": runtime.breakers.describe(name, trio.current_time()),
    }


def _paused(runtime: Runtime) -> dict[str, Any]:
    return {"all": runtime.paused_all, "tenants": sorted(runtime.paused_tenants),
            "accounts": sorted(runtime.paused_accounts)}


async def pause(runtime: Runtime, db: trio.CapacityLimiter, args: dict[str, Any]) -> dict[str, Any]:
    """Stop claiming; what is already claimed finishes."""
    scope, ident = args["scope"], args["id"]
    if scope == "campaign":
        return {"ok": True, **await _on_database(runtime, db, functools.partial(
            campaigns.pause, campaign_id=ident))}
    if scope == "all":
        runtime.paused_all = True
    elif scope == "tenant":
        await _check_tenant(runtime, db, ident)
        runtime.paused_tenants.add(ident)
    else:
        _account(runtime, ident)
        runtime.paused_accounts.add(ident)
    return {"ok": True, "scope": scope, "id": ident, "paused": _paused(runtime)}


async def resume(runtime: Runtime, db: trio.CapacityLimiter,
                 args: dict[str, Any]) -> dict[str, Any]:
    """Lift a pause (resuming an account also lifts a suspension) and wake the poller."""
    scope, ident = args["scope"], args["id"]
    reply: dict[str, Any] = {"ok": True}
    if scope == "campaign":
        reply |= await _on_database(runtime, db, functools.partial(
            campaigns.resume, campaign_id=ident))
    elif scope == "all":
        runtime.paused_all = False
    elif scope == "tenant":
        await _check_tenant(runtime, db, ident)
        runtime.paused_tenants.discard(ident)
    else:
        _account(runtime, ident)
        runtime.paused_accounts.discard(ident)
        reason = runtime.suspended.pop(ident, None)
        if reason is not None:
            reply["cleared_suspension"] = reason
    runtime.wake_poller()
    if scope != "campaign":
        reply |= {"scope": scope, "id": ident, "paused": _paused(runtime)}
    return reply


TENANT_EXISTS = "SELECT EXISTS (SELECT 1 FROM sendd.tenant WHERE id = $1)"


async def _check_tenant(runtime: Runtime, db: trio.CapacityLimiter, tenant: str) -> None:
    """A pause of a tenant that does not exist would silently hold nothing back."""
    found = await _on_database(runtime, db, lambda conn: conn.fetchval(TENANT_EXISTS, tenant))
    if not found:
        raise UserError(f"unknown tenant {_show(tenant)}")


SET_TENANT_RATE = """
UPDATE sendd.tenant SET rate_msgs_per_s = $2, updated_at = now() WHERE id = $1 RETURNING id
"""


async def set_rate(runtime: Runtime, db: trio.CapacityLimiter,
                   args: dict[str, Any]) -> dict[str, Any]:
    """Change a limit live. A tenant's is also stored, so the poller's refresh keeps it."""
    msgs = args["msgs_per_s"]
    if "tenant" in args:
        tenant = args["tenant"]
        found = await _on_database(runtime, db, lambda conn: conn.fetchval(
            SET_TENANT_RATE, tenant, msgs))
        if found is None:
            raise UserError(f"no tenant {_show(tenant)}")
        runtime.governor.set_tenant(tenant, msgs)
        return {"ok": True, "tenant": tenant, "msgs_per_s": msgs}
    name = args["account"]
    account = _account(runtime, name)
    reqs = account.reqs_per_s if args["reqs_per_s"] is None else args["reqs_per_s"]
    runtime.governor.set_account(name, msgs, reqs)
    accounts = runtime.config.accounts | {
        name: dataclasses.replace(account, msgs_per_s=msgs, reqs_per_s=reqs)}
    runtime.config = dataclasses.replace(runtime.config, accounts=accounts)
    return {"ok": True, "account": name, **_account_status(runtime, name)}


async def reload(runtime: Runtime, db: trio.CapacityLimiter | None = None,
                 args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-read the configuration file the daemon started with and apply what can change live
    (account rate limits and max_batch). A file that does not load raises ConfigError and
    changes nothing."""
    path = None if runtime.config.source == DEFAULTS_SOURCE else runtime.config.source
    # The running database URL is kept, also when it came from --database-url.
    load = functools.partial(load_config, path, database_url=runtime.config.database.url)
    new = await trio.to_thread.run_sync(load)
    config, applied, pending = plan_reload(runtime.config, new)
    rebuild = [key for key in pending if _rebuildable(key)]
    restart = [key for key in pending if not _rebuildable(key)]
    if rebuild:
        target = rebuilt_config(runtime.config, new)
        leases.check_runnable(target)  # refused before anything changes
        runtime.next_config = target
        runtime.rebuild.set()  # the daemon drains this pipeline and starts one with `target`
    runtime.config = config
    for name, account in config.accounts.items():
        runtime.governor.set_account(name, account.msgs_per_s, account.reqs_per_s)
    runtime.log.info("config_reloaded", source=new.source, applied=applied, rebuilt=rebuild,
                     restart_required=restart)
    return {"ok": True, "source": new.source, "applied": applied, "rebuilt": rebuild,
            "restart_required": restart}


def _rebuildable(key: str) -> bool:
    return key.startswith(REBUILDABLE) and key != "pipeline.lease_seconds"


def rebuilt_config(running: Config, new: Config) -> Config:
    """What the next pipeline runs with: the new pipeline, retry and accounts settings (and
    the drain and stall times); what only a restart can change stays as it runs now."""
    daemon = dataclasses.replace(running.daemon, stop_timeout=new.daemon.stop_timeout,
                                 stall_seconds=new.daemon.stall_seconds)
    pipeline = dataclasses.replace(new.pipeline,
                                   lease_seconds=running.pipeline.lease_seconds)
    return dataclasses.replace(running, daemon=daemon, pipeline=pipeline, retry=new.retry,
                               accounts=new.accounts)


async def reload_on_signal(runtime: Runtime) -> None:
    """SIGHUP: as the `reload` command; a bad file is logged and the old configuration kept."""
    try:
        await reload(runtime)
    except ConfigError as error:
        runtime.log.error("reload_failed", error=str(error), detail="the old configuration stays")


def _account(runtime: Runtime, name: str) -> AccountConfig:
    account = runtime.config.accounts.get(name)
    if account is None:
        raise UserError(f"unknown account {_show(name)} (configured: "
                        f"{', '.join(sorted(runtime.config.accounts))})")
    return account


async def _on_database(runtime: Runtime, db: trio.CapacityLimiter,
                       work: Callable[[Any], Awaitable[Any]]) -> Any:
    async with db:
        with trio.fail_after(DB_TIMEOUT):
            async with runtime.pool.acquire() as conn:
                return await work(conn)


_HANDLERS: dict[str, Handler] = {
    "status": status, "pause": pause, "resume": resume, "set-rate": set_rate, "reload": reload,
}


async def answer(runtime: Runtime, db: trio.CapacityLimiter, request: Request) -> dict[str, Any]:
    """The reply to one request; a failure the operator can act on becomes an error reply."""
    try:
        return await _HANDLERS[request.cmd](runtime, db, request.args)
    except (UserError, ConfigError) as error:
        return error_reply(str(error))
    except trio.TooSlowError:
        return error_reply(f"the database did not answer within {DB_TIMEOUT:g}s")
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
        return error_reply(f"database error: {_first_line(error)}")


async def watch(runtime: Runtime, db: trio.CapacityLimiter, stream: trio.SocketStream,
                connection: Connection) -> None:
    """A progress line every WATCH_INTERVAL until the client hangs up (a send then fails) or
    the connection is evicted to make room for a new one."""
    previous: dict[int, int] = {}
    sampled = trio.current_time()
    next_line = sampled
    while True:
        try:
            rows = await _on_database(runtime, db, lambda conn: conn.fetch(WATCH_QUERY))
        except trio.TooSlowError:
            reply = error_reply(f"the database did not answer within {DB_TIMEOUT:g}s")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            reply = error_reply(f"database error: {_first_line(error)}")
        else:
            now = trio.current_time()
            progress, previous = campaign_progress(rows, previous, now - sampled)
            sampled = now
            reply = {"ok": True, "at": datetime.now(UTC).isoformat(timespec="seconds"),
                     "campaigns": progress, "paused": _paused(runtime),
                     "suspended": dict(runtime.suspended), "draining": runtime.drain.is_set(),
                     "outcomes": dict(runtime.outcomes)}
        await send_reply(stream, reply)
        next_line += WATCH_INTERVAL
        with connection.interruptible():
            await trio.sleep_until(next_line)
        if connection.evicted:
            return


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- server: the socket, connections, peer credentials --------------------------------------


class LineTooLong(Exception):
    pass


class LineTimeout(Exception):
    """A request line began but did not end within the line timeout."""


class LineReader:
    """Newline-terminated lines from a stream, none longer than `limit` bytes.

    Waiting for a line to begin takes up to `idle_timeout`; once its first byte has arrived,
    the rest must come within `line_timeout`, so a client that sends half a line cannot hold
    its connection for the idle timeout.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int = MAX_LINE,
                 idle_timeout: float = IDLE_TIMEOUT, line_timeout: float = LINE_TIMEOUT) -> None:
        self._stream = stream
        self._limit = limit
        self._idle_timeout = idle_timeout
        self._line_timeout = line_timeout
        self._buffer = bytearray()
        self._searched = 0  # the buffer up to here holds no newline

    async def next_line(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream or when no line
        began within the idle timeout. Raises LineTimeout or LineTooLong."""
        now = trio.current_time()
        idle_until = now + self._idle_timeout
        # Bytes already buffered came with the previous line: the time that line took to
        # serve does not count against this one, so it begins now.
        began = now if self._buffer else None
        while True:
            end = self._buffer.find(b"\n", self._searched)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._searched = 0
                if len(line) > self._limit:
                    raise LineTooLong
                return line
            self._searched = len(self._buffer)
            if len(self._buffer) > self._limit:
                raise LineTooLong
            with trio.move_on_at(idle_until if began is None else began + self._line_timeout):
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:  # the end; a last line without its newline still counts
                    line, self._buffer = bytes(self._buffer), bytearray()
                    return line or None
                began = trio.current_time() if began is None else began
                self._buffer += data
                continue
            if began is not None:
                raise LineTimeout
            return None


async def send_reply(stream: trio.abc.SendStream, reply: dict[str, Any]) -> None:
    with trio.fail_after(SEND_TIMEOUT):
        await stream.send_all(encode(reply))


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Connection:
    """One client's connection as the server sees it: busy serving a request, or idle
    (waiting for a request line, stuck mid-line, or watching) since some time. An idle one can
    be evicted: the wait it is in ends, and it closes."""

    def __init__(self) -> None:
        self.busy = False
        self.since = trio.current_time()
        self.evicted = False
        self._wait: trio.CancelScope | None = None

    def idle(self) -> None:
        self.busy, self.since = False, trio.current_time()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait that an eviction ends early (quietly: check `evicted` after it)."""
        with trio.CancelScope() as scope:
            self._wait = scope
            if self.evicted:
                scope.cancel()
            try:
                yield
            finally:
                self._wait = None

    def evict(self) -> None:
        self.evicted = True
        if self._wait is not None:
            self._wait.cancel()


class ControlServer:
    def __init__(self, runtime: Runtime, limit: int = MAX_CONNECTIONS) -> None:
        self.runtime = runtime
        self.limit = limit
        self.db = trio.CapacityLimiter(DB_CONCURRENCY)
        self.allowed_uids = {0, os.getuid()}
        self.connections: set[Connection] = set()
        self._status_cache: tuple[float, dict[str, Any]] = (float("-inf"), {})

    def make_room(self) -> None:
        """Every slot is taken and a newcomer waits: evict the connection idle the longest.
        Busy ones finish their request first (the listener waits for a slot)."""
        idle = [c for c in self.connections if not c.busy and not c.evicted]
        if idle:
            min(idle, key=lambda c: c.since).evict()

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection; whatever goes wrong in it ends only this connection."""
        try:
            async with stream:
                await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client hung up or stopped reading
        except Exception as error:  # noqa: BLE001 -- a connection's error boundary
            self.runtime.log.error("control_connection_failed", error=repr(error),
                                   exc_info=error)

    async def _converse(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream.socket)
        if uid not in self.allowed_uids:
            self.runtime.log.warning("control_refused", uid=uid)
            await send_reply(stream, error_reply(
                f"permission denied: uid {uid} may not use the control socket "
                f"(only root and uid {os.getuid()}, which sendd runs as)"))
            await _linger(stream)
            return
        connection = Connection()
        self.connections.add(connection)
        try:
            await self._serve_lines(stream, connection, uid)
        finally:
            self.connections.discard(connection)

    async def _serve_lines(self, stream: trio.SocketStream, connection: Connection,
                           uid: int) -> None:
        lines = LineReader(stream)
        next_request = trio.current_time()
        while True:
            connection.idle()
            line, problem = None, None
            with connection.interruptible():
                # Paced per connection, so many eager clients cannot crowd out the pipeline.
                await trio.sleep_until(next_request)
                try:
                    line = await lines.next_line()
                except LineTooLong:
                    problem = f"request line longer than {MAX_LINE} bytes"
                except LineTimeout:
                    problem = f"request line not finished within {LINE_TIMEOUT:g}s"
            if line is None and connection.evicted:
                # No lingering: a newcomer waits for this slot. What the client sent so far
                # has been read, so closing does not reset the connection under the reply.
                await send_reply(stream, error_reply(
                    f"closed to make room for a new connection (at most {self.limit} control "
                    "connections; this one was idle the longest)"))
                return
            if problem is not None:
                await send_reply(stream, error_reply(f"{problem}; closing the connection"))
                await _linger(stream)
                return
            if line is None:
                return  # the client is done (or was idle too long)
            connection.busy = True
            next_request = trio.current_time() + REQUEST_INTERVAL
            if line.strip() and not await self._serve_request(stream, parse_request(line), uid,
                                                              connection):
                return

    async def _serve_request(self, stream: trio.SocketStream, request: Request | BadRequest,
                             uid: int, connection: Connection) -> bool:
        """Answer one request; False when the connection is done (after `watch`)."""
        if isinstance(request, BadRequest):
            await send_reply(stream, error_reply(request.error))
            return True
        if request.cmd != "status":
            self.runtime.log.info("control_command", cmd=request.cmd, uid=uid, **request.args)
        if request.cmd == "watch":
            connection.idle()  # a watcher can be evicted like an idle connection
            await watch(self.runtime, self.db, stream, connection)
            if connection.evicted:
                await send_reply(stream, error_reply(
                    f"watch ended to make room for a new connection (at most {self.limit} "
                    "control connections; this one was idle the longest)"))
            return False
        if request.cmd == "drain":
            try:
                await send_reply(stream, {"ok": True, "draining": True,
                                          "already_draining": self.runtime.drain.is_set()})
            finally:
                self.runtime.drain.set()  # asked for: drain even if the client left already
            return True
        if request.cmd == "status":
            await send_reply(stream, await self._status(request))
        else:
            await send_reply(stream, await answer(self.runtime, self.db, request))
        return True

    async def _status(self, request: Request) -> dict[str, Any]:
        """Status, computed at most once per STATUS_TTL however many clients ask."""
        at, reply = self._status_cache
        if trio.current_time() - at >= STATUS_TTL:
            reply = await answer(self.runtime, self.db, request)
            self._status_cache = (trio.current_time(), reply)
        return reply


async def _linger(stream: trio.SocketStream) -> None:
    """Close politely after a last error reply: say we are done, then drop what the client
    still sends for a moment, so that closing with unread data does not reset the connection
    before the client has read the error."""
    with trio.move_on_after(LINGER):
        await stream.send_eof()
        while await stream.receive_some(RECEIVE_SIZE):
            pass


async def serve_control(runtime: Runtime,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket until cancelled; the socket file is removed on the way out.

    A socket that cannot be bound (no directory, another daemon's live socket) is logged and
    the daemon runs on without one: sending does not depend on it.
    """
    path = runtime.config.daemon.control_socket
    try:
        sock, identity = bind_socket(path)
    except OSError as error:
        runtime.log.error("control_socket_unavailable", path=path,
                          error=error.strerror or repr(error))
        task_status.started()
        return
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        server = ControlServer(runtime, connection_limit(MAX_CONNECTIONS, FD_SHARE))
        runtime.log.info("control_socket_listening", path=path, max_connections=server.limit)
        task_status.started()
        await serve_bounded(listener, server.handle, limit=server.limit, log=runtime.log,
                            name="control", make_room=server.make_room)
    finally:
        sock.close()
        remove_socket(path, identity)


def bind_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at `path` with mode 0660, replacing a stale one; returns it and
    the file's identity, so that only this very file is removed later."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(LISTEN_BACKLOG)
        info = os.lstat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


def _remove_stale(path: str) -> None:
    """Remove a socket nobody listens on (a daemon that was killed left it); refuse to touch
    anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(errno.EEXIST, "the path exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale
        return
    except OSError:
        pass  # a full backlog or a timeout: someone is there
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is serving this control socket", path)


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass  # already gone: nothing to clean up
