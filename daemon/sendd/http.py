"""The HTTP server: /healthz, /readyz and /metrics, served by hypercorn inside the daemon.

A raw ASGI app (no framework). Bodies over 1 MiB are refused with 413; unknown paths get 404
and other methods than GET 405. An address that cannot be bound is logged and the daemon runs
on without the server, like the control socket.
"""

from __future__ import annotations

import functools
from typing import Any

import hypercorn.trio
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from prometheus_client import CONTENT_TYPE_LATEST

from sendd.db import RETRYABLE_ERRORS
from sendd.metrics import refresh_database_gauges
from sendd.runtime import Runtime

MAX_BODY = 1024 * 1024
RESTART_MEMORY = 60.0  # an actor that crashed this recently makes /healthz fail
READY_TIMEOUT = 2.0

Send = Any
Receive = Any


async def serve_http(runtime: Runtime,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled (the daemon's nursery ends it after the drain)."""
    listen = runtime.config.daemon.http_listen
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None  # the daemon logs as JSON; hypercorn's plain lines would mix in
    bound = False
    try:
        async with trio.open_nursery() as nursery:
            # hypercorn handles no signals here: the daemon's own handlers drain, and the
            # cancellation of this actor stops the server.
            serve = functools.partial(hypercorn.trio.serve, App(runtime), config,
                                      shutdown_trigger=trio.sleep_forever)
            binds = await nursery.start(serve)
            bound = True
            runtime.log.info("http_listening", address=listen, binds=binds)
            nursery.start_soon(refresh_database_gauges, runtime)
            task_status.started()
    except* OSError as group:
        if bound:
            raise
        error = group.exceptions[0]
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        runtime.log.error("http_unavailable", address=listen,
                          error=getattr(error, "strerror", None) or repr(error))
        task_status.started()


class App:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.routes = {"/healthz": self.healthz, "/readyz": self.readyz,
                       "/metrics": self.metrics}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    async def http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if not await _body_fits(scope, receive):
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
        reasons = health_problems(self.runtime)
        if reasons:
            await _respond(send, 503, {"ok": False, "reasons": reasons})
        else:
            await _respond(send, 200, {"ok": True})

    async def readyz(self, send: Send) -> None:
        reason = await not_ready(self.runtime)
        if reason:
            await _respond(send, 503, {"ok": False, "reason": reason})
        else:
            await _respond(send, 200, {"ok": True})

    async def metrics(self, send: Send) -> None:
        body = self.runtime.metrics.render()
        await _send(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])


def health_problems(runtime: Runtime) -> list[str]:
    """Why the daemon is unhealthy, or nothing."""
    now = trio.current_time()
    reasons = [f"{actor}: {reason}" for actor, reason in sorted(runtime.current_problems().items())]
    for actor, at in sorted(runtime.crashed_at.items()):
        if now - at < RESTART_MEMORY:
            reasons.append(f"{actor}: restarted {now - at:.0f}s ago "
                           f"({runtime.restarts.get(actor, 0)} restarts)")
    reasons += runtime.breakers.problems(now)
    for actor, busy in sorted(runtime.stalled().items()):
        reasons.append(f"{actor}: wedged, no progress for {busy:.0f}s")
    if runtime.lease_valid_until < now:
        reasons.append(f"lease not renewed: expired {now - runtime.lease_valid_until:.1f}s ago")
    if runtime.drain.is_set():
        reasons.append("draining")
    return reasons


async def not_ready(runtime: Runtime) -> str | None:
    """Why the daemon should get no traffic, or None."""
    if runtime.drain.is_set():
        return "draining"
    with trio.move_on_after(READY_TIMEOUT):
        try:
            async with runtime.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return None
        except RETRYABLE_ERRORS as error:
            return f"database: {error or type(error).__name__}"
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


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, payload: dict[str, Any],
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, orjson.dumps(payload) + b"\n",
                [(b"content-type", b"application/json"), *(headers or [])])


async def _send(send: Send, status: int, body: bytes,
                headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
