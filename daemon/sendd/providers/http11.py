"""A lean keep-alive HTTP/1.1 client for the provider adapters: h11 on trio streams.

Why not httpx (the adapters used it until 2026-12-01): sending one-message requests is bound by
the client's CPU per request, and on the 2-core benchmark VM, 16 concurrent requests to the fake
provider cost ~600 us of CPU each through httpx, ~400 us through plain httpcore and ~150 us as
h11 on a trio stream. This client is that last one plus what a sender needs: connection reuse,
one request per connection at a time, TLS, a deadline per phase, and errors that say whether
the request can have reached the provider (which decides between resending and looking up).

What it leaves out, because provider APIs do not need it: redirects, cookies, proxies,
compression, HTTP/2 and retries (the sender decides about retries).
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from sendd.errors import describe

MAX_RESPONSE = 16 * 1024 * 1024  # a 1,000-message bulk answer is ~100 KB
READ_SIZE = 65536
USER_AGENT = b"sendd"
_CLOSED = "the server closed the connection without a complete answer"


class NotSubmitted(Exception):
    """No byte of the request can have reached the server (no free connection within the
    deadline, or no connection): resending is safe."""


class LocalFailure(NotSubmitted):
    """This machine could not even try (out of file descriptors, buffers or memory): says
    nothing about the provider or the message."""


# Errors of our own making when opening a connection, not the provider's.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class NoAnswer(Exception):
    """The request may have reached the server but no complete answer came (deadline, broken
    connection, malformed answer): the provider may have acted on it."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Client:
    """Requests to one origin over at most `max_connections` keep-alive connections.

    `timeout` bounds each phase a request can wait in: a free connection, connecting, and the
    whole exchange from the first byte sent to the last byte of the answer.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float,
                 max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._tls = url.scheme == "https"
        self._port = url.port or (443 if self._tls else 80)
        self._prefix = url.path.rstrip("/")
        self._headers = [(b"host", url.netloc.encode()), (b"user-agent", USER_AGENT),
                         *((k.encode(), v.encode()) for k, v in headers.items())]
        self.timeout = timeout
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False
        # https: the system's CAs, unless the caller brings its own context (tests do).
        self._ssl_context = (ssl_context or ssl.create_default_context()) if self._tls else None

    async def request(self, method: str, path: str, body: bytes = b"") -> Response:
        with trio.move_on_after(self.timeout) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise NotSubmitted(f"no free connection within {self.timeout:g} s")
        try:
            connection = await self._reusable() or await self._connect()
            response = await connection.exchange(self._request(method, path, body), self.timeout)
            if connection.reusable() and not self._closed:
                self._idle.append(connection)
            else:
                await connection.close()
            return response
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            await self._idle.pop().close()

    def _request(self, method: str, path: str, body: bytes) -> list[h11.Event]:
        headers = self._headers
        if body or method == "POST":
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        events: list[h11.Event] = [h11.Request(method=method, target=self._prefix + path,
                                               headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        return events

    async def _reusable(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            # An idle connection with something to read was closed by the server (or sent
            # garbage): using it would fail after the request went out, which is ambiguous.
            if not connection.readable_while_idle():
                return connection
            await connection.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self.timeout):
                if self._ssl_context is None:
                    stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
                else:
                    stream = await trio.open_ssl_over_tcp_stream(
                        self._host, self._port, ssl_context=self._ssl_context,
                        https_compatible=True)
                    await stream.do_handshake()
        except trio.TooSlowError:
            raise NotSubmitted(f"connect timed out after {self.timeout:g} s") from None
        except OSError as error:
            if _is_local(error):
                raise LocalFailure(f"cannot open a connection: {_reason(error)}") from None
            raise NotSubmitted(f"cannot connect: {_reason(error)}") from None
        except trio.BrokenResourceError as error:
            raise NotSubmitted(f"cannot connect: {_reason(error)}") from None
        return _Connection(stream)


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.protocol = h11.Connection(h11.CLIENT)

    def readable_while_idle(self) -> bool:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket.is_readable()

    def reusable(self) -> bool:
        if self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE:
            self.protocol.start_next_cycle()
            return True
        return False

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def exchange(self, events: list[h11.Event], timeout: float) -> Response:
        try:
            with trio.fail_after(timeout):
                await self.stream.send_all(b"".join(self.protocol.send(e) or b"" for e in events))
                return await self._receive()
        except trio.TooSlowError:
            await self.close()
            raise NoAnswer(f"no complete answer within {timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                h11.ProtocolError) as error:
            await self.close()
            raise NoAnswer(_reason(error)) from None
        except BaseException:
            # Cancelled mid-exchange: the connection is in an unknown state.
            await self.close()
            raise

    async def _receive(self) -> Response:
        head: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self.protocol.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(READ_SIZE)
                if not data and head is None:
                    raise h11.RemoteProtocolError(_CLOSED)
                self.protocol.receive_data(data)  # b"" ends an answer delimited by the close
            elif type(event) is h11.Response:
                head = event
            elif type(event) is h11.Data:
                size += len(event.data)
                if size > MAX_RESPONSE:
                    raise h11.RemoteProtocolError(f"answer over {MAX_RESPONSE} bytes")
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                assert head is not None  # h11 sends Response before EndOfMessage
                return Response(head.status_code, head.reason.decode("latin-1"),
                                {k.decode("latin-1"): v.decode("latin-1")
                                 for k, v in head.headers},
                                b"".join(chunks))
            elif type(event) is h11.ConnectionClosed:
                raise h11.RemoteProtocolError(_CLOSED)
            # InformationalResponse (1xx): wait for the final answer.


def _is_local(error: BaseException) -> bool:
    """An errno of our own making anywhere in the error (trio's connect reports each address's
    failure in an exception group behind its own OSError)."""
    if getattr(error, "errno", None) in LOCAL_ERRNOS:
        return True
    if isinstance(error, BaseExceptionGroup):
        return any(_is_local(e) for e in error.exceptions)
    return error.__cause__ is not None and _is_local(error.__cause__)


def _reason(error: BaseException) -> str:
    """The error in a line; trio's BrokenResourceError says nothing itself, its cause does
    (a TLS verification failure, a reset connection)."""
    while not str(error) and error.__cause__ is not None:
        error = error.__cause__
    return describe(error, typed=True)
