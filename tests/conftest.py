"""Shared fixtures. Sections below; add new fixtures to the section they belong to."""

from __future__ import annotations

import fcntl
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sendd.dev.pgserver import PrivatePostgres, PrivateRedis

# --- Private servers ------------------------------------------------------------------------
# One throwaway PostgreSQL and one Redis per test session (per xdist worker: each worker is a
# session of its own), on free ports, never the system's.


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
    from harness import fresh_database

    with fresh_database(pg_server, request.node.name) as url:
        yield url


# --- End-to-end fixtures (see harness.py) ----------------------------------------------------


@pytest.fixture
def fake_provider() -> Iterator:
    """The fake mitto provider as a real process; tests change it live with .control()."""
    from harness import FakeProvider

    with FakeProvider() as provider:
        yield provider


# --- Parallel runs (pytest-xdist) -----------------------------------------------------------
# The suite runs in worker processes (`-n 2` in pyproject's addopts), each a session with its
# own private servers. A test marked `serial` has the machine to itself: it holds a lock that
# every other test holds shared while it runs, so it waits for the test running on the other
# worker, and that worker waits for it (lower bounds on rates and latencies measured against
# the wall clock are what cannot share two CPUs). Without xdist (`-n 0`) none of this applies.

_LOCK_DIR = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker: `slow` tests first, so that none starts last and leaves the other worker
    idle meanwhile; `serial` ones last, when the other worker has only short tests to finish.
    (Every worker collects the same order; xdist hands the tests out in it.)"""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: 2 if item.get_closest_marker("serial")
                   else 0 if item.get_closest_marker("slow") else 1)


def pytest_configure(config: pytest.Config) -> None:
    # Started in the background by a shell without job control, pytest inherits SIGINT ignored,
    # and so would every process a test starts: the tests that press Ctrl-C on `sendd ctl
    # watch` and `sendd demo` would see it do nothing. Take Ctrl-C as Python usually does.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(config, "workerinput"):  # a worker: the controller made the directory
        config.stash[_LOCK_DIR] = config.workerinput["sendd_lock_dir"]
    elif config.pluginmanager.hasplugin("xdist"):
        config.stash[_LOCK_DIR] = tempfile.mkdtemp(prefix="sendd-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _LOCK_DIR in config.stash:
        shutil.rmtree(config.stash[_LOCK_DIR], ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist, in the controller: tell each worker where the machine lock is."""
    node.workerinput["sendd_lock_dir"] = node.config.stash[_LOCK_DIR]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if not hasattr(item.config, "workerinput"):
        yield
        return
    with machine_lock(Path(item.config.stash[_LOCK_DIR]),
                      exclusive=item.get_closest_marker("serial") is not None):
        yield


@contextmanager
def machine_lock(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Shared for a test, exclusive for a `serial` one. New tests pass a gate first, which a
    serial test holds while it waits, so the workers cannot keep it waiting for ever."""
    with open(directory / "gate", "a") as gate, open(directory / "machine", "a") as machine:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
