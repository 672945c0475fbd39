"""The control socket's server: a Unix socket, peer credentials checked, one task per
connection, each reading request lines (sendd.control.protocol) and answering them
(sendd.control.commands).

No client can lock an operator out: there are at most MAX_CONNECTIONS of them, a request line
must be finished within LINE_TIMEOUT of its first byte, and when every slot is taken a newcomer
is let in by closing the connection idle the longest (waiting for a request, stuck mid-line, or
watching).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import stat
import struct
from collections.abc import Iterator
from typing import Any

import structlog
import trio

from sendd.control.commands import DB_CONCURRENCY, RunningDaemon, answer, watch
from sendd.control.protocol import (
    LINE_TIMEOUT,
    MAX_LINE,
    RECEIVE_SIZE,
    BadRequest,
    LineReader,
    LineTimeout,
    LineTooLong,
    Request,
    encode,
    error_reply,
    parse_request,
)
from sendd.listeners import connection_limit, serve_bounded
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease

log = structlog.get_logger()

MAX_CONNECTIONS = 64
FD_SHARE = 1 / 8  # of the process's descriptor limit, at most, for control connections
LISTEN_BACKLOG = 128  # connections the kernel queues while every slot is busy
SOCKET_MODE = 0o660
SEND_TIMEOUT = 10.0  # a client that does not read its replies for this long is dropped
LINGER = 1.0  # after a last error reply: how long to swallow what the client still sends
REQUEST_INTERVAL = 0.02  # seconds between one connection's requests (at most 50 a second)
STATUS_TTL = 0.1  # one status reply serves every client that asks within this time


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
    def __init__(self, daemon: RunningDaemon, limit: int = MAX_CONNECTIONS) -> None:
        self.daemon = daemon
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
            log.error("control_connection_failed", error=repr(error), exc_info=error)

    async def _converse(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream.socket)
        if uid not in self.allowed_uids:
            log.warning("control_refused", uid=uid)
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
            log.info("control_command", cmd=request.cmd, uid=uid, **request.args)
        if request.cmd == "watch":
            connection.idle()  # a watcher can be evicted like an idle connection
            await watch(self.daemon, self.db, functools.partial(send_reply, stream), connection)
            if connection.evicted:
                await send_reply(stream, error_reply(
                    f"watch ended to make room for a new connection (at most {self.limit} "
                    "control connections; this one was idle the longest)"))
            return False
        if request.cmd == "drain":
            drain = self.daemon.controls.drain
            try:
                await send_reply(stream, {"ok": True, "draining": True,
                                          "already_draining": drain.is_set()})
            finally:
                drain.set()  # asked for: drain even if the client left already
            return True
        if request.cmd == "status":
            await send_reply(stream, await self._status(request))
        else:
            await send_reply(stream, await answer(self.daemon, self.db, request))
        return True

    async def _status(self, request: Request) -> dict[str, Any]:
        """Status, computed at most once per STATUS_TTL however many clients ask."""
        at, reply = self._status_cache
        if trio.current_time() - at >= STATUS_TTL:
            reply = await answer(self.daemon, self.db, request)
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


async def serve_control(*, pool: Any, lease: Lease, accounts: Accounts, controls: Controls,
                        health: Health,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket (daemon.control_socket of the configuration in force at start)
    until cancelled; the socket file is removed on the way out.

    A socket that cannot be bound (no directory, another daemon's live socket) is logged and
    the daemon runs on without one: sending does not depend on it.
    """
    path = controls.config.daemon.control_socket
    try:
        sock, identity = bind_socket(path)
    except OSError as error:
        log.error("control_socket_unavailable", path=path, error=error.strerror or repr(error))
        task_status.started()
        return
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        daemon = RunningDaemon(pool, lease, accounts, controls, health)
        server = ControlServer(daemon, connection_limit(MAX_CONNECTIONS, FD_SHARE))
        log.info("control_socket_listening", path=path, max_connections=server.limit)
        task_status.started()
        await serve_bounded(listener, server.handle, limit=server.limit, log=log,
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
