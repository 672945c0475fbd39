"""The listeners' building blocks in-process: the bounded accept loop and its handling of
EMFILE, the control socket's line reader and eviction, and the HTTP send timeout."""

from __future__ import annotations

import errno
import resource
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sendd import listeners
from sendd.control.protocol import LineReader, LineTimeout, LineTooLong
from sendd.control.server import Connection, ControlServer
from sendd.http.operators import GuardedStream
from sendd.logs import Throttle


class Events:
    """A stand-in for the daemon's structlog logger: keeps (event, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _log(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    error = warning = info = _log


def test_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.allow("emfile") == 0
    for _ in range(5):
        now[0] += 1
        assert throttle.allow("emfile") is None
    assert throttle.allow("other") == 0
    now[0] = 10.0
    assert throttle.allow("emfile") == 5
    assert throttle.allow("emfile") is None


def test_connection_limit_is_a_share_of_the_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
        assert listeners.connection_limit(64, 1 / 8) == 25
        assert listeners.connection_limit(10, 1 / 8) == 10
        resource.setrlimit(resource.RLIMIT_NOFILE, (4, hard))
        assert listeners.connection_limit(64, 1 / 8) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class NoDescriptors:
    """A listener whose accept fails with EMFILE until `failures` are used up."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def accept(self) -> Any:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()


async def test_accept_waits_out_emfile_and_logs_one_line_per_interval(
        autojump_clock: trio.testing.MockClock) -> None:
    log = Events()
    throttle = Throttle(10.0, clock=trio.current_time)
    with trio.move_on_after(60):
        # 100 failures, ACCEPT_RETRY (0.5 s) apart: 50 s, so five lines of 10 s each.
        await listeners.accept(NoDescriptors(100), log, "http", throttle)  # type: ignore[arg-type]
    assert [event for event, _ in log.seen] == ["accept_failed"] * 5
    first, second = log.seen[0][1], log.seen[1][1]
    assert first == {"listener": "http", "error": "EMFILE", "detail": "Too many open files",
                     "retry_in": listeners.ACCEPT_RETRY, "repeated": 0}
    assert second["repeated"] == 19


async def test_accept_raises_other_errors() -> None:
    class Broken:
        async def accept(self) -> Any:
            raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file"):
        await listeners.accept(Broken(), Events(), "http", Throttle())  # type: ignore[arg-type]


async def test_serve_bounded_holds_at_most_limit_and_asks_for_room(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = await _bound_listener(path)
    running: list[trio.SocketStream] = []
    release = trio.Event()
    room_asked = []

    async def handler(stream: trio.SocketStream) -> None:
        running.append(stream)
        await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: listeners.serve_bounded(
            listener, handler, limit=2, log=Events(), name="t",
            make_room=lambda: room_asked.append(1)))
        clients = [await trio.open_unix_socket(str(path)) for _ in range(3)]
        await trio.sleep(0.2)
        assert len(running) == 2 and room_asked == [1]  # the third waits in the queue
        release.set()
        await trio.sleep(0.2)
        assert len(running) == 3
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()


async def _bound_listener(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    return trio.SocketListener(sock)


async def test_a_handler_error_ends_only_its_connection(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = await _bound_listener(path)
    log = Events()
    served = []

    async def handler(stream: trio.SocketStream) -> None:
        served.append(1)
        if len(served) == 1:
            raise RuntimeError("boom")
        await stream.send_all(b"ok")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: listeners.serve_bounded(listener, handler, limit=1, log=log,
                                                           name="t"))
        first = await trio.open_unix_socket(str(path))
        assert await first.receive_some(10) == b""  # closed by the failed handler
        second = await trio.open_unix_socket(str(path))
        assert await second.receive_some(10) == b"ok"
        nursery.cancel_scope.cancel()
    assert log.seen[0][0] == "connection_failed" and "boom" in log.seen[0][1]["error"]


# --- the control socket's line reader and eviction ------------------------------------------


async def test_line_reader_times_out_a_started_line(
        autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    lines = LineReader(server, idle_timeout=600, line_timeout=5)
    await client.send_all(b'{"cmd": "status"}\n{"cmd"')
    assert await lines.next_line() == b'{"cmd": "status"}'
    began = trio.current_time()
    with pytest.raises(LineTimeout):
        await lines.next_line()
    assert trio.current_time() - began == pytest.approx(5)


async def test_line_reader_waits_idle_timeout_between_lines(
        autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    lines = LineReader(server, idle_timeout=600, line_timeout=5)
    began = trio.current_time()
    assert await lines.next_line() is None
    assert trio.current_time() - began == pytest.approx(600)


async def test_line_reader_gives_a_slow_line_its_line_timeout_from_the_first_byte(
        autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    lines = LineReader(server, idle_timeout=600, line_timeout=5)

    async def dribble() -> None:
        await trio.sleep(100)  # idle for a while: that is allowed
        for byte in b'{"cmd": "status"}\n':
            await client.send_all(bytes([byte]))
            await trio.sleep(0.2)  # 18 bytes in 3.6 s: within 5 s

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        assert await lines.next_line() == b'{"cmd": "status"}'


async def test_line_reader_still_refuses_long_lines() -> None:
    client, server = trio.testing.memory_stream_pair()
    lines = LineReader(server, limit=10)
    await client.send_all(b"x" * 20)
    with pytest.raises(LineTooLong):
        await lines.next_line()


async def test_make_room_evicts_the_connection_idle_longest(
        autojump_clock: trio.testing.MockClock) -> None:
    server = ControlServer(None, limit=3)  # type: ignore[arg-type]  # eviction only
    oldest, busy, newer = Connection(), Connection(), Connection()
    await trio.sleep(1)
    newer.idle()
    busy.busy = True
    server.connections = {oldest, busy, newer}
    waited = []

    async def wait_for_a_line(connection: Connection) -> None:
        with connection.interruptible():
            await trio.sleep_forever()
        waited.append(connection)

    async with trio.open_nursery() as nursery:
        for connection in (oldest, newer):
            nursery.start_soon(wait_for_a_line, connection)
        await trio.sleep(1)
        server.make_room()
        await trio.sleep(1)
        assert waited == [oldest] and oldest.evicted and not newer.evicted
        server.make_room()
        await trio.sleep(1)
        assert waited == [oldest, newer]  # the busy one is never evicted
        server.make_room()
        assert not busy.evicted


async def test_an_eviction_before_the_wait_ends_the_next_wait_at_once() -> None:
    connection = Connection()
    connection.evict()
    with connection.interruptible():
        await trio.sleep_forever()
    assert connection.evicted


# --- the HTTP server's send timeout ----------------------------------------------------------


async def test_a_client_that_does_not_read_is_dropped(
        autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.lockstep_stream_pair()  # a send waits for a receive
    guarded = GuardedStream(ours)  # type: ignore[arg-type]
    began = trio.current_time()
    with pytest.raises(trio.BrokenResourceError, match="read nothing"):
        await guarded.send_all(b"HTTP/1.1 200 OK\r\n")
    assert trio.current_time() - began == pytest.approx(10)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"more")


async def test_a_line_sent_along_with_the_previous_one_gets_its_own_time(
        autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    lines = LineReader(server, idle_timeout=600, line_timeout=5)
    await client.send_all(b'{"cmd": "reload"}\n{"cmd"')
    assert await lines.next_line() == b'{"cmd": "reload"}'
    await trio.sleep(20)  # serving the first request took long

    async def finish() -> None:
        await trio.sleep(3)
        await client.send_all(b': "status"}\n')

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish)
        assert await lines.next_line() == b'{"cmd": "status"}'
