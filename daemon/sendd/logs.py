"""Structured logs: one JSON object a line on stderr (or a readable console format).

Everything the daemon writes to stderr goes through here, so the log stays one object a line
whatever happens: structlog's own events, records of the stdlib `logging` module (trio,
hypercorn, asyncpg, ...), warnings, and exceptions nobody caught (at exit, in a thread, in a
destructor). A traceback goes into the "exception" field of its line. A library that logs the
same complaint in a loop (trio's accept loop when descriptors run out, say) is throttled to
one line per REPEAT_INTERVAL with a count of what was held back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any

import structlog

REPEAT_INTERVAL = 10.0  # seconds between two lines of the same repeated complaint


class Throttle:
    """One event per key every `interval` seconds; counts the ones it holds back."""

    def __init__(self, interval: float = REPEAT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None to hold this event back; otherwise how many were held back since the last one
        let through (0 the first time)."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class _RepeatFilter(logging.Filter):
    """Throttles stdlib records by logger, level and message template."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle(REPEAT_INTERVAL)
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            held = self.throttle.allow((record.name, record.levelno, str(record.msg)))
        if held is None:
            return False
        if held:
            record.repeated = held
        return True


def configure(level: str = "info", fmt: str = "json") -> None:
    """Log at `level` and above to stderr, as JSON lines (`fmt` "json") or for people
    ("console"); also take over the stdlib logging, warnings and uncaught-exception output."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    stamp = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
             structlog.processors.TimeStamper(fmt="iso", utc=True)]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*stamp, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(numeric, stamp, renderer)
    _route_uncaught_exceptions()


def _route_stdlib_logging(level: int, stamp: list[Any], renderer: Any) -> None:
    """Records of the `logging` module as lines like structlog's: "event" is the message,
    "logger" the logger's name. Replaces every root handler, so Python's last-resort handler
    (plain text) never runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*stamp, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder(allow=["repeated"])],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become records of the "py.warnings" logger


def _route_uncaught_exceptions() -> None:
    log = structlog.get_logger()

    def at_exit(kind: type[BaseException], error: BaseException,
                traceback: TracebackType | None) -> None:
        log.critical("uncaught_exception", exc_info=(kind, error, traceback))

    def in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None:
            return
        log.error("thread_exception", thread=getattr(args.thread, "name", None),
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable(args: Any) -> None:
        exc_info = ((args.exc_type, args.exc_value, args.exc_traceback)
                    if args.exc_value is not None else None)
        log.error("unraisable_exception", detail=args.err_msg or "exception ignored",
                  object=repr(args.object)[:200], exc_info=exc_info)

    sys.excepthook = at_exit
    threading.excepthook = in_thread
    sys.unraisablehook = unraisable
