"""`sendd campaign show|start|pause|resume|cancel`: straight on the database, daemon or not.

A campaign is loaded as `draft` (the column's default: an application inserts its messages
while nothing can send or complete it) and then started: `sending`, or `scheduled` while its
`scheduled_at` is ahead (the poller starts it when the time comes)."""

from __future__ import annotations

from typing import Any

from sendd.errors import UserError

COUNTERS = ("total", "sent", "failed", "delivered", "undelivered", "unknown", "cancelled")


async def show(conn: Any, campaign_id: int) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM sendd.campaign WHERE id = $1", campaign_id)
    if row is None:
        raise UserError(f"no campaign with id {campaign_id}")
    shown = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}
    shown["processed"] = row["sent"] + row["failed"] + row["cancelled"] + row["unknown"]
    shown["queued"] = await conn.fetchval(
        "SELECT count(*) FROM sendd.message WHERE campaign_id = $1 AND status = 'queued'",
        campaign_id,
    )
    return shown


async def pause(conn: Any, campaign_id: int, reason: str = "paused by operator") -> dict[str, Any]:
    """Stop claiming the campaign's messages; what is in flight finishes."""
    return await _transition(
        conn, campaign_id, ("sending", "scheduled"), "paused", reason=reason
    )


async def start(conn: Any, campaign_id: int) -> dict[str, Any]:
    """Send a loaded (draft) campaign: now, or at its scheduled time if that is ahead."""
    async with conn.transaction():
        total = await conn.fetchval(
            "SELECT total FROM sendd.campaign WHERE id = $1 FOR UPDATE", campaign_id
        )
        if total == 0:
            raise UserError(
                f"campaign {campaign_id} has no messages: insert them first, then start it"
            )
        return await _transition(
            conn, campaign_id, ("draft",), "sending", reason=None, until_scheduled=True
        )


async def resume(conn: Any, campaign_id: int) -> dict[str, Any]:
    """Sending again; a campaign whose scheduled time is still ahead waits for it."""
    return await _transition(
        conn, campaign_id, ("paused",), "sending", reason=None, until_scheduled=True
    )


# Every message of the campaign not yet handed to a provider: queued, or claimed by a daemon but
# without a submission mark (waiting in its memory, e.g. for the rate governor). A daemon marks a
# batch only after re-reading its campaigns FOR KEY SHARE (sendd.actors.sender), and `cancel`
# holds the campaign FOR UPDATE from before these statements: a mark either committed before
# them, and their snapshot sees it, or waits and then finds the campaign cancelled.
# (Queued messages are found through message_campaign_queue, claimed ones through
# message_in_flight by the campaign's tenant: there is no index on campaign_id alone.)
CANCEL_QUEUED = """
UPDATE sendd.message m SET status = 'cancelled', finished_at = now()
WHERE m.campaign_id = $1 AND m.status = 'queued'
  AND sendd.transition_allowed(m.status, 'cancelled')
"""
CANCEL_CLAIMED = """
WITH on_the_wire AS (SELECT unnest(message_ids) AS id FROM sendd.submission)
UPDATE sendd.message m SET status = 'cancelled', finished_at = now(), lease_owner = NULL
FROM sendd.campaign c
WHERE c.id = $1 AND m.tenant_id = c.tenant_id AND m.status = 'sending' AND m.campaign_id = $1
  AND m.id NOT IN (SELECT id FROM on_the_wire)
  AND sendd.transition_allowed(m.status, 'cancelled')
"""
IN_FLIGHT = """
SELECT count(*) FROM sendd.message m JOIN sendd.campaign c ON m.tenant_id = c.tenant_id
WHERE c.id = $1 AND m.status = 'sending' AND m.campaign_id = $1
"""


async def cancel(conn: Any, campaign_id: int) -> dict[str, Any]:
    """Cancel the campaign and every message of it not yet handed to a provider; the requests
    already on the wire finish (`in_flight`), and their outcomes are stored as they come."""
    async with conn.transaction():
        result = await _transition(
            conn, campaign_id, ("draft", "scheduled", "sending", "paused"), "cancelled", reason=None
        )
        # Claimed first, queued second: a batch a writer puts back (claimed -> queued) while
        # these run is either waited for by CANCEL_CLAIMED (its rows are locked) and then found
        # queued by CANCEL_QUEUED, or, once CANCEL_CLAIMED holds the rows, finds them cancelled.
        # The other order missed a put-back that committed between the two statements.
        await conn.execute(CANCEL_CLAIMED, campaign_id)
        await conn.execute(CANCEL_QUEUED, campaign_id)
        in_flight = await conn.fetchval(IN_FLIGHT, campaign_id)
    # The trigger-kept counter: counting rows by campaign would need an index on every message.
    cancelled = await conn.fetchval("SELECT cancelled FROM sendd.campaign WHERE id = $1",
                                    campaign_id)
    return result | {"cancelled": cancelled, "in_flight": in_flight}


async def _transition(
    conn: Any, campaign_id: int, allowed_from: tuple[str, ...], to: str, reason: str | None,
    *, until_scheduled: bool = False,
) -> dict[str, Any]:
    """Move the campaign from one of `allowed_from` to `to` (with until_scheduled, to
    `scheduled` instead while its scheduled_at is ahead). The status reported is the stored one:
    a campaign started with every message already final is completed at once (migration 0008)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT status, coalesce(scheduled_at > now(), false) AS ahead "
            "FROM sendd.campaign WHERE id = $1 FOR UPDATE",
            campaign_id,
        )
        if row is None:
            raise UserError(f"no campaign with id {campaign_id}")
        if row["status"] not in allowed_from:
            raise UserError(
                f"campaign {campaign_id} is {row['status']}; only a campaign that is "
                f"{' or '.join(allowed_from)} can become {to}"
            )
        if until_scheduled and row["ahead"]:
            to = "scheduled"
        stored = await conn.fetchval(
            """UPDATE sendd.campaign SET status = $2, pause_reason = $3,
                   started_at = CASE WHEN $2 = 'sending' THEN coalesce(started_at, now())
                                     ELSE started_at END,
                   finished_at = CASE WHEN $2 = 'cancelled' THEN now() ELSE finished_at END
               WHERE id = $1 RETURNING status""",
            campaign_id, to, reason,
        )
    return {"campaign_id": campaign_id, "status": stored, "was": row["status"]}
