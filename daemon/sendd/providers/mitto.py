"""The `mitto` bulk SMS adapter (PROVIDERS.md): bulk and single send, lookups."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlencode

import orjson
import trio

from sendd.config import AccountConfig
from sendd.model import Message
from sendd.providers.base import (
    AMBIGUOUS,
    FAILED,
    LOCAL,
    OK,
    SUSPEND,
    THROTTLED,
    TOO_LARGE,
    UNAVAILABLE,
    LookupResult,
    MessageResult,
    SendResponse,
)
from sendd.providers.clean import CODE_LIMIT, provider_id, provider_text
from sendd.providers.http11 import Client, LocalFailure, NoAnswer, NotSubmitted, Response

BULK_PATH = "/api/v1.1/Messages/sendmessagesbulk"
SINGLE_PATH = "/api/v1.1/Messages/send"
LOOKUP_PATH = "/api/v1.1/Messages"
DEFAULT_SENDER = "sendd"
ERROR_LIMIT = 200  # characters of a provider's error answer kept in a message's error text
# A longer Retry-After is read as this: its wait holds the account and the messages' next attempt.
RETRY_AFTER_LIMIT = 3600.0
# Answers that come from a gateway in front of a provider that is down, not from the provider.
UNREACHABLE_STATUSES = frozenset({502, 503, 504})

# One-message requests of a single-message account go out on SINGLE_CONNECTIONS connections, one
# request per connection at a time: 64 in flight keep ~3,000 requests/s going at 20 ms each.
SINGLE_CONNECTIONS = 64


class MittoProvider:
    def __init__(self, account: AccountConfig, connections: int) -> None:
        self.account = account
        if account.single:
            connections += SINGLE_CONNECTIONS  # the lookups keep theirs
        self._client = Client(account.base_url,
                              {"X-Mitto-API-Key": account.api_key,
                               "Content-Type": "application/json"},
                              timeout=account.timeout, max_connections=connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, messages: list[Message]) -> SendResponse:
        if self.account.single:
            raise ValueError("a single-message account sends with send_each")
        body = {"messages": [_entry(m) for m in messages]}
        response = await self._post(BULK_PATH, body)
        if isinstance(response, SendResponse):
            return response
        payload = _payload(response)
        if payload is None:
            return _unreadable()
        entries = payload.get("messages")
        # Entries that are not objects say nothing: their messages are left unlisted (unknown).
        results = ([_message_result(e) for e in entries if type(e) is dict]
                   if type(entries) is list else [])
        return SendResponse(OK, bulk_id=provider_id(payload.get("bulkId")), results=results)

    async def send_each(self, messages: list[Message]) -> list[SendResponse]:
        """One request per message, concurrently; the answers in the messages' order."""
        responses: list[SendResponse] = [SendResponse(UNAVAILABLE)] * len(messages)

        async def send_one(index: int, message: Message) -> None:
            responses[index] = await self._send_single(message)

        async with trio.open_nursery() as nursery:
            for index, message in enumerate(messages):
                nursery.start_soon(send_one, index, message)
        return responses

    async def _send_single(self, message: Message) -> SendResponse:
        response = await self._post(SINGLE_PATH, _entry(message))
        if isinstance(response, SendResponse):
            return response
        payload = _payload(response)
        if payload is None:
            return _unreadable()
        return SendResponse(OK, results=[_message_result(payload)])

    async def _post(self, path: str, body: dict[str, Any]) -> Response | SendResponse:
        """The 200 response, or the whole request's outcome classified."""
        try:
            response = await self._client.request("POST", path, orjson.dumps(body))
        except LocalFailure as error:
            return SendResponse(LOCAL, error=str(error))
        except NotSubmitted as error:
            return SendResponse(UNAVAILABLE, error=f"connection failed: {error}")
        except NoAnswer as error:
            return SendResponse(AMBIGUOUS, error=f"no response: {error}")
        if response.status == 200:
            return response
        return classify_status(response)

    async def lookup(self, reference: str) -> LookupResult:
        """Did the provider accept this reference? (to settle ambiguous outcomes)"""
        path = f"{LOOKUP_PATH}?{urlencode({'reference': reference})}"
        try:
            response = await self._client.request("GET", path)
        except NotSubmitted as error:
            return LookupResult(None, error=f"lookup failed: {error}", reachable=False)
        except NoAnswer as error:
            return LookupResult(None, error=f"lookup failed: {error}")
        if response.status == 404:
            return LookupResult(False)
        if response.status != 200:
            return LookupResult(None, error=f"lookup failed: HTTP {response.status}",
                                reachable=response.status not in UNREACHABLE_STATUSES)
        payload = _payload(response)
        if payload is None:
            return LookupResult(None, error="lookup failed: unreadable answer")
        return LookupResult(True, message_id=provider_id(payload.get("messageId")),
                            status=provider_text(payload.get("status"), CODE_LIMIT))


def _payload(response: Response) -> dict[str, Any] | None:
    """A 200 answer's JSON object (orjson: a 1,000-message answer is on the hot path)."""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _unreadable() -> SendResponse:
    # The request went through but the answer cannot be read: it may have been sent.
    return SendResponse(AMBIGUOUS, error="the provider's 200 answer was not a JSON object")


def _entry(message: Message) -> dict[str, str]:
    return {
        "from": message.sender or DEFAULT_SENDER,
        "to": message.recipient,
        "text": message.body,
        "reference": message.reference,
    }


def _message_result(entry: dict[str, Any]) -> MessageResult:
    """One entry of an answer, its strings made safe to store (sendd.providers.clean). An
    accepted message whose id is not a sane one is still accepted, without the id: acceptance
    is what decides billing and resending, and the reference still finds it at the provider."""
    reference = str(entry.get("reference"))
    if entry.get("status") == "accepted":  # the common case, positionally: the hot path
        return MessageResult(reference, True, provider_id(entry.get("messageId")))
    return MessageResult(reference, False, provider_id(entry.get("messageId")),
                         error_code=provider_text(entry.get("errorCode"), CODE_LIMIT)
                         or "REJECTED",
                         error_text=provider_text(entry.get("errorMessage")))


def classify_status(response: Response) -> SendResponse:
    """A non-200 answer to a whole request, as the PROVIDERS.md table says."""
    status = response.status
    error = f"HTTP {status}: {_provider_error(response)}"
    if status in (401, 403):
        return SendResponse(SUSPEND, error=f"API key refused ({error})")
    if status == 402:
        return SendResponse(SUSPEND, error=f"provider balance exhausted ({error})")
    if status == 413:
        return SendResponse(TOO_LARGE, error=error)
    if status == 429:
        return SendResponse(THROTTLED, error=error, retry_after=_retry_after(response))
    if status == 400:
        return SendResponse(FAILED, error=error)
    return SendResponse(UNAVAILABLE, error=error)


def _retry_after(response: Response) -> float | None:
    """Seconds to wait, within [0, RETRY_AFTER_LIMIT]; None when the header says no number."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_LIMIT)


def _provider_error(response: Response) -> str:
    """The provider's own words, short and storable; never the request (it may carry the key)."""
    return (provider_text(response.text, ERROR_LIMIT)
            or provider_text(response.reason, ERROR_LIMIT) or "no reason given")

