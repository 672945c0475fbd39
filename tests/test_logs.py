"""The daemon's log is one JSON object a line, whatever writes it: structlog, the stdlib
`logging` module (trio, hypercorn, asyncpg), warnings, uncaught exceptions."""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sendd import logs


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.CaptureFixture[str]]:
    """logs.configure() for this test; what it takes over is put back afterwards. (It runs on
    the first readout of the capture, in the test itself: pytest swaps sys.stderr per phase.)"""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook,
             sys.unraisablehook)
    monkeypatch.setattr(logs, "REPEAT_INTERVAL", 0.2)
    yield capsys
    root.handlers[:], root.level = saved[0], saved[1]
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved[2:]
    logging.captureWarnings(False)
    structlog.reset_defaults()


def start(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    logs.configure("info", "json")


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return [json.loads(line) for line in captured.err.splitlines()]


def test_stdlib_records_with_tracebacks_are_one_line_each(json_logs) -> None:
    start(json_logs)
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        logging.getLogger("trio.serve_listeners").error(
            "accept returned %s (%s); retrying in %s seconds", "EMFILE", "Too many open files",
            0.1, exc_info=True)
    structlog.get_logger().error("ours", exc_info=OSError(24, "x"))
    first, ours = lines(json_logs)
    assert first["event"] == ("accept returned EMFILE (Too many open files); "
                              "retrying in 0.1 seconds")
    assert first["logger"] == "trio.serve_listeners" and first["level"] == "error"
    assert "Traceback" in first["exception"] and "timestamp" in first
    assert ours["event"] == "ours" and "OSError" in ours["exception"]


def test_a_repeated_complaint_is_throttled_with_a_count(json_logs) -> None:
    start(json_logs)
    noisy = logging.getLogger("trio.serve_listeners")
    for _ in range(50):
        noisy.error("accept returned %s", "EMFILE")
    time.sleep(0.25)
    noisy.error("accept returned %s", "EMFILE")
    logging.getLogger("other").warning("something else")
    seen = lines(json_logs)
    assert [(line["event"], line.get("repeated")) for line in seen] == [
        ("accept returned EMFILE", None), ("accept returned EMFILE", 49),
        ("something else", None)]


def test_debug_records_are_below_the_level(json_logs) -> None:
    start(json_logs)
    logging.getLogger("asyncpg").debug("chatter")
    logging.getLogger("asyncpg").info("news")
    assert [line["event"] for line in lines(json_logs)] == ["news"]


def test_warnings_and_uncaught_exceptions_are_json_lines(json_logs) -> None:
    start(json_logs)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something is deprecated\nover two lines", DeprecationWarning,
                      stacklevel=1)

    def fail() -> None:
        raise ValueError("in a thread")

    thread = threading.Thread(target=fail, name="worker")
    thread.start()
    thread.join()

    class Broken:
        def __del__(self) -> None:
            raise RuntimeError("in a destructor")

    Broken()
    gc.collect()
    try:
        raise KeyError("at exit")
    except KeyError:
        sys.excepthook(*sys.exc_info())

    warning, in_thread, unraisable, at_exit = lines(json_logs)
    assert warning["logger"] == "py.warnings" and "deprecated" in warning["event"]
    assert in_thread["event"] == "thread_exception" and in_thread["thread"] == "worker"
    assert "in a thread" in in_thread["exception"]
    assert unraisable["event"] == "unraisable_exception"
    assert "in a destructor" in unraisable["exception"]
    assert at_exit["event"] == "uncaught_exception" and "at exit" in at_exit["exception"]
