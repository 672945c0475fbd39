"""Shared fixtures. Sections below; add new fixtures to the section they belong to."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from sendd.dev.pgserver import PrivatePostgres, PrivateRedis

# --- Private servers ------------------------------------------------------------------------
# One throwaway PostgreSQL and one Redis per test session, on free ports, never the system's.


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PrivatePostgres]:
    # Durability off: tests never need to survive a power cut, and fsync dominates their time.
    with PrivatePostgres(durable=False) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def database_url(pg_server: PrivatePostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test only (no schema; run migrations yourself)."""
    # The test's name in the database name helps when reading server logs.
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


# --- End-to-end fixtures (see harness.py) ----------------------------------------------------


@pytest.fixture
def fake_provider() -> Iterator:
    """The fake mitto provider as a real process; tests change it live with .control()."""
    from harness import FakeProvider

    with FakeProvider() as provider:
        yield provider
