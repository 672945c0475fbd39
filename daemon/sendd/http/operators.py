"""The HTTP server: /healthz, /readyz and /metrics, served by hypercorn inside the daemon.

A raw ASGI app (no framework). Bodies over 1 MiB are refused with 413; unknown paths get 404
and other methods than GET 405. An address that cannot be bound is logged and the daemon runs
on without the server, like the control socket.

Slow or greedy clients cannot hold it (it is to take provider webhooks from the internet):
 - a request head must arrive within HEAD_TIMEOUT of the connection (or of the previous
   response): hypercorn's keep-alive timer, which runs until a head is complete;
 - its body within BODY_TIMEOUT of the head, else 408 and the connection is closed;
 - a client that does not read a response for SEND_TIMEOUT is dropped;
 - at most MAX_CONNECTIONS connections at once (fewer under a low descriptor limit): the
   accept loop is ours (sendd.listeners), running hypercorn's per-connection server, because
   hypercorn's own has no bound; further clients wait in the listen queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr
from prometheus_client import CONTENT_TYPE_LATEST

from sendd.db.connection import RETRYABLE_ERRORS
from sendd.errors import describe
from sendd.listeners import connection_limit, serve_bounded
from sendd.metrics import Metrics
from sendd.state.accounts import Accounts
from sendd.state.health import Health
from sendd.state.lease import Lease

log = structlog.get_logger()

MAX_BODY = 1024 * 1024
RESTART_MEMORY = 60.0  # an actor that crashed this recently makes /healthz fail
READY_TIMEOUT = 2.0
MAX_CONNECTIONS = 256
FD_SHARE = 1 / 4  # of the process's descriptor limit, at most, for HTTP connections
LISTEN_BACKLOG = 128
HEAD_TIMEOUT = 5.0  # seconds for a request head (and for an idle keep-alive connection)
BODY_TIMEOUT = 5.0  # seconds for a request body, from the end of its head
SEND_TIMEOUT = 10.0  # seconds a client may leave a response unread
# Any single read: longer than a handler can take (readyz: READY_TIMEOUT), since a client
# waiting for its response sends nothing meanwhile.
READ_TIMEOUT = 30

Send = Any
Receive = Any


@dataclass
class Observed:
    """What the endpoints read: the database (readiness), the address, health, the lease, the
    breakers, the metrics, and whether the daemon is draining."""

    pool: Any
    listen: str
    health: Health
    lease: Lease
    accounts: Accounts
    metrics: Metrics
    drain: trio.Event


async def serve_http(observed: Observed,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled (the daemon's nursery ends it after the drain)."""
    listen = observed.listen
    config = server_config(listen)
    try:
        [sock] = config.create_sockets().insecure_sockets
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        log.error("http_unavailable", address=listen, error=error.strerror or repr(error))
        task_status.started()
        return
    limit = connection_limit(MAX_CONNECTIONS, FD_SHARE)
    app, context = ASGIWrapper(App(observed)), WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        await TCPServer(app, config, context, ConnectionState({}), GuardedStream(stream))

    with sock:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        log.info("http_listening", address=listen, max_connections=limit,
                 binds=[f"http://{repr_socket_addr(sock.family, sock.getsockname())}"])
        task_status.started()
        await serve_bounded(listener, handle, limit=limit, log=log, name="http")


def server_config(listen: str) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    # Through the stdlib `logging` module, which the daemon logs as JSON lines (sendd.logs).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = HEAD_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    return config


class GuardedStream(trio.abc.HalfCloseableStream):
    """A client connection whose sends give up after SEND_TIMEOUT. hypercorn shields its sends
    from cancellation, so without this a client that never reads would hold its connection
    (and a descriptor) for good."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.stream.socket  # hypercorn reads the addresses from it

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(SEND_TIMEOUT):
            await self.stream.send_all(data)
            return
        await trio.aclose_forcefully(self.stream)
        raise trio.BrokenResourceError(f"the client read nothing for {SEND_TIMEOUT:g}s")

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class App:
    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self.routes = {"/healthz": self.healthz, "/readyz": self.readyz,
                       "/metrics": self.metrics}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)

    async def http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        fits = None
        with trio.move_on_after(BODY_TIMEOUT):
            fits = await _body_fits(scope, receive)
        if fits is None:
            await _respond(send, 408, {"ok": False, "error": "request body not received "
                                                             f"within {BODY_TIMEOUT:g}s"},
                           [(b"connection", b"close")])
            return
        if not fits:
            await _respond(send, 413, {"ok": False, "error": "request body over 1 MiB"})
            return
        handler = self.routes.get(scope["path"])
        if handler is None:
            await _respond(send, 404, {"ok": False, "error": "not found"})
        elif scope["method"] != "GET":
            await _respond(send, 405, {"ok": False, "error": "method not allowed"},
                           [(b"allow", b"GET")])
        else:
            await handler(send)

    async def healthz(self, send: Send) -> None:
        reasons = health_problems(self.observed)
        if reasons:
            await _respond(send, 503, {"ok": False, "reasons": reasons})
        else:
            await _respond(send, 200, {"ok": True})

    async def readyz(self, send: Send) -> None:
        reason = await not_ready(self.observed)
        if reason:
            await _respond(send, 503, {"ok": False, "reason": reason})
        else:
            await _respond(send, 200, {"ok": True})

    async def metrics(self, send: Send) -> None:
        body = self.observed.metrics.render()
        await _send(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])


def health_problems(observed: Observed) -> list[str]:
    """Why the daemon is unhealthy, or nothing."""
    now, health = trio.current_time(), observed.health
    reasons = [f"{actor}: {reason}" for actor, reason in sorted(health.current_problems().items())]
    for actor, at in sorted(health.crashed_at.items()):
        if now - at < RESTART_MEMORY:
            reasons.append(f"{actor}: restarted {now - at:.0f}s ago "
                           f"({health.restarts.get(actor, 0)} restarts)")
    reasons += observed.accounts.breakers.problems(now)
    for actor, busy in sorted(health.stalled().items()):
        reasons.append(f"{actor}: wedged, no progress for {busy:.0f}s")
    if observed.lease.valid_until < now:
        reasons.append(f"lease not renewed: expired {now - observed.lease.valid_until:.1f}s ago")
    if observed.drain.is_set():
        reasons.append("draining")
    return reasons


async def not_ready(observed: Observed) -> str | None:
    """Why the daemon should get no traffic, or None."""
    if observed.drain.is_set():
        return "draining"
    with trio.move_on_after(READY_TIMEOUT):
        try:
            async with observed.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return None
        except RETRYABLE_ERRORS as error:
            return f"database: {describe(error)}"
    return f"database: no answer within {READY_TIMEOUT:g}s"


async def _body_fits(scope: dict[str, Any], receive: Receive) -> bool:
    """Read (and drop) the request body; False as soon as it is over MAX_BODY."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            return False
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return True  # the client went away
        received += len(message.get("body", b""))
        if received > MAX_BODY:
            return False
        if not message.get("more_body", False):
            return True


async def _respond(send: Send, status: int, payload: dict[str, Any],
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, orjson.dumps(payload) + b"\n",
                [(b"content-type", b"application/json"), *(headers or [])])


async def _send(send: Send, status: int, body: bytes,
                headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
