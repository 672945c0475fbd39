"""The mitto adapter against a raw HTTP server on loopback, for answers the fake never gives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
import trio

from sendd.config import AccountConfig
from sendd.core.outcomes import speaking_for
from sendd.model import Message
from sendd.providers import base
from sendd.providers.clean import CODE_LIMIT, ID_LIMIT, TEXT_LIMIT
from sendd.providers.mitto import RETRY_AFTER_LIMIT, MittoProvider


async def _answer_with(body: bytes, head: str, stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)  # the request (small enough for one read here)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    await stream.send_all(head.encode() + body)
    await stream.aclose()


async def _ask(body: bytes, ask: Callable[[MittoProvider, Message], Awaitable[Any]], *,
               single: bool = False, head: str = "HTTP/1.1 200 OK\r\n") -> Any:
    """`ask` the adapter something, against a server that answers every request alike."""
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, partial(_answer_with, body, head), 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        account = AccountConfig(name="main", kind="mitto", base_url=f"http://127.0.0.1:{port}",
                                api_key="k", timeout=5.0, single=single)
        provider = MittoProvider(account, connections=1)
        message = Message(7, "t", 1, "main", None, "+306900000001", "hi", 1, 0)
        try:
            return await ask(provider, message)
        finally:
            await provider.aclose()
            nursery.cancel_scope.cancel()


async def _send_one(body: bytes, *, single: bool = False,
                    head: str = "HTTP/1.1 200 OK\r\n") -> base.SendResponse:
    async def send(provider: MittoProvider, message: Message) -> base.SendResponse:
        if single:
            [response] = await provider.send_each([message])
            return response
        return await provider.send([message])

    return await _ask(body, send, single=single, head=head)


async def _look_up(body: bytes) -> base.LookupResult:
    return await _ask(body, lambda provider, message: provider.lookup(message.reference))


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


# --- what a provider sends is bounded and storable before it reaches an outcome ---------------

BAD_ID = "bad\u0000id-7"  # valid JSON; PostgreSQL text cannot hold NUL


async def test_an_accepted_message_with_an_id_no_database_can_hold_is_sent_without_it() -> None:
    for single in (False, True):
        entry = {"reference": "7", "status": "accepted", "messageId": BAD_ID}
        body = orjson.dumps(entry if single else {"bulkId": "b\u0000x", "messages": [entry]})
        response = await _send_one(body, single=single)
        assert response.kind == base.OK and response.bulk_id is None
        [result] = response.results
        # Accepted is what the provider said, and what decides billing and resending; the id
        # is only a label, and a cleaned-up id would be somebody else's.
        assert (result.reference, result.accepted, result.message_id) == ("7", True, None)


async def test_ids_that_are_not_sane_strings_are_dropped_and_sane_ones_kept() -> None:
    for raw, kept in [(12345, "12345"), ("ok-id_1.2:3", "ok-id_1.2:3"), ("x" * ID_LIMIT, "x" *
                      ID_LIMIT), ("x" * (ID_LIMIT + 1), None), ("", None), ("a b", None),
                      ("a\nb", None), ({"id": 1}, None), ([1], None), (True, None), (None, None)]:
        body = orjson.dumps({"bulkId": raw, "messages": [
            {"reference": "7", "status": "accepted", "messageId": raw}]})
        response = await _send_one(body)
        assert (response.bulk_id, response.results[0].message_id) == (kept, kept), raw


async def test_a_rejection_s_code_and_text_are_cleaned_and_bounded() -> None:
    entry = {"reference": "7", "status": "rejected", "messageId": None,
             "errorCode": "BAD\u0000CODE\n" + "C" * 1000,
             "errorMessage": "line one\r\nline\ttwo\u0000 " + "é" * 10_000}
    [result] = (await _send_one(orjson.dumps({"bulkId": "b1", "messages": [entry]}))).results
    assert not result.accepted
    assert result.error_code == ("BADCODE " + "C" * 1000)[:CODE_LIMIT]
    assert result.error_text.startswith("line one line two ")
    assert len(result.error_text) == TEXT_LIMIT and result.error_text.isprintable()


async def test_a_rejection_without_a_usable_code_still_has_one() -> None:
    entry = {"reference": "7", "status": "rejected", "errorCode": "\u0000\u0001",
             "errorMessage": {"nested": "object"}}
    [result] = (await _send_one(orjson.dumps({"bulkId": "b1", "messages": [entry]}))).results
    assert (result.error_code, result.error_text) == ("REJECTED", None)


async def test_a_messages_field_that_is_not_a_list_of_objects_lists_no_result() -> None:
    for messages in ["accepted", {"7": "accepted"}, [1, "x", None], 5]:
        response = await _send_one(orjson.dumps({"bulkId": "b1", "messages": messages}))
        assert response.kind == base.OK and response.results == []  # each message: unknown


async def test_an_error_answer_s_body_is_cleaned() -> None:
    response = await _send_one(b"down\x00\x01 for\nmaintenance",
                               head="HTTP/1.1 503 Service Unavailable\r\n")
    assert response.kind == base.UNAVAILABLE
    assert response.error == "HTTP 503: down for maintenance"


async def test_retry_after_is_bounded() -> None:
    for header, wait in [("inf", RETRY_AFTER_LIMIT), ("1e400", RETRY_AFTER_LIMIT),
                         ("nan", None), ("-5", 0.0), ("2.5", 2.5), ("soon", None)]:
        head = f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {header}\r\n"
        response = await _send_one(b"{}", head=head)
        assert (response.kind, response.retry_after) == (base.THROTTLED, wait), header


async def test_a_lookup_answer_s_id_is_checked() -> None:
    found = await _look_up(orjson.dumps({"reference": "7", "messageId": BAD_ID,
                                         "status": "Sent\u0000"}))
    assert (found.found, found.message_id, found.status) == (True, None, "Sent")
    found = await _look_up(orjson.dumps({"reference": "7", "messageId": "m-7", "status": "Sent"}))
    assert (found.found, found.message_id) == (True, "m-7")
