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
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import h11
import orjson
import trio

API = "/api/v1.1/Messages"
# A messageId is "b-<bulk>-<index>"; records store the pair packed in one int to keep a
# million-message benchmark run small in memory.
_INDEX_BITS = 20
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_RECV_SIZE = 64 * 1024
_ENTRY_FIELDS = ("from", "to", "text", "reference")
_entry_fields = itemgetter(*_ENTRY_FIELDS)


@dataclass
class FakeSettings:
    """The fake's behaviour knobs; each is a CLI flag and a `/_control` key."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_429_rate: float = 0.0
    retry_after: int = 1
    error_503_rate: float = 0.0
    status_override: int = 0
    max_batch: int = 1000
    reject_prefix: str = "+99"
    honour_references: bool = False
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    lookup_fail: bool = False
    message_id_prefix: str = ""
    api_keys: list[str] = field(default_factory=lambda: ["test-key"])
    seed: int = 0


class Reply(NamedTuple):
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    delay: float  # seconds to wait before answering


class BadRequest(Exception):
    """A malformed send request: answered 400 with the message."""


class _Window:
    """The largest sum of counts in any half-open 1-second window, kept incrementally."""

    __slots__ = ("events", "total", "peak")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0
        self.peak = 0

    def add(self, now: float, n: int) -> None:
        events = self.events
        events.append((now, n))
        self.total += n
        horizon = now - 1.0
        while events[0][0] <= horizon:
            self.total -= events.popleft()[1]
        if self.total > self.peak:
            self.peak = self.total


def _json(status: int, obj: Any, headers: list | None = None, delay: float = 0.0) -> Reply:
    return Reply(status, orjson.dumps(obj), headers or [], delay)


def _error(status: int, message: str, headers: list | None = None) -> Reply:
    return _json(status, {"error": message}, headers)


def _message_id(locator: int, prefix: str = "") -> str:
    return f"{prefix}b-{locator >> _INDEX_BITS}-{locator & _INDEX_MASK}"


def _check_entries(entries: Any) -> None:
    if not isinstance(entries, list) or not entries:
        raise BadRequest("messages must be a non-empty array")
    # Fast path in C: every entry has the four fields and all are strings.
    try:
        if set(map(type, chain.from_iterable(map(_entry_fields, entries)))) == {str}:
            return
    except (KeyError, TypeError):
        pass
    for i, entry in enumerate(entries):
        _check_entry(entry, f"messages[{i}]")


def _check_entry(entry: Any, where: str) -> None:
    if type(entry) is not dict:
        raise BadRequest(f"{where} must be an object")
    for name in _ENTRY_FIELDS:
        if type(entry.get(name)) is not str:
            raise BadRequest(f"{where}.{name} must be a string")


def _rejected(reference: str) -> dict:
    return {"reference": reference, "messageId": None, "status": "rejected",
            "errorCode": "INVALID_NUMBER", "errorMessage": "not a mobile number"}


class FakeProvider:
    """The provider's state and request handling, independent of the HTTP server."""

    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self._next_bulk = 0  # never reset, so ids stay unique for the process's life
        self.reset()

    def reset(self) -> None:
        self.counters = dict.fromkeys(
            ("requests", "send_requests", "messages", "accepted", "rejected",
             "deduplicated", "duplicate_sends"), 0)
        self.responses: dict[int, int] = {}
        self.records: dict[str, int] = {}  # reference -> locator of its first acceptance
        self.dup_counts: dict[str, int] = {}  # reference -> times accepted, when >= 2
        self.bulks: dict[int, tuple[float, list[str | None]]] = {}  # bulk -> (time, refs)
        self.msg_windows: dict[str, _Window] = {}
        self.req_windows: dict[str, _Window] = {}
        self.sender_windows: dict[str, _Window] = {}

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, method: bytes, target: bytes, headers: list, body: bytes) -> Reply:
        """Answer one HTTP request (everything but the wait, which the server does)."""
        path, _, query = target.decode("latin-1").partition("?")
        if path.startswith("/_"):
            return self._handle_test(method, path, body)
        reply = self._handle_api(method, path, query, headers, body)
        self.counters["requests"] += 1
        self.responses[reply.status] = self.responses.get(reply.status, 0) + 1
        s = self.settings
        if s.latency_ms > 0 or s.jitter_ms > 0:
            reply = reply._replace(delay=reply.delay + self._latency())
        return reply

    def _latency(self) -> float:
        s = self.settings
        jitter = self.rng.uniform(0, s.jitter_ms) if s.jitter_ms > 0 else 0.0
        return (s.latency_ms + jitter) / 1000.0

    def _handle_api(self, method: bytes, path: str, query: str, headers: list,
                    body: bytes) -> Reply:
        key = _header(headers, b"x-mitto-api-key")
        if key not in self.settings.api_keys:
            return _error(401, "invalid api key")
        if method == b"POST" and path == API + "/sendmessagesbulk":
            return self._send(key, body, bulk=True)
        if method == b"POST" and path == API + "/send":
            return self._send(key, body, bulk=False)
        if method == b"GET" and path == API:
            return self._lookup_reference(query)
        if method == b"GET" and path.startswith(API + "/"):
            return self._lookup_id(unquote(path[len(API) + 1:]))
        return _error(404, "not found")

    # -- sending ----------------------------------------------------------------------------

    def _send(self, key: str, body: bytes, *, bulk: bool) -> Reply:
        now = time.monotonic()
        self.counters["send_requests"] += 1
        _window(self.req_windows, key).add(now, 1)
        if self.settings.status_override:
            return self._overridden(self.settings.status_override)
        try:
            entries = self._parse_send(body, bulk)
        except BadRequest as exc:
            return _error(400, str(exc))
        refused = self._refusal(len(entries))
        if refused is not None:
            return refused
        bulk_no, results = self._process(key, entries, now)
        answer = {"bulkId": f"b-{bulk_no}", "messages": results} if bulk else results[0]
        return _json(200, answer, delay=self._hang())

    def _overridden(self, status: int) -> Reply:
        if status == 429:
            return self._too_many()
        return _error(status, f"status override {status}")

    def _parse_send(self, body: bytes, bulk: bool) -> list:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not bulk:
            _check_entry(doc, "body")
            return [doc]
        if type(doc) is not dict:
            raise BadRequest("body must be an object")
        entries = doc.get("messages")
        _check_entries(entries)
        return entries

    def _refusal(self, count: int) -> Reply | None:
        s = self.settings
        if count > s.max_batch:
            return _error(413, f"at most {s.max_batch} messages per request")
        if s.error_429_rate > 0 and self.rng.random() < s.error_429_rate:
            return self._too_many()
        if s.error_503_rate > 0 and self.rng.random() < s.error_503_rate:
            return _error(503, "service unavailable")
        return None

    def _too_many(self) -> Reply:
        retry = str(self.settings.retry_after).encode()
        return _error(429, "too many requests", [(b"retry-after", retry)])

    def _hang(self) -> float:
        s = self.settings
        if s.hang_rate > 0 and self.rng.random() < s.hang_rate:
            return s.hang_seconds
        return 0.0

    def _process(self, key: str, entries: list, now: float) -> tuple[int, list[dict]]:
        """Accept or reject each entry, record the accepted ones; returns (bulk, results)."""
        bulk_no = self._next_bulk
        self._next_bulk += 1
        base = bulk_no << _INDEX_BITS
        id_prefix = f"{self.settings.message_id_prefix}b-{bulk_no}-"
        records = self.records
        prefix = self.settings.reject_prefix
        refs: list[str | None] = []  # by index: the reference sent now, else None
        results: list[dict] = []
        # The hot loop of every benchmark: the common case (a new reference, a valid number)
        # is inlined; rejections and repeated references take the slow path.
        for index, entry in enumerate(entries):
            reference = entry["reference"]
            if reference in records or (prefix and entry["to"].startswith(prefix)):
                result, sent = self._unusual(entry, base | index)
            else:
                records[reference] = base | index
                result = {"reference": reference, "messageId": id_prefix + str(index),
                          "status": "accepted"}
                sent = reference
            results.append(result)
            refs.append(sent)
        self.bulks[bulk_no] = (time.time(), refs)
        self._count(key, len(entries), _senders(entries, refs), now)
        self._delivery_reports(bulk_no)
        return bulk_no, results

    def _unusual(self, entry: dict, locator: int) -> tuple[dict, str | None]:
        """A rejected entry or a repeated reference: its result, and its reference if sent."""
        reference = entry["reference"]
        prefix = self.settings.reject_prefix
        if prefix and entry["to"].startswith(prefix):
            self.counters["rejected"] += 1
            return _rejected(reference), None
        if self.settings.honour_references:
            # A provider that honours references answers with the original id, sends nothing.
            self.counters["deduplicated"] += 1
            return _accepted(reference, self._message_id(self.records[reference])), None
        self.dup_counts[reference] = self.dup_counts.get(reference, 1) + 1
        self.counters["duplicate_sends"] += 1
        return _accepted(reference, self._message_id(locator)), reference

    def _count(self, key: str, received: int, by_sender: dict[str, int], now: float) -> None:
        accepted = sum(by_sender.values())
        self.counters["messages"] += received
        self.counters["accepted"] += accepted
        _window(self.msg_windows, key).add(now, accepted)
        for sender, n in by_sender.items():
            _window(self.sender_windows, sender).add(now, n)

    def _delivery_reports(self, bulk_no: int) -> None:
        """Hook for delivery reports (a later issue): schedule DLRs for `self.bulks[bulk_no]`.

        The fake sends none yet; every accepted message simply stays "Sent".
        """

    # -- lookups ----------------------------------------------------------------------------

    def _lookup_reference(self, query: str) -> Reply:
        if self.settings.lookup_fail:
            return _error(500, "lookup failed")
        reference = parse_qs(query).get("reference", [None])[0]
        if reference is None:
            return _error(400, "reference is required")
        locator = self.records.get(reference)
        if locator is None:
            return _error(404, "not found")
        return _json(200, _lookup_body(self._message_id(locator), reference))

    def _lookup_id(self, message_id: str) -> Reply:
        if self.settings.lookup_fail:
            return _error(500, "lookup failed")
        reference = self._reference_of(message_id.removeprefix(self.settings.message_id_prefix))
        if reference is None:
            return _error(404, "not found")
        return _json(200, _lookup_body(message_id, reference))

    def _message_id(self, locator: int) -> str:
        return _message_id(locator, self.settings.message_id_prefix)

    def _reference_of(self, message_id: str) -> str | None:
        prefix, _, rest = message_id.partition("-")
        bulk, _, index = rest.partition("-")
        if prefix != "b" or not bulk.isdigit() or not index.isdigit():
            return None
        entry = self.bulks.get(int(bulk))
        refs = entry[1] if entry else []
        return refs[int(index)] if int(index) < len(refs) else None

    # -- test endpoints ---------------------------------------------------------------------

    def _handle_test(self, method: bytes, path: str, body: bytes) -> Reply:
        if method == b"GET" and path == "/_stats":
            return _json(200, self.stats())
        if method == b"POST" and path == "/_reset":
            self.reset()
            return _json(200, {"ok": True})
        if method == b"GET" and path == "/_references":
            return _json(200, self.references())
        if method == b"POST" and path == "/_accepted_at":
            return self._accepted_at(body)
        if path == "/_control" and method in (b"GET", b"POST"):
            return self._control(body if method == b"POST" else b"{}")
        return _error(404, "not found")

    def stats(self) -> dict:
        """The counters of `GET /_stats`."""
        return {
            **self.counters,
            "distinct_references": len(self.records),
            "duplicate_references": len(self.dup_counts),
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "max_msgs_per_1s": _peaks(self.msg_windows),
            "max_reqs_per_1s": _peaks(self.req_windows),
            "max_msgs_per_1s_by_sender": _peaks(self.sender_windows),
        }

    def references(self) -> list[dict]:
        """Every accepted reference with how many times it was sent, first acceptance first."""
        dups = self.dup_counts
        return [{"reference": r, "count": dups.get(r, 1)} for r in self.records]

    def accepted_at(self, reference: str) -> float | None:
        """When the request that first carried `reference` arrived (benchmarks: latency)."""
        locator = self.records.get(reference)
        return None if locator is None else self.bulks[locator >> _INDEX_BITS][0]

    def _accepted_at(self, body: bytes) -> Reply:
        try:
            references = orjson.loads(body)
        except orjson.JSONDecodeError:
            references = None
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            return _error(400, "expected a JSON list of references (strings)")
        return _json(200, {r: self.accepted_at(r) for r in references})

    def _control(self, body: bytes) -> Reply:
        try:
            changes = orjson.loads(body)
            apply_settings(self.settings, changes)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            return _error(400, str(exc))
        if "seed" in changes:
            self.rng.seed(self.settings.seed)
        return _json(200, dataclasses.asdict(self.settings))


def _senders(entries: list, refs: list[str | None]) -> dict[str, int]:
    """How many messages each sender had accepted (sent) in one request."""
    counts: dict[str, int] = {}
    for entry, ref in zip(entries, refs, strict=True):
        if ref is not None:
            sender = entry["from"]
            counts[sender] = counts.get(sender, 0) + 1
    return counts


def _accepted(reference: str, message_id: str) -> dict:
    return {"reference": reference, "messageId": message_id, "status": "accepted"}


def _lookup_body(message_id: str, reference: str) -> dict:
    return {"messageId": message_id, "reference": reference, "status": "Sent",
            "errorCode": None}


def _window(windows: dict[str, _Window], key: str) -> _Window:
    window = windows.get(key)
    if window is None:
        window = windows[key] = _Window()
    return window


def _peaks(windows: dict[str, _Window]) -> dict[str, int]:
    return {key: w.peak for key, w in windows.items()}


def _header(headers: list, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


# -- settings ---------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(FakeSettings)}


def apply_settings(settings: FakeSettings, changes: Any) -> None:
    """Validate a `/_control` object and apply it; raises ValueError naming the bad key."""
    if type(changes) is not dict:
        raise ValueError("expected a JSON object")
    checked = {name: _check_setting(name, value) for name, value in changes.items()}
    for name, value in checked.items():
        setattr(settings, name, value)


def _check_setting(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        raise ValueError(f"unknown setting {name!r}")
    checked = _typed(getattr(FakeSettings(), name), value)
    if checked is None:
        raise ValueError(f"bad value for {name}: {value!r}")
    if name.endswith("_rate") and checked > 1:
        raise ValueError(f"{name} is a fraction, at most 1")
    if name == "status_override" and checked and not 400 <= checked <= 599:
        raise ValueError("status_override must be 0 or 400..599")
    return checked


def _typed(default: Any, value: Any) -> Any:
    """`value` converted to the type of `default`, or None when it does not fit (or < 0)."""
    if type(default) is float and type(value) in (int, float) and value >= 0:
        return float(value)
    if type(default) is int and type(value) is int and value >= 0:
        return value
    if type(default) in (str, bool) and type(value) is type(default):
        return value
    if type(default) is list and _is_key_list(value):
        return list(value)
    return None


def _is_key_list(value: Any) -> bool:
    return type(value) is list and bool(value) and all(type(v) is str for v in value)


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
            await _send_quietly(stream, _encode(_error(400, "bad HTTP request"), False))
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
        return provider.handle(request.method, request.target, request.headers, body)
    except Exception:  # a bug must not take the whole fake (and a benchmark) down
        traceback.print_exc()
        return _error(500, "internal error in the fake provider")


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
