"""The adapters' HTTP/1.1 client against raw servers on loopback: connection reuse, servers that
close or hang, and whether each failure can have reached the provider."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trustme

from sendd.providers import http11
from sendd.providers.http11 import Client, NoAnswer, NotSubmitted

Handler = Callable[[trio.SocketStream], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(stream: trio.abc.Stream) -> bytes:
    """One small request (head and body end with the client's one send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    return data


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server; yields its URL and a list that counts accepted connections."""
    accepted: list[int] = []

    async def counted(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await handler(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, counted, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", accepted
        nursery.cancel_scope.cancel()


async def answer_ok_forever(stream: trio.SocketStream) -> None:
    while await read_request(stream):
        await stream.send_all(OK)


async def hang_after_reading(stream: trio.SocketStream) -> None:
    await read_request(stream)
    await trio.sleep_forever()


def client(url: str, timeout: float = 5.0, connections: int = 4) -> Client:
    return Client(url, {"X-Key": "k"}, timeout=timeout, max_connections=connections)


async def test_requests_reuse_one_keep_alive_connection() -> None:
    async with server(answer_ok_forever) as (url, accepted):
        http = client(url)
        for _ in range(5):
            response = await http.request("POST", "/send", b"{}")
            assert (response.status, response.content) == (200, b"ok")
        await http.aclose()
    assert len(accepted) == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed() -> None:
    async def answer_once_then_close(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(OK)
        await stream.aclose()

    async with server(answer_once_then_close) as (url, accepted):
        http = client(url)
        assert (await http.request("POST", "/send", b"{}")).status == 200
        await trio.sleep(0.05)  # the server's close arrives while the connection is idle
        assert (await http.request("POST", "/send", b"{}")).status == 200
        await http.aclose()
    assert len(accepted) == 2


async def test_a_server_that_closes_without_answering_may_have_acted() -> None:
    async def close_after_reading(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.aclose()

    async with server(close_after_reading) as (url, _):
        with pytest.raises(NoAnswer, match="closed the connection"):
            await client(url).request("POST", "/send", b"{}")


async def test_a_server_that_hangs_may_have_acted_and_the_deadline_holds() -> None:
    async with server(hang_after_reading) as (url, _):
        started = trio.current_time()
        with pytest.raises(NoAnswer, match="within 0.2 s"):
            await client(url, timeout=0.2).request("POST", "/send", b"{}")
        assert trio.current_time() - started < 1.0


async def test_nothing_listening_is_not_submitted() -> None:
    async with server(answer_ok_forever) as (url, _):
        pass  # the port is free again
    with pytest.raises(NotSubmitted, match="cannot connect"):
        await client(url).request("POST", "/send", b"{}")


async def test_waiting_too_long_for_a_free_connection_is_not_submitted() -> None:
    async with server(hang_after_reading) as (url, _):
        http = client(url, timeout=1.0, connections=1)

        async def held() -> None:
            with contextlib.suppress(NoAnswer):
                await http.request("POST", "/held", b"{}")

        async with trio.open_nursery() as nursery:
            # Two requests hold the one connection in turn (0 to 1 s, 1 to 2 s), so a third,
            # queued at 0.2 s, still has none when its second is up.
            nursery.start_soon(held)
            await trio.sleep(0.1)
            nursery.start_soon(held)
            await trio.sleep(0.1)
            with pytest.raises(NotSubmitted, match="no free connection"):
                await http.request("POST", "/third", b"{}")


async def test_chunked_answers_headers_in_lower_case_and_the_base_path_is_kept() -> None:
    seen: list[bytes] = []

    async def chunked(stream: trio.SocketStream) -> None:
        seen.append(await read_request(stream))
        await stream.send_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n"
                              b"3\r\nslo\r\n4\r\nw on\r\n0\r\n\r\n")

    async with server(chunked) as (url, _):
        response = await client(url + "/base/").request("POST", "/send", b'{"a": 1}')
    assert (response.status, response.reason) == (429, "Too Many Requests")
    assert response.headers["retry-after"] == "3" and response.text == "slow on"
    head = seen[0].split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"post /base/send http/1.1")
    assert b"x-key: k" in head and b"content-length: 8" in head


async def test_an_answer_over_the_size_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "MAX_RESPONSE", 1000)

    async def huge(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)

    async with server(huge) as (url, _):
        with pytest.raises(NoAnswer, match="over 1000 bytes"):
            await client(url).request("POST", "/send", b"{}")


async def test_a_request_cancelled_mid_exchange_does_not_leave_its_connection_for_reuse() -> None:
    answered = trio.Event()

    async def slow_first(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep(0.5)  # the client gives up first; this connection must not be reused
        await stream.send_all(OK)
        answered.set()

    async with server(slow_first) as (url, accepted):
        http = client(url, connections=1)
        with trio.move_on_after(0.1):
            await http.request("POST", "/send", b"{}")
        with trio.fail_after(5):
            assert (await http.request("POST", "/send", b"{}")).status == 200
        assert len(accepted) == 2  # a second connection, whose answer is this request's own


def test_only_http_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Client("ftp://example.org", {}, timeout=1.0, max_connections=1)


async def test_https_verifies_the_provider_and_reuses_the_tls_connection() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    accepted: list[int] = []

    async def count_and_answer(stream: trio.SSLStream) -> None:
        accepted.append(1)
        while await read_request(stream):
            await stream.send_all(OK)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(
            trio.serve_ssl_over_tcp, count_and_answer, 0, server_context, host="127.0.0.1"))
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        http = Client(url, {}, timeout=5.0, max_connections=1, ssl_context=trusting)
        for _ in range(3):
            assert (await http.request("POST", "/send", b"{}")).content == b"ok"
        assert len(accepted) == 1
        # The system's CAs do not know this one: refused before any byte of the request left.
        with pytest.raises(NotSubmitted, match="CERTIFICATE_VERIFY_FAILED"):
            await Client(url, {}, timeout=5.0, max_connections=1).request("POST", "/send")
        nursery.cancel_scope.cancel()
