"""The private servers the tests and `sendd demo` run on."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from pathlib import Path

import asyncpg
import pytest
import redis
import trio

from sendd.dev import pgserver
from sendd.dev.pgserver import PrivatePostgres, PrivateRedis, ServerError, free_port


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def fetchval(url: str, sql: str) -> object:
    # Sync tests are not run under trio, so plain asyncio is fine here.
    return asyncio.run(_fetchval(url, sql))


def test_server_accepts_connections(pg_server: PrivatePostgres) -> None:
    assert pg_server.url.startswith("postgresql://sendd@127.0.0.1:")
    assert fetchval(pg_server.url, "SELECT current_database()") == "sendd"
    assert fetchval(pg_server.url, "SHOW fsync") == "off"


def test_restart_keeps_port_and_data(pg_server: PrivatePostgres, database_url: str) -> None:
    port = pg_server.port
    fetchval(database_url, "CREATE TABLE kept AS SELECT 42 AS answer")
    pg_server.restart()
    assert pg_server.port == port
    assert fetchval(database_url, "SELECT answer FROM kept") == 42


def test_databases_are_isolated(pg_server: PrivatePostgres, database_url: str) -> None:
    fetchval(database_url, "CREATE TABLE mine (id int)")
    other = pg_server.create_database("t_isolation_other")
    try:
        assert fetchval(other, "SELECT to_regclass('public.mine') IS NULL") is True
    finally:
        pg_server.drop_database("t_isolation_other")


def test_drop_ends_open_sessions(pg_server: PrivatePostgres) -> None:
    async def hold_open_and_drop() -> None:
        conn = await asyncpg.connect(pg_server.create_database("t_left_open"), timeout=10)
        pg_server.drop_database("t_left_open")  # must not wait for conn to close
        assert conn.is_closed() or not await _is_alive(conn)

    asyncio.run(hold_open_and_drop())


async def _is_alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False


def test_bad_database_name_is_refused(pg_server: PrivatePostgres) -> None:
    with pytest.raises(ValueError, match="invalid database name"):
        pg_server.create_database('x"; DROP DATABASE sendd; --')


def test_failed_start_cleans_up_and_explains() -> None:
    # A base dir of our own (world-traversable, unlike pytest's tmp_path) to see what is left.
    base = Path(tempfile.mkdtemp(prefix="sendd-test-"))
    base.chmod(0o755)
    server = PrivatePostgres(durable=False, extra_settings={"no_such_setting": "1"}, base_dir=base)
    try:
        with pytest.raises(ServerError, match="no_such_setting"):
            server.start()
        assert list(base.iterdir()) == []
        assert server.port is None
    finally:
        shutil.rmtree(base)


def test_missing_binaries_are_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pgserver, "PG_BIN_GLOB", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="install the postgresql package"):
        PrivatePostgres().start()


def test_redis_answers_ping(redis_server: PrivateRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_redis_stop_frees_the_port() -> None:
    server = PrivateRedis().start()
    port, directory = server.port, server.directory
    server.stop()
    assert directory is not None and not directory.exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


async def test_trio_mode_runs_async_tests() -> None:
    # Guards the pytest / pytest-trio pairing: trio_mode must pick up plain async tests.
    with trio.fail_after(5):
        await trio.sleep(0)
    assert trio.lowlevel.current_trio_token() is not None
