"""The sd_notify protocol against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sendd.notify import Notifier, watchdog_interval


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that reaches it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)  # a missing message fails the test instead of hanging it
        yield sock, str(path)


def test_messages_reach_the_socket(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.status("draining: 3 batches in flight")
    assert notifier.stopping()
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"WATCHDOG=1", b"STATUS=draining: 3 batches in flight",
                        b"STOPPING=1"]


def test_status_stays_on_one_line(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    Notifier.from_environ({"NOTIFY_SOCKET": path}).status("first\nsecond")
    assert sock.recv(4096) == b"STATUS=first second"


def test_several_fields_make_one_message(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    Notifier.from_environ({"NOTIFY_SOCKET": path}).notify("READY=1", "STATUS=serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_reads_the_process_environment(systemd: tuple[socket.socket, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier.from_environ().ready()
    assert sock.recv(4096) == b"READY=1"


def test_abstract_socket_name() -> None:
    name = f"sendd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}])
def test_without_notify_socket_calls_do_nothing(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    with capture_logs() as logs:
        results = [notifier.ready(), notifier.watchdog(), notifier.status("x"),
                   notifier.stopping()]
    assert results == [False, False, False, False]
    assert logs == []


def test_unsupported_notify_socket_is_disabled_with_a_warning() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["notify_socket_unsupported"]


def test_send_error_is_logged_once_and_not_raised(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("notify_failed", "warning"), ("notify_failed", "debug")]


def test_a_full_receiver_never_blocks_the_sender(systemd: tuple[socket.socket, str]) -> None:
    _, path = systemd  # never read: its queue fills, and sends must fail instead of waiting
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    with capture_logs():
        results = [notifier.watchdog() for _ in range(2000)]
    assert results[0]
    assert not results[-1]


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process's
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "1.5"}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
