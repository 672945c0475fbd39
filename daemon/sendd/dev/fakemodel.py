"""What the fake `mitto` provider does with a request, apart from HTTP (sendd.dev.fakeprovider
serves it): `FakeProvider` decides each send and lookup as `FakeSettings` say, records what it
accepted, and keeps the counters of `GET /_stats`.

Decision order for a send request (after the server's auth check): `status_override`, malformed
(400), over `max_batch` (413), random 429, random 503, then per-message processing; a random
`hang_rate` share of the processed requests is answered only after `hang_seconds`. Everything
is decided and recorded when the request arrives; `latency_ms`/`jitter_ms` only delay the
answer. Random draws come from `random.Random(seed)`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import deque
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

from sendd.dev.fakesettings import FakeSettings, apply_settings

# A messageId is "b-<bulk>-<index>"; records store the pair packed in one int to keep a
# million-message benchmark run small in memory.
_INDEX_BITS = 20
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_ENTRY_FIELDS = ("from", "to", "text", "reference")
_entry_fields = itemgetter(*_ENTRY_FIELDS)


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


def json_reply(status: int, obj: Any, headers: list | None = None, delay: float = 0.0) -> Reply:
    return Reply(status, orjson.dumps(obj), headers or [], delay)


def error_reply(status: int, message: str, headers: list | None = None) -> Reply:
    return json_reply(status, {"error": message}, headers)


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

    # -- answers ----------------------------------------------------------------------------

    def answered(self, reply: Reply) -> Reply:
        """Count the answer to an API request and delay it by the configured latency."""
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

    # -- sending ----------------------------------------------------------------------------

    def send(self, key: str, body: bytes, *, bulk: bool) -> Reply:
        """A send request (bulk or one message) from an accepted API key."""
        now = time.monotonic()
        self.counters["send_requests"] += 1
        _window(self.req_windows, key).add(now, 1)
        if self.settings.status_override:
            return self._overridden(self.settings.status_override)
        try:
            entries = self._parse_send(body, bulk)
        except BadRequest as exc:
            return error_reply(400, str(exc))
        refused = self._refusal(key, len(entries))
        if refused is not None:
            return refused
        bulk_no, results = self._process(key, entries, now)
        answer = {"bulkId": f"b-{bulk_no}", "messages": results} if bulk else results[0]
        return json_reply(200, answer, delay=self._hang())

    def _overridden(self, status: int) -> Reply:
        if status == 429:
            return self._too_many()
        return error_reply(status, f"status override {status}")

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

    def _refusal(self, key: str, count: int) -> Reply | None:
        s = self.settings
        if count > s.max_batch:
            return error_reply(413, f"at most {s.max_batch} messages per request")
        targeted = s.error_key in ("", key)
        if targeted and s.error_429_rate > 0 and self.rng.random() < s.error_429_rate:
            return self._too_many()
        if targeted and s.error_503_rate > 0 and self.rng.random() < s.error_503_rate:
            return error_reply(503, "service unavailable")
        return None

    def _too_many(self) -> Reply:
        retry = str(self.settings.retry_after).encode()
        return error_reply(429, "too many requests", [(b"retry-after", retry)])

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

    def lookup_reference(self, query: str) -> Reply:
        """`GET /Messages?reference=...`: the message a reference was accepted as."""
        if self.settings.lookup_fail:
            return error_reply(500, "lookup failed")
        reference = parse_qs(query).get("reference", [None])[0]
        if reference is None:
            return error_reply(400, "reference is required")
        locator = self.records.get(reference)
        if locator is None:
            return error_reply(404, "not found")
        return json_reply(200, _lookup_body(self._message_id(locator), reference))

    def lookup_id(self, message_id: str) -> Reply:
        """`GET /Messages/<id>`."""
        if self.settings.lookup_fail:
            return error_reply(500, "lookup failed")
        reference = self._reference_of(message_id.removeprefix(self.settings.message_id_prefix))
        if reference is None:
            return error_reply(404, "not found")
        return json_reply(200, _lookup_body(message_id, reference))

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

    def control(self, changes: Any) -> dict:
        """Apply `/_control` changes (ValueError when one is bad); the settings after them."""
        apply_settings(self.settings, changes)
        if "seed" in changes:
            self.rng.seed(self.settings.seed)
        return dataclasses.asdict(self.settings)


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
