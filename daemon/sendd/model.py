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


@dataclass(slots=True)
class Batch:
    """Messages of one account and tenant, sent in one provider request."""

    account: str
    tenant_id: str
    messages: list[Message]
    submission_id: int | None = None  # the durable "submitted" mark, once written


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
