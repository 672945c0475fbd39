"""`sendd campaign show|pause|resume|cancel`: straight on the database, daemon or not."""

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


async def resume(conn: Any, campaign_id: int) -> dict[str, Any]:
    return await _transition(conn, campaign_id, ("paused",), "sending", reason=None)


async def cancel(conn: Any, campaign_id: int) -> dict[str, Any]:
    """Cancel the campaign and every message of it not yet handed to a provider."""
    async with conn.transaction():
        result = await _transition(
            conn, campaign_id, ("draft", "scheduled", "sending", "paused"), "cancelled", reason=None
        )
        await conn.execute(
            """UPDATE sendd.message m SET status = 'cancelled', finished_at = now()
               WHERE campaign_id = $1 AND status = 'queued'
                 AND sendd.transition_allowed(m.status, 'cancelled')""",
            campaign_id,
        )
    # The trigger-kept counter: counting rows by campaign would need an index on every message.
    cancelled = await conn.fetchval("SELECT cancelled FROM sendd.campaign WHERE id = $1",
                                    campaign_id)
    return result | {"cancelled": cancelled}


async def _transition(
    conn: Any, campaign_id: int, allowed_from: tuple[str, ...], to: str, reason: str | None
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT status FROM sendd.campaign WHERE id = $1 FOR UPDATE", campaign_id
    )
    if row is None:
        raise UserError(f"no campaign with id {campaign_id}")
    if row["status"] not in allowed_from:
        raise UserError(
            f"campaign {campaign_id} is {row['status']}; only a campaign that is "
            f"{' or '.join(allowed_from)} can become {to}"
        )
    await conn.execute(
        """UPDATE sendd.campaign SET status = $2, pause_reason = $3,
               started_at = CASE WHEN $2 = 'sending' THEN coalesce(started_at, now())
                                 ELSE started_at END,
               finished_at = CASE WHEN $2 = 'cancelled' THEN now() ELSE finished_at END
           WHERE id = $1""",
        campaign_id, to, reason,
    )
    return {"campaign_id": campaign_id, "status": to, "was": row["status"]}
