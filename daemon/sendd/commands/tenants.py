"""`sendd tenant set`: create or change a tenant (credits, rate limit, weight, active); every
credit change gets a ledger row."""

from __future__ import annotations

from typing import Any

from sendd.errors import UserError
from sendd.options import BIGINT_MAX, MAX_WEIGHT


async def set_tenant(
    conn: Any,
    tenant: str,
    *,
    credits: int | None = None,
    add_credits: int | None = None,
    rate: int | None = None,
    weight: int | None = None,
    active: bool | None = None,
) -> dict[str, Any]:
    """Create the tenant if needed, apply the changes, and return its row."""
    _validate(tenant, credits, add_credits, rate, weight)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO sendd.tenant (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant
        )
        row = await conn.fetchrow(
            "SELECT credits FROM sendd.tenant WHERE id = $1 FOR UPDATE", tenant
        )
        new_credits = row["credits"]
        if credits is not None:
            new_credits = credits
        if add_credits is not None:
            new_credits += add_credits
        if new_credits > BIGINT_MAX:  # the column's limit; the database would not name it
            raise UserError(f"--add-credits: tenant {tenant!r} would have more than "
                            f"{BIGINT_MAX} credits")
        await _check_reserved(conn, tenant, new_credits, row["credits"])
        await _change_credits(conn, tenant, new_credits - row["credits"], credits is not None)
        await conn.execute(
            """UPDATE sendd.tenant SET
                   rate_msgs_per_s = coalesce($2, rate_msgs_per_s),
                   weight = coalesce($3, weight),
                   active = coalesce($4, active), updated_at = now()
               WHERE id = $1""",
            tenant, rate, weight, active,
        )
        return dict(await conn.fetchrow("SELECT * FROM sendd.tenant WHERE id = $1", tenant))


def _validate(tenant: str, credits: int | None, add_credits: int | None, rate: int | None,
              weight: int | None) -> None:
    if not tenant or len(tenant) > 200 or not tenant.isprintable():
        raise UserError("TENANT: must be 1 to 200 printable characters")
    if credits is not None and credits < 0:
        raise UserError(f"--credits: must be 0 or more, got {credits}")
    if rate is not None and rate < 0:
        raise UserError(f"--rate: must be 0 (unlimited) or more, got {rate}")
    if weight is not None and not 1 <= weight <= MAX_WEIGHT:
        raise UserError(f"--weight: must be an integer from 1 to {MAX_WEIGHT}, got {weight}")
    if add_credits is not None and credits is not None:
        raise UserError("--credits and --add-credits: give one of them, not both")


async def _check_reserved(conn: Any, tenant: str, new_credits: int, old_credits: int) -> None:
    """Credits may not drop below what messages in flight have reserved."""
    if new_credits >= old_credits:
        return
    if new_credits < 0:
        raise UserError(f"tenant {tenant!r} has {old_credits} credits; cannot go below zero")
    reserved = await conn.fetchval("SELECT sendd.in_flight_segments($1)", tenant)
    if new_credits < reserved:
        raise UserError(
            f"tenant {tenant!r} has {reserved} segments in flight; set credits to at least "
            f"{reserved} or pause its campaigns first"
        )


async def _change_credits(conn: Any, tenant: str, delta: int, is_set: bool) -> None:
    if delta == 0:
        return
    await conn.execute(
        "UPDATE sendd.tenant SET credits = credits + $2, updated_at = now() WHERE id = $1",
        tenant, delta,
    )
    await conn.execute(
        "INSERT INTO sendd.credit_ledger (tenant_id, delta, reason) VALUES ($1, $2, $3)",
        tenant, delta, "set" if is_set else "top-up",
    )
