"""The `mitto` bulk SMS adapter (PROVIDERS.md): bulk and single send, lookups."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from sendd.config import AccountConfig
from sendd.model import Message
from sendd.providers.base import (
    AMBIGUOUS,
    FAILED,
    OK,
    SUSPEND,
    THROTTLED,
    TOO_LARGE,
    UNAVAILABLE,
    LookupResult,
    MessageResult,
    SendResponse,
)

BULK_PATH = "/api/v1.1/Messages/sendmessagesbulk"
SINGLE_PATH = "/api/v1.1/Messages/send"
LOOKUP_PATH = "/api/v1.1/Messages"
DEFAULT_SENDER = "sendd"

# Failures before any byte of the request reached the provider: safe to resend.
NOT_SUBMITTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures after the body may have gone out: the provider may have accepted it.
MAYBE_SUBMITTED = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


# One-message requests of a single-message account go through SINGLE_POOLS connection pools of
# SINGLE_POOL_SIZE connections, at most one request per connection at a time: 64 in flight keep
# ~3,000 requests/s going at 20 ms each. Several small pools, because httpcore's pool does work
# proportional to (waiting requests x connections) on every request: one pool of 64 spent 10 ms
# of CPU per request.
SINGLE_POOLS = 4
SINGLE_POOL_SIZE = 16


class MittoProvider:
    def __init__(self, account: AccountConfig, connections: int) -> None:
        self.account = account
        self._client = self._new_client(connections)
        pools = SINGLE_POOLS if account.single else 0
        self._singles = [(self._new_client(SINGLE_POOL_SIZE),
                          trio.CapacityLimiter(SINGLE_POOL_SIZE)) for _ in range(pools)]

    def _new_client(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.account.base_url.rstrip("/"),
            headers={"X-Mitto-API-Key": self.account.api_key,
                     "Content-Type": "application/json"},
            timeout=self.account.timeout,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def aclose(self) -> None:
        for client in [self._client, *(client for client, _ in self._singles)]:
            await client.aclose()

    async def send(self, messages: list[Message]) -> SendResponse:
        if self.account.single:
            raise ValueError("a single-message account sends with send_each")
        body = {"messages": [_entry(m) for m in messages]}
        response = await self._post(self._client, BULK_PATH, body)
        if isinstance(response, SendResponse):
            return response
        payload = _payload(response)
        if payload is None:
            return _unreadable()
        results = [_message_result(e) for e in payload.get("messages", [])]
        return SendResponse(OK, bulk_id=payload.get("bulkId"), results=results)

    async def send_each(self, messages: list[Message]) -> list[SendResponse]:
        """One request per message, concurrently; the answers in the messages' order."""
        responses: list[SendResponse] = [SendResponse(UNAVAILABLE)] * len(messages)

        async def send_one(index: int, message: Message) -> None:
            client, slots = self._singles[index % len(self._singles)]
            async with slots:
                responses[index] = await self._send_single(client, message)

        async with trio.open_nursery() as nursery:
            for index, message in enumerate(messages):
                nursery.start_soon(send_one, index, message)
        return responses

    async def _send_single(self, client: httpx.AsyncClient, message: Message) -> SendResponse:
        response = await self._post(client, SINGLE_PATH, _entry(message))
        if isinstance(response, SendResponse):
            return response
        payload = _payload(response)
        if payload is None:
            return _unreadable()
        return SendResponse(OK, results=[_message_result(payload)])

    async def _post(self, client: httpx.AsyncClient, path: str,
                    body: dict[str, Any]) -> httpx.Response | SendResponse:
        """The 200 response, or the whole request's outcome classified."""
        try:
            response = await client.post(path, content=orjson.dumps(body))
        except NOT_SUBMITTED as error:
            return SendResponse(UNAVAILABLE, error=f"connection failed: {_describe(error)}")
        except MAYBE_SUBMITTED as error:
            return SendResponse(AMBIGUOUS, error=f"no response: {_describe(error)}")
        if response.status_code == 200:
            return response
        return classify_status(response)

    async def lookup(self, reference: str) -> LookupResult:
        """Did the provider accept this reference? (to settle ambiguous outcomes)"""
        try:
            response = await self._client.get(LOOKUP_PATH, params={"reference": reference})
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as error:
            return LookupResult(None, error=f"lookup failed: {_describe(error)}")
        if response.status_code == 404:
            return LookupResult(False)
        if response.status_code != 200:
            return LookupResult(None, error=f"lookup failed: HTTP {response.status_code}")
        payload = _payload(response)
        if payload is None:
            return LookupResult(None, error="lookup failed: unreadable answer")
        return LookupResult(True, message_id=payload.get("messageId"), status=payload.get("status"))


def _payload(response: httpx.Response) -> dict[str, Any] | None:
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
    accepted = entry.get("status") == "accepted"
    return MessageResult(
        reference=str(entry.get("reference")),
        accepted=accepted,
        message_id=entry.get("messageId"),
        error_code=None if accepted else (entry.get("errorCode") or "REJECTED"),
        error_text=None if accepted else entry.get("errorMessage"),
    )


def classify_status(response: httpx.Response) -> SendResponse:
    """A non-200 answer to a whole request, as the PROVIDERS.md table says."""
    status = response.status_code
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


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _provider_error(response: httpx.Response) -> str:
    """The provider's own words, short; never the request (it may carry the key)."""
    text = response.text.strip().replace("\n", " ")
    return text[:200] if text else response.reason_phrase


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
