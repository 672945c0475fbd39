"""What flows through the pipeline's channels: claimed messages, batches, outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Message:
    """A claimed message, leased to this daemon."""

    id: int
    tenant_id: str
    campaign_id: int | None
    account: str
    sender: str | None
    recipient: str
    body: str
    segments: int
    attempts: int

    @property
    def reference(self) -> str:
        """The id providers see: unique per message and the same on every resend."""
        return str(self.id)


# The tenant of a batch that mixes the messages of tenants without a rate limit: nothing to
# charge per tenant, and one request carries many tenants' messages (so a thousand small
# tenants do not cost a thousand requests).
ANY_TENANT = ""


@dataclass(slots=True)
class Batch:
    """Messages of one account, sent in one provider request: of one tenant with a rate limit
    (its batches are charged to it), or of any tenants without one (`tenant_id` ANY_TENANT)."""

    account: str
    tenant_id: str
    messages: list[Message]
    submission_id: int | None = None  # the durable "submitted" mark, once written

    def tenants(self) -> set[str]:
        return {m.tenant_id for m in self.messages}


# Outcome statuses the writer applies. RETRY queues the message again after `retry_in`;
# RELEASE puts it back untouched (no attempt used): it never reached the provider. UNKNOWN:
# it may have been sent and nothing could tell.
SENT, FAILED, RETRY, RELEASE, UNKNOWN = "sent", "failed", "retry", "release", "unknown"


@dataclass(slots=True)
class Outcome:
    """What happened to one message, as the writer will store it."""

    message: Message
    status: str
    bulk_id: str | None = None
    provider_message_id: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    retry_in: float = 0.0  # seconds until the next attempt, for RETRY
    counts_attempt: bool = True


@dataclass(slots=True)
class BatchResult:
    """The outcomes of one provider request (or of a batch that never left)."""

    submission_id: int | None
    outcomes: list[Outcome] = field(default_factory=list)


@dataclass(slots=True)
class Unsettled:
    """A submission mark without an outcome: the settler finds out what happened."""

    submission_id: int
    account: str
    messages: list[Message]
    not_before: float  # trio time: give a slow provider time to finish what it got
