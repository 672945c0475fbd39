"""db/schema.sql shows the schema as the migrations leave it: a database migrated from nothing
and one built from the file have the same catalogue (tables, columns, constraints, indexes,
functions, triggers, sequences, types), so the file cannot drift from the migrations."""

from __future__ import annotations

import asyncio
import difflib
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import asyncpg
import pytest

from sendd.db import migrate

# Every object of the schema, as PostgreSQL itself prints it back (so two spellings of one
# definition compare equal, and any difference in what was defined does not).
CATALOGUE = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.reloptions::text
        FROM pg_class c WHERE c.relnamespace = 'sendd'::regnamespace""",
    "columns": """
        SELECT c.relname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
               a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'sendd'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'c')
          AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": """
        SELECT CASE WHEN c.conrelid <> 0 THEN c.conrelid::regclass::text
                    ELSE c.contypid::regtype::text END, c.conname,
               c.contype::text, pg_get_constraintdef(c.oid)
        FROM pg_constraint c WHERE c.connamespace = 'sendd'::regnamespace""",
    "indexes": """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relnamespace = 'sendd'::regnamespace""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'sendd'::regnamespace""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, t.tgenabled::text, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'sendd'::regnamespace AND NOT t.tgisinternal""",
    "sequences": """
        SELECT s.sequencename, s.data_type::text, s.start_value, s.min_value, s.max_value,
               s.increment_by, s.cycle, s.cache_size,
               (SELECT d.refobjid::regclass::text || '.' || a.attname
                FROM pg_depend d JOIN pg_attribute a
                  ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = (s.schemaname || '.' || s.sequencename)::regclass
                  AND d.deptype IN ('a', 'i')) AS owned_by
        FROM pg_sequences s WHERE s.schemaname = 'sendd'""",
    "types": """
        SELECT t.typname, t.typtype::text, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
               t.typdefault,
               (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                FROM pg_enum e WHERE e.enumtypid = t.oid)::text
        FROM pg_type t WHERE t.typnamespace = 'sendd'::regnamespace""",
}

# How many of each query's first columns name the object.
KEY_COLUMNS = {"columns": 3, "constraints": 2, "triggers": 2}

Catalogue = dict[str, dict[str, str]]


async def catalogue(conn: asyncpg.Connection) -> Catalogue:
    """Each kind of object, keyed by its name, with its definition as text."""
    dump: Catalogue = {}
    for kind, sql in CATALOGUE.items():
        entries: dict[str, str] = {}
        for row in await conn.fetch(sql):
            values = [str(v) for v in row.values()]
            key = " ".join(values[:KEY_COLUMNS.get(kind, 1)])
            entries[key] = "\n".join(values)
        dump[kind] = entries
    return dump


def differences(migrated: Catalogue, from_file: Catalogue) -> list[str]:
    """What tells the two apart, readably: objects only in one, and a diff of each changed one."""
    found = []
    for kind in CATALOGUE:
        a, b = migrated[kind], from_file[kind]
        found += [f"{kind}: {key} only in the migrated database" for key in sorted(a.keys() - b)]
        found += [f"{kind}: {key} only in schema.sql" for key in sorted(b.keys() - a)]
        for key in sorted(a.keys() & b.keys()):
            if a[key] != b[key]:
                diff = difflib.unified_diff(a[key].splitlines(), b[key].splitlines(),
                                            "migrations", "schema.sql", lineterm="", n=1)
                found.append(f"{kind}: {key} differs\n" + "\n".join(diff))
    return found


def schema_file() -> str:
    return resources.files("sendd.db").joinpath("schema.sql").read_text(encoding="utf-8")


async def migrated_and_built(migrated_url: str, built_url: str) -> tuple[Catalogue, Catalogue]:
    migrated, built = await asyncpg.connect(migrated_url), await asyncpg.connect(built_url)
    try:
        await migrate.migrate(migrated)
        await built.execute(schema_file())
        return await catalogue(migrated), await catalogue(built)
    finally:
        await migrated.close()
        await built.close()


@pytest.fixture
def second_database_url(pg_server: Any) -> Iterator[str]:
    """Another fresh, empty database on the session's private server."""
    name = f"t_schema_file_{uuid.uuid4().hex[:8]}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


def test_schema_file_builds_the_schema_the_migrations_leave(database_url: str,
                                                            second_database_url: str) -> None:
    migrated, built = asyncio.run(migrated_and_built(database_url, second_database_url))
    # The dump sees the whole schema (a query that found nothing would compare equal, too).
    assert {"message", "campaign", "tenant", "submission", "schema_migration"} <= set(
        migrated["relations"])
    assert len(migrated["functions"]) > 20 and len(migrated["triggers"]) >= 6
    found = differences(migrated, built)
    assert not found, "db/schema.sql differs from the migrations:\n" + "\n".join(found)


# One change of each kind of object, made to the database built from the file: the comparison
# above must tell it apart from the migrated one.
DRIFTS = {
    "columns": "ALTER TABLE sendd.campaign ALTER COLUMN status SET DEFAULT 'sending'",
    "constraints": "ALTER TABLE sendd.tenant DROP CONSTRAINT tenant_credits_check",
    "indexes": "DROP INDEX sendd.message_bulk_id",
    "functions": """CREATE OR REPLACE FUNCTION sendd.spendable(budget bigint, alone boolean,
                        share bigint, slots integer) RETURNS bigint
                    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT budget $$""",
    "triggers": "ALTER TABLE sendd.message DISABLE TRIGGER message_deleted",
    "sequences": "ALTER SEQUENCE sendd.message_id_seq INCREMENT BY 2",
    "types": "CREATE DOMAIN sendd.positive AS integer CHECK (VALUE > 0)",
    "relations": "CREATE TABLE sendd.extra (id integer)",
}


def test_every_kind_of_drift_is_told_apart(database_url: str, second_database_url: str) -> None:
    async def work() -> dict[str, list[str]]:
        migrated, built = await migrated_and_built(database_url, second_database_url)
        assert differences(migrated, built) == []
        conn = await asyncpg.connect(second_database_url)
        found = {}
        try:
            for kind, change in DRIFTS.items():
                transaction = conn.transaction()
                await transaction.start()
                await conn.execute(change)
                found[kind] = differences(migrated, await catalogue(conn))
                await transaction.rollback()
        finally:
            await conn.close()
        return found

    for kind, found in asyncio.run(work()).items():
        assert any(line.startswith(f"{kind}: ") for line in found), (kind, found)
