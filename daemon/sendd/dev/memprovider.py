"""An in-memory provider for in-process tests of the actors: no sockets, no HTTP, trio time only.

`MemoryProvider` implements `sendd.providers.base.Provider`. Each request takes the next
scripted answer (or the default one, `ok()`, when the script is empty), waits the configured
latency with `trio.sleep` (so `trio.testing.MockClock` runs it in no real time) and answers.
Everything is decided and recorded when the request arrives, as a real provider accepts first
and answers late; `requests` keeps every request in arrival order.

    provider = MemoryProvider(latency=0.02)
    provider.script(throttled(retry_after=2), unavailable(), ok(reject={"17"}))
    response = await provider.send(messages)     # THROTTLED, retry_after 2
    [r] = await provider.send_each(messages[:1])  # UNAVAILABLE
    await provider.send(messages)                # OK, message 17 rejected, the rest accepted

Answers are functions of the request's messages returning the provider's decision (`Answer`);
build them with `ok`, `throttled`, `unavailable`, `ambiguous`, `failed`, `suspend`, `too_large`,
or `respond` for any fixed `SendResponse`. Accepted messages are remembered (a reference ->
its message id), so `lookup` finds them, as the settler expects; `ambiguous(accepted=True)` plays
a provider that took the messages and lost the answer, the case the settler exists for.
`send_each` takes one scripted answer per message (one request each), concurrently.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import trio

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

REJECT_CODE = "INVALID_NUMBER"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the provider does with one request: the answer it gives, the references it
    accepted (sent, whatever the answer says) with their message ids, and how much longer than
    the provider's latency it takes to answer."""

    response: SendResponse
    accepted: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


# An answer builds the decision from the request's messages and the provider (for fresh ids).
Answer = Callable[[list[Message], "MemoryProvider"], Decision]


@dataclass(slots=True)
class Request:
    """One request as it arrived: `single` for `send_each`'s one-message requests."""

    references: list[str]
    single: bool
    at: float  # trio.current_time() on arrival
    response: SendResponse | None = None  # set once answered


@dataclass
class MemoryProvider:
    """A scriptable provider; see the module docstring."""

    latency: float = 0.0  # seconds before every answer (trio time)
    default: Answer | None = None  # when the script is empty; None: ok()
    max_batch: int | None = None  # larger requests are answered TOO_LARGE, script untouched
    requests: list[Request] = field(default_factory=list, init=False)
    accepted: dict[str, str] = field(default_factory=dict, init=False)  # reference -> first id
    sends: Counter[str] = field(default_factory=Counter, init=False)  # reference -> accepted n
    lookups: list[str] = field(default_factory=list, init=False)  # references looked up
    closed: bool = field(default=False, init=False)
    _answers: deque[Answer] = field(default_factory=deque, init=False, repr=False)
    _lookup_answers: deque[LookupResult] = field(default_factory=deque, init=False, repr=False)
    _next_id: int = field(default=0, init=False, repr=False)
    _arrived: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    # -- scripting --------------------------------------------------------------------------

    def script(self, *answers: Answer) -> MemoryProvider:
        """Answer the next requests with these, in order (after any already scripted)."""
        self._answers.extend(answers)
        return self

    def script_lookups(self, *results: LookupResult) -> MemoryProvider:
        """Answer the next lookups with these instead of from what was accepted."""
        self._lookup_answers.extend(results)
        return self

    @property
    def scripted(self) -> int:
        """Scripted answers not used yet."""
        return len(self._answers)

    def message_id(self) -> str:
        """A fresh provider message id."""
        self._next_id += 1
        return f"mem-{self._next_id}"

    def duplicates(self) -> dict[str, int]:
        """References accepted more than once, with how often: a test of "never twice"."""
        return {reference: n for reference, n in self.sends.items() if n > 1}

    async def wait_requests(self, count: int) -> list[Request]:
        """Wait until at least `count` requests have arrived; returns them all."""
        while len(self.requests) < count:
            await self._arrived.wait()
        return self.requests

    # -- the Provider interface -------------------------------------------------------------

    async def send(self, messages: list[Message]) -> SendResponse:
        """The messages in one request."""
        return await self._request(messages, single=False)

    async def send_each(self, messages: list[Message]) -> list[SendResponse]:
        """One request per message, concurrently; the answers in the messages' order."""
        responses: list[SendResponse] = [SendResponse(UNAVAILABLE)] * len(messages)
        # Decide in order (the script is consumed message by message), then wait together.
        waits = [self._arrive([message], single=True) for message in messages]

        async def answer(index: int, request: Request, decision: Decision) -> None:
            responses[index] = await self._answer(request, decision)

        async with trio.open_nursery() as nursery:
            for index, (request, decision) in enumerate(waits):
                nursery.start_soon(answer, index, request, decision)
        return responses

    async def lookup(self, reference: str) -> LookupResult:
        self.lookups.append(reference)
        await trio.sleep(self.latency)
        if self._lookup_answers:
            return self._lookup_answers.popleft()
        message_id = self.accepted.get(reference)
        if message_id is None:
            return LookupResult(False)
        return LookupResult(True, message_id=message_id, status="Sent")

    async def aclose(self) -> None:
        self.closed = True

    # -- one request ------------------------------------------------------------------------

    async def _request(self, messages: list[Message], *, single: bool) -> SendResponse:
        request, decision = self._arrive(messages, single=single)
        return await self._answer(request, decision)

    def _arrive(self, messages: list[Message], *, single: bool) -> tuple[Request, Decision]:
        """Record the request and decide it now, on arrival."""
        request = Request([m.reference for m in messages], single, trio.current_time())
        self.requests.append(request)
        decision = self._decide(messages)
        for reference, message_id in decision.accepted.items():
            self.accepted.setdefault(reference, message_id)
            self.sends[reference] += 1
        self._arrived.set()
        self._arrived = trio.Event()
        return request, decision

    def _decide(self, messages: list[Message]) -> Decision:
        if self.max_batch is not None and len(messages) > self.max_batch:
            return too_large(f"HTTP 413: at most {self.max_batch} messages per request")(
                messages, self)
        answer = self._answers.popleft() if self._answers else (self.default or ok())
        return answer(messages, self)

    async def _answer(self, request: Request, decision: Decision) -> SendResponse:
        await trio.sleep(self.latency + decision.delay)
        request.response = decision.response
        return decision.response


# -- answers ----------------------------------------------------------------------------------


def ok(reject: Collection[str] | Mapping[str, str] = (), *, unlisted: Collection[str] = (),
       without_ids: Collection[str] = (), bulk_id: str | None = None,
       delay: float = 0.0) -> Answer:
    """200 with a result per message: accepted with a fresh id, except the references in
    `reject` (rejected; a mapping gives each its error code), in `unlisted` (accepted but
    missing from the answer) and in `without_ids` (accepted, no message id given)."""

    def decide(messages: list[Message], provider: MemoryProvider) -> Decision:
        results: list[MessageResult] = []
        accepted: dict[str, str] = {}
        for message in messages:
            reference = message.reference
            if reference in reject:
                code = reject[reference] if isinstance(reject, Mapping) else REJECT_CODE
                results.append(MessageResult(reference, False, None, code, "rejected"))
                continue
            accepted[reference] = provider.message_id()
            if reference not in unlisted:
                given = None if reference in without_ids else accepted[reference]
                results.append(MessageResult(reference, True, given))
        bulk = bulk_id if bulk_id is not None else f"bulk-{len(provider.requests)}"
        return Decision(SendResponse(OK, bulk_id=bulk, results=results), accepted, delay)

    return decide


def respond(response: SendResponse, *, accepted: bool = False, delay: float = 0.0) -> Answer:
    """Always this response; with `accepted`, the provider took every message all the same."""

    def decide(messages: list[Message], provider: MemoryProvider) -> Decision:
        taken = {m.reference: provider.message_id() for m in messages} if accepted else {}
        # A copy each time: an actor may keep (or change) what it was answered.
        return Decision(replace(response, results=list(response.results)), taken, delay)

    return decide


def throttled(retry_after: float | None = 1.0, *, delay: float = 0.0) -> Answer:
    """429, with the Retry-After seconds (None: the header said no number)."""
    return respond(SendResponse(THROTTLED, error="HTTP 429: too many requests",
                                retry_after=retry_after), delay=delay)


def unavailable(error: str = "HTTP 503: service unavailable", *, delay: float = 0.0) -> Answer:
    """5xx or a refused connection: nothing went out."""
    return respond(SendResponse(UNAVAILABLE, error=error), delay=delay)


def ambiguous(error: str = "no response: timed out", *, accepted: bool = False,
              delay: float = 0.0) -> Answer:
    """No answer after the body went out; with `accepted`, the provider did take the messages
    (lookups find them), else it did not."""
    return respond(SendResponse(AMBIGUOUS, error=error), accepted=accepted, delay=delay)


def failed(error: str = "HTTP 400: malformed request", *, delay: float = 0.0) -> Answer:
    """400: every message of the request fails with the error."""
    return respond(SendResponse(FAILED, error=error), delay=delay)


def suspend(error: str = "API key refused (HTTP 401: invalid api key)", *,
            delay: float = 0.0) -> Answer:
    """401/402/403: the account is suspended, its messages stay queued."""
    return respond(SendResponse(SUSPEND, error=error), delay=delay)


def too_large(error: str = "HTTP 413: too many messages", *, delay: float = 0.0) -> Answer:
    """413: split the request and try again."""
    return respond(SendResponse(TOO_LARGE, error=error), delay=delay)
