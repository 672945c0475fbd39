"""This machine's own trouble is not the provider's nor the message's: a sender that cannot
open a connection (no file descriptors left) puts the batch back with no attempt used and
leaves the account's breaker alone (issue 13: `ulimit -n 200` made messages reach attempt 5)."""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import trio

from sendd.actors.sender import note_availability
from sendd.core.breaker import Breakers, State
from sendd.core.outcomes import outcomes_of
from sendd.model import RELEASE, Message
from sendd.providers import base
from sendd.providers.http11 import Client, LocalFailure


@contextmanager
def no_descriptors_left() -> Iterator[None]:
    """Use up every file descriptor under a lowered soft limit; give them back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        while True:
            try:
                held.append(socket.socket())
            except OSError:
                break
        yield
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_no_descriptors_is_a_local_failure_not_an_unreachable_provider() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", {}, timeout=2.0, max_connections=1)
    try:
        with no_descriptors_left():
            try:
                await client.request("GET", "/")
            except LocalFailure:
                pass  # not NotSubmitted: the provider is not to blame
            else:
                raise AssertionError("a request went out without a descriptor")
    finally:
        listener.close()
        await client.aclose()


async def test_a_local_failure_releases_the_messages_and_leaves_the_breaker_closed() -> None:
    message = Message(1, "acme", 7, "main", None, "+306900000001", "hi", 1, 4)
    retry = SimpleNamespace(max_attempts=5, base_delay=1.0, max_delay=10.0, jitter=0.0)
    response = base.SendResponse(base.LOCAL, error="cannot open a connection: EMFILE")
    [outcome] = outcomes_of([message], response, retry, provider_up=False)
    assert (outcome.status, outcome.counts_attempt) == (RELEASE, False)

    breakers = Breakers()
    accounts = SimpleNamespace(breakers=breakers)
    for _ in range(10):
        ticket = breakers.admit("main", 0.0, 10.0)
        note_availability(accounts, "main", ticket, [response])
    assert breakers.get("main").state is State.CLOSED
