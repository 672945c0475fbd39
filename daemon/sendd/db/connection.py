"""PostgreSQL access for trio: asyncpg through triopg, under a trio-asyncio loop.

One round trip through the bridge costs a few hundred microseconds, so every hot-path query
works on whole batches (arrays and unnest), never on one row at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio
import triopg

from sendd.config import mask_url
from sendd.errors import UserError, describe

T = TypeVar("T")

# Errors that mean "the database went away or is restarting": callers retry these.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    trio.BrokenResourceError,
)
# Errors a transaction can be retried after as it is.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = CONNECTION_ERRORS + (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    # asyncpg's pool raises this when the server drops connections under it (a restart):
    # "release() called on a free connection holder", "another operation is in progress".
    asyncpg.exceptions.InternalClientError,
)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """trio.run with the asyncio bridge that asyncpg needs."""

    async def with_loop() -> T:
        async with trio_asyncio.open_loop():
            return await main()

    try:
        return trio.run(with_loop)
    except BaseExceptionGroup as group:
        # trio (strict exception groups) and trio-asyncio's nursery wrap whatever `main` raised;
        # hand a lone error on as itself, so callers can catch UserError and friends.
        raise _sole_error(group) from None


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def unavailable(url: str, error: BaseException) -> UserError:
    """The one-line error for a database that cannot be reached."""
    reason = describe(error)
    return UserError(
        f"cannot connect to the database at {mask_url(url)}: {reason} "
        "(is PostgreSQL running? set database.url or --database-url)"
    )


@asynccontextmanager
async def connect(url: str, timeout: float = 10.0) -> AsyncIterator[Any]:
    """One connection, with a clear UserError when the database cannot be reached."""
    try:
        cm = triopg.connect(url, timeout=timeout)
        conn = await cm.__aenter__()
    except (*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError) as error:
        raise unavailable(url, error) from None
    try:
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            try:
                await cm.__aexit__(None, None, None)
            except CONNECTION_ERRORS:
                pass  # closing a connection the server already dropped


@asynccontextmanager
async def listening(conn: Any, channel: str, callback: Callable[..., None]) -> AsyncIterator[None]:
    """LISTEN on `channel` for the block (callback(conn, pid, channel, payload) per NOTIFY)."""
    await conn.add_listener(channel, callback)
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            try:
                await conn.remove_listener(channel, callback)
            except CONNECTION_ERRORS:
                pass  # the connection is gone, and its listener with it
