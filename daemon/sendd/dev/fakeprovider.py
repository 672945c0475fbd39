"""A fake `mitto` bulk SMS provider (PROVIDERS.md) for tests, `sendd demo` and benchmarks.

It speaks HTTP/1.1 with keep-alive through a minimal h11-on-trio server. As the provider in
throughput benchmarks it must never be the bottleneck: with the same provider logic behind
hypercorn's trio worker (a raw ASGI app) it served about a third of the single-message
requests per CPU-second and ~80% of the 1000-message bulk requests.

Behaviour is driven by `FakeSettings`. The provider reads the settings object live, so an
in-process caller may mutate it; over HTTP, `POST /_control` takes a JSON object of the same
field names. Test endpoints (no auth, not counted in the stats):
`GET /_stats`, `POST /_reset`, `GET /_references`, `GET|POST /_control`, and
`POST /_accepted_at` (a JSON list of references -> when each was first accepted, Unix time).

Decision order for a send request: auth (401), `status_override`, malformed (400), over
`max_batch` (413), random 429, random 503, then per-message processing; a random `hang_rate`
share of the processed requests is answered only after `hang_seconds`. Everything is decided
and recorded when the request arrives; `latency_ms`/`jitter_ms` only delay the answer, like a
provider that accepts first and responds late. Random draws come from `random.Random(seed)`.
The random error rates apply to send requests only; lookups fail only with `lookup_fail`.
`message_id_prefix` is put before every messageId the fake gives out (answers and lookups), to
play a provider whose ids a database cannot store as they are (e.g. `"bad\u0000id-"`).

Run it: `python -m sendd.dev.fakeprovider --port 0 [...]`; it prints `{"port": N}` once listening.

The code: the knobs in sendd.dev.fakesettings, what the provider decides and records in
sendd.dev.fakemodel, the HTTP routing, server and command line here.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import traceback
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import orjson
import trio

from sendd.dev.fakemodel import FakeProvider, Reply, error_reply, json_reply
from sendd.dev.fakesettings import FakeSettings, apply_settings

__all__ = ["API", "FakeProvider", "FakeSettings", "Reply", "apply_settings", "main",
           "parse_args", "route", "serve"]

API = "/api/v1.1/Messages"
_RECV_SIZE = 64 * 1024


# -- routing ----------------------------------------------------------------------------------


def route(provider: FakeProvider, method: bytes, target: bytes, headers: list,
          body: bytes) -> Reply:
    """Answer one HTTP request (everything but the wait, which the server does)."""
    path, _, query = target.decode("latin-1").partition("?")
    if path.startswith("/_"):
        return _test_endpoint(provider, method, path, body)
    return provider.answered(_api(provider, method, path, query, headers, body))


def _api(provider: FakeProvider, method: bytes, path: str, query: str, headers: list,
         body: bytes) -> Reply:
    key = _header(headers, b"x-mitto-api-key")
    if key not in provider.settings.api_keys:
        return error_reply(401, "invalid api key")
    if method == b"POST" and path == API + "/sendmessagesbulk":
        return provider.send(key, body, bulk=True)
    if method == b"POST" and path == API + "/send":
        return provider.send(key, body, bulk=False)
    if method == b"GET" and path == API:
        return provider.lookup_reference(query)
    if method == b"GET" and path.startswith(API + "/"):
        return provider.lookup_id(unquote(path[len(API) + 1:]))
    return error_reply(404, "not found")


def _test_endpoint(provider: FakeProvider, method: bytes, path: str, body: bytes) -> Reply:
    if method == b"GET" and path == "/_stats":
        return json_reply(200, provider.stats())
    if method == b"POST" and path == "/_reset":
        provider.reset()
        return json_reply(200, {"ok": True})
    if method == b"GET" and path == "/_references":
        return json_reply(200, provider.references())
    if method == b"POST" and path == "/_accepted_at":
        return _accepted_at(provider, body)
    if path == "/_control" and method in (b"GET", b"POST"):
        return _control(provider, body if method == b"POST" else b"{}")
    return error_reply(404, "not found")


def _accepted_at(provider: FakeProvider, body: bytes) -> Reply:
    try:
        references = orjson.loads(body)
    except orjson.JSONDecodeError:
        references = None
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        return error_reply(400, "expected a JSON list of references (strings)")
    return json_reply(200, {r: provider.accepted_at(r) for r in references})


def _control(provider: FakeProvider, body: bytes) -> Reply:
    try:
        return json_reply(200, provider.control(orjson.loads(body)))
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return error_reply(400, str(exc))


def _header(headers: list, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


# -- HTTP/1.1 server -------------------------------------------------------------------------
# h11 parses each request; responses are written directly. h11's response encoding cost more
# than all the rest of a small request together, so each request gets a fresh parser (cheap)
# fed with the bytes left over from the previous one, and keep-alive is decided here.

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def serve(
    settings: FakeSettings | FakeProvider,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake until cancelled; `task_status.started(port)` once listening.

    Pass a FakeProvider instead of settings to read its stats in-process.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await _serve_on(settings, listeners, task_status=task_status)


async def _serve_on(
    settings: FakeSettings | FakeProvider,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    provider = settings if isinstance(settings, FakeProvider) else FakeProvider(settings)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_connection, provider), listeners)


async def _serve_connection(provider: FakeProvider, stream: trio.SocketStream) -> None:
    pending: bytes | None = b""
    async with stream:
        try:
            while pending is not None:
                pending = await _exchange(provider, stream, pending)
        except h11.RemoteProtocolError:
            await _send_quietly(stream, _encode(error_reply(400, "bad HTTP request"), False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (for instance after timing out on a hang)


async def _send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _exchange(provider: FakeProvider, stream: trio.SocketStream,
                    pending: bytes) -> bytes | None:
    """Serve one request; returns the bytes already read of the next one, or None to close."""
    conn = h11.Connection(h11.SERVER)
    if pending:
        conn.receive_data(pending)
    request = await _next_event(stream, conn)
    if type(request) is not h11.Request:
        return None
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(_CONTINUE)
    body = await _read_body(stream, conn)
    reply = _answer(provider, request, body)
    if reply.delay > 0:
        await trio.sleep(reply.delay)
    keep_alive = _keep_alive(request)
    await stream.send_all(_encode(reply, keep_alive))
    leftover, closed = conn.trailing_data
    return bytes(leftover) if keep_alive and not closed else None


def _keep_alive(request: h11.Request) -> bool:
    if request.http_version != b"1.1":
        return False
    return not any(name == b"connection" and b"close" in value.lower()
                   for name, value in request.headers)


def _answer(provider: FakeProvider, request: h11.Request, body: bytes) -> Reply:
    try:
        return route(provider, request.method, request.target, request.headers, body)
    except Exception:  # a bug must not take the whole fake (and a benchmark) down
        traceback.print_exc()
        return error_reply(500, "internal error in the fake provider")


def _encode(reply: Reply, keep_alive: bool) -> bytes:
    status, body = reply.status, reply.body
    head = [b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            % (status, _REASONS.get(status, b""), len(body))]
    head.extend(b"%s: %s\r\n" % header for header in reply.headers)
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(_RECV_SIZE))


async def _read_body(stream: trio.SocketStream, conn: h11.Connection) -> bytes:
    chunks = []
    while True:
        event = await _next_event(stream, conn)
        if type(event) is h11.Data:
            chunks.append(event.data)
        elif type(event) is h11.EndOfMessage:
            return b"".join(chunks)
        else:
            raise h11.RemoteProtocolError("connection closed mid-body")


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[FakeSettings, str, int]:
    """The CLI: one flag per FakeSettings field (`--latency-ms`, `--api-key K` repeatable)."""
    parser = argparse.ArgumentParser(prog="python -m sendd.dev.fakeprovider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    for name, default in dataclasses.asdict(FakeSettings()).items():
        _add_setting_flag(parser, name, default)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    settings = FakeSettings(**{k: v for k, v in args.items() if v is not None})
    return settings, host, port


def _add_setting_flag(parser: argparse.ArgumentParser, name: str, default: Any) -> None:
    flag = "--" + name.replace("_", "-")
    if type(default) is list:
        parser.add_argument("--api-key", dest=name, action="append",
                            help=f"accepted key, repeatable (default {default[0]})")
    elif type(default) is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
    else:
        parser.add_argument(flag, type=type(default), default=default,
                            help=f"(default {default!r})")


async def _run(settings: FakeSettings, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Bound outside the nursery so a busy port surfaces as a plain OSError.
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(_serve_on, settings, listeners)
            sys.stdout.write(orjson.dumps({"port": bound}).decode() + "\n")
            sys.stdout.flush()
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sendd.dev.fakeprovider`; exits 0 on SIGTERM/SIGINT."""
    settings, host, port = parse_args(argv)
    try:
        apply_settings(settings, dataclasses.asdict(settings))
    except ValueError as exc:
        print(f"fakeprovider: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_run, settings, host, port)
    except OSError as exc:
        print(f"fakeprovider: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass  # SIGINT before the signal receiver was installed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
