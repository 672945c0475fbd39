"""The housekeeper's pass, in-process against a private PostgreSQL: what `sendd tenant set`
stores reaches the daemon's state within one pass, the rate limits (the governor) and the
weights (`Controls.tenant_weights`, read by the pollers and the scheduler)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio
import triopg

from parts import account, claim_config, make_parts
from sendd.actors.housekeeper import Housekeeper
from sendd.commands import tenants
from sendd.db import migrate
from sendd.errors import UserError


@asynccontextmanager
async def _connection(url: str) -> AsyncIterator[Any]:
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), triopg.create_pool(url) as pool, \
                pool.acquire() as conn:
            await migrate.migrate(conn)
            yield conn


def _housekeeper() -> Housekeeper:
    parts = make_parts(claim_config([account("main")]))
    return Housekeeper(parts.accounts, parts.controls, parts.health)


async def test_a_pass_takes_the_tenants_weights_and_rates(database_url: str) -> None:
    housekeeper = _housekeeper()
    controls, governor = housekeeper.controls, housekeeper.accounts.governor
    async with _connection(database_url) as conn:
        await tenants.set_tenant(conn, "heavy", weight=3, rate=50)
        await tenants.set_tenant(conn, "light")  # weighs 1: left out, as a tenant not there
        await tenants.set_tenant(conn, "huge", weight=1000)
        await housekeeper.run_once(conn)
        assert controls.tenant_weights == {"heavy": 3.0, "huge": 1000.0}
        assert governor.tenant_limits() == {"heavy": 50}

        # A change by `sendd tenant set` (or another daemon) is taken at the next pass; a
        # weight set back to 1, or a tenant deleted, drops out.
        await tenants.set_tenant(conn, "heavy", weight=1)
        await tenants.set_tenant(conn, "light", weight=7)
        await conn.execute("DELETE FROM sendd.tenant WHERE id = 'huge'")
        await housekeeper.run_once(conn)
        assert controls.tenant_weights == {"light": 7.0}
        assert governor.tenant_limits() == {"heavy": 50}


async def test_set_tenant_refuses_a_weight_out_of_range_and_stores_nothing(
        database_url: str) -> None:
    async with _connection(database_url) as conn:
        await tenants.set_tenant(conn, "acme", weight=5)
        for weight in (0, -1, 1001):
            with pytest.raises(UserError, match=r"^--weight: must be an integer from 1 to 1000"):
                await tenants.set_tenant(conn, "acme", weight=weight, credits=9)
            with pytest.raises(UserError, match="--weight"):
                await tenants.set_tenant(conn, "newco", weight=weight)
        rows = await conn.fetch("SELECT id, credits, weight FROM sendd.tenant")
        assert [tuple(r) for r in rows] == [("acme", 0, 5)]
        # The column refuses what the command would: an application's UPDATE too.
        with pytest.raises(asyncpg.CheckViolationError, match="tenant_weight_check"):
            await conn.execute("UPDATE sendd.tenant SET weight = 0")
