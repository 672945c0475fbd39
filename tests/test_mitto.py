"""The mitto adapter against a raw HTTP server on loopback, for answers the fake never gives."""

from __future__ import annotations

from functools import partial

import trio

from sendd.actors.sender import speaking_for
from sendd.config import AccountConfig
from sendd.model import Message
from sendd.providers import base
from sendd.providers.mitto import MittoProvider


async def _answer_with(body: bytes, stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)  # the request (small enough for one read here)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    await stream.send_all(head.encode() + body)
    await stream.aclose()


async def _send_one(body: bytes, *, single: bool = False) -> base.SendResponse:
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, partial(_answer_with, body), 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        account = AccountConfig(name="main", kind="mitto", base_url=f"http://127.0.0.1:{port}",
                                api_key="k", timeout=5.0, single=single)
        provider = MittoProvider(account, connections=1)
        message = Message(7, "t", 1, "main", None, "+306900000001", "hi", 1, 0)
        try:
            if single:
                [response] = await provider.send_each([message])
                return response
            return await provider.send([message])
        finally:
            await provider.aclose()
            nursery.cancel_scope.cancel()


async def test_a_200_that_is_not_json_is_ambiguous_not_a_crash() -> None:
    for single in (False, True):
        response = await _send_one(b"<html>gateway</html>", single=single)
        assert response.kind == base.AMBIGUOUS  # it went through: it may have been sent
        assert "not a JSON object" in response.error


async def test_a_200_bulk_answer_is_read() -> None:
    body = (b'{"bulkId": "b1", "messages": '
            b'[{"reference": "7", "status": "accepted", "messageId": "m7"}]}')
    response = await _send_one(body)
    assert response.kind == base.OK and response.bulk_id == "b1"
    results = [(r.reference, r.accepted, r.message_id) for r in response.results]
    assert results == [("7", True, "m7")]


def test_an_ambiguous_answer_decides_for_a_batch_of_single_requests() -> None:
    throttled = base.SendResponse(base.THROTTLED)
    ambiguous = base.SendResponse(base.AMBIGUOUS)
    ok = base.SendResponse(base.OK)
    assert speaking_for([ok, throttled, ambiguous, ok]) is ambiguous  # never resent unseen
    assert speaking_for([ok, throttled, ok]) is throttled
    assert speaking_for([ok, ok]) is ok
