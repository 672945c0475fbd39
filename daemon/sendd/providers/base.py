"""The provider adapter interface: one request's outcome, classified the way PROVIDERS.md says."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sendd.model import Message

# Whole-request outcome kinds.
OK = "ok"  # per-message results are in `results`
FAILED = "failed"  # 400: the request was malformed; every message fails with the error
SUSPEND = "suspend"  # 401/403/402: the account is suspended, messages stay queued
TOO_LARGE = "too_large"  # 413: split and retry
THROTTLED = "throttled"  # 429: retry later, slow the account down
UNAVAILABLE = "unavailable"  # 5xx or refused before the request went out: retry with backoff
AMBIGUOUS = "ambiguous"  # timeout or lost connection after the body went out
LOCAL = "local"  # this machine's own trouble (no file descriptors): nothing went out


@dataclass(slots=True)
class MessageResult:
    reference: str
    accepted: bool
    message_id: str | None = None
    error_code: str | None = None
    error_text: str | None = None


@dataclass(slots=True)
class SendResponse:
    kind: str
    bulk_id: str | None = None
    results: list[MessageResult] = field(default_factory=list)
    error: str = ""
    retry_after: float | None = None


@dataclass(slots=True)
class LookupResult:
    """found: the provider accepted the reference; None when the lookup itself failed."""

    found: bool | None
    message_id: str | None = None
    status: str | None = None
    error: str = ""
    reachable: bool = True  # False: the provider could not be reached (refused, 5xx)


class Provider(Protocol):
    async def send(self, messages: list[Message]) -> SendResponse:
        """The messages in one request (a bulk endpoint)."""
        ...

    async def send_each(self, messages: list[Message]) -> list[SendResponse]:
        """Each message in its own request, concurrently (a one-message endpoint)."""
        ...

    async def lookup(self, reference: str) -> LookupResult: ...

    async def aclose(self) -> None: ...
