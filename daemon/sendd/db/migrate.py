"""Versioned schema migrations: files `migrations/NNNN_name.sql`, applied in order, once.

Safe to run twice and while daemons run: everything happens in one transaction behind a
transaction-level advisory lock, so a second `sendd migrate` waits and then finds nothing to do.

The convention for a new migration: a new file with the next number (an applied file is never
edited); it leaves objects that daemons of the previous release still use callable as they
were, since `sendd migrate` may run while such daemons run; and it updates `db/schema.sql`,
the schema as it stands after every migration, in the same change (tests/test_schema_file.py
fails until the two agree).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

MIGRATION_LOCK = 0x53454E44  # "SEND": one advisory lock id for every sendd migrate

BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS sendd;
CREATE TABLE IF NOT EXISTS sendd.schema_migration (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def available_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file shipped with the package."""
    found = []
    for entry in resources.files("sendd.db.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(version), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: Any) -> list[str]:
    """Apply the migrations this database lacks; returns the names applied."""
    applied_now = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(BOOTSTRAP)
        rows = await conn.fetch("SELECT version FROM sendd.schema_migration")
        done = {r["version"] for r in rows}
        for version, name, sql in available_migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO sendd.schema_migration (version, name) VALUES ($1, $2)", version, name
            )
            applied_now.append(f"{version:04d}_{name}")
    return applied_now


async def schema_version(conn: Any) -> int:
    """The newest applied migration, 0 when the schema does not exist yet."""
    exists = await conn.fetchval("SELECT to_regclass('sendd.schema_migration') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM sendd.schema_migration")
