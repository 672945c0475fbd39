"""This daemon's lease, as far as it surely lasts: kept by the heartbeat, read by the senders
(a request leaves only while the lease outlives it) and by health."""

from __future__ import annotations

import os
import secrets
import socket

import trio


def new_instance_id(configured: str = "") -> str:
    """A fresh id per start, so a restarted daemon never mistakes old leases for its own."""
    base = configured or f"{socket.gethostname()}-{os.getpid()}"
    return f"{base}-{secrets.token_hex(3)}"


class LeaseLost(Exception):
    """This daemon's lease ended (e.g. the database was away too long): its claims may already
    belong to another daemon, so it must not send them. The daemon exits and restarts."""


class Lease:
    """Trio time until which the lease surely lasts, and an event set at each renewal."""

    def __init__(self, instance_id: str, valid_until: float) -> None:
        self.instance_id = instance_id
        self.valid_until = valid_until
        # Daemons with a live lease on the database (this one too), at the last renewal.
        self.live_daemons = 1
        self._renewed = trio.Event()

    def renew(self, valid_until: float, live_daemons: int | None = None) -> None:
        self.valid_until = valid_until
        if live_daemons is not None:
            self.live_daemons = max(1, live_daemons)
        self._renewed.set()
        self._renewed = trio.Event()

    def remaining(self) -> float:
        return self.valid_until - trio.current_time()

    async def wait_until_covers(self, needed: float) -> None:
        """Return once the lease lasts at least `needed` seconds more (the heartbeat renews it
        every sixth of its length, so this waits only when a renewal is due or failing)."""
        while self.remaining() < needed:
            await self._renewed.wait()
