"""The control socket's protocol: one JSON object a line in each direction (docs/CONTRACT.md).

Pure apart from the line reader's reads: a line in, a `Request` or a `BadRequest` out; a reply
dict in, its bytes out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import trio

MAX_LINE = 64 * 1024  # bytes in one request line, newline excluded
IDLE_TIMEOUT = 600.0  # a connection that sends nothing for this long is closed
LINE_TIMEOUT = 5.0  # once a request line has begun, the rest must arrive within this time
RECEIVE_SIZE = 16 * 1024

SCOPES = ("all", "tenant", "campaign", "account")
MAX_RATE = 1_000_000  # as for accounts.*.msgs_per_s in the configuration


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
        return BadRequest(f"unknown command {show(cmd)} (commands: {', '.join(_ARGUMENTS)})")
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
        raise _Invalid(f'"scope" must be one of {expected}, got {show(scope)}')
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
        raise _Invalid(f"unknown argument {show(unknown[0])} ({accepted})")


def _integer(value: Any, key: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:  # `type is`: true is not 1 here
        raise _Invalid(f'"{key}" must be an integer between {lo} and {hi}, got {show(value)}')
    return value


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200 or not value.isprintable():
        raise _Invalid(f'"{key}" must be a name of 1 to 200 printable characters, '
                       f"got {show(value)}")
    return value


def show(value: Any) -> str:
    """A value as an error message quotes it: JSON keeps the text on one line and tells "5"
    from 5; long values are cut."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


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
