"""Leases: every claim belongs to a daemon instance whose lease a heartbeat keeps fresh.

A message's lease is its owner's lease, so keeping thousands of claims alive costs one row write
per heartbeat. When an instance's lease ends (it crashed, or lost the database for longer than
its lease), a reaper adopts its work: what never reached a provider goes back to the queue
untouched, and what may have reached one (an open submission mark) is settled.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from sendd.config import Config, ConfigError

# A request is only started while the lease has at least this much life left beyond the
# provider timeout, so a reaper can never take over work that is still on the wire.
LEASE_MARGIN = 2.0

REGISTER = """
INSERT INTO sendd.instance (id, hostname, pid, lease_until)
VALUES ($1, $2, $3, now() + make_interval(secs => $4))
"""

# Fails (no row) once the lease has ended or another daemon has adopted our work.
# Also counts the live daemons (this one included): a fleet's share of each limit while Redis
# is away (sendd.shared.limits).
RENEW = """
UPDATE sendd.instance SET lease_until = now() + make_interval(secs => $2)
WHERE id = $1 AND lease_until > now() AND stopped_at IS NULL
RETURNING (SELECT count(*) FROM sendd.instance
           WHERE stopped_at IS NULL AND lease_until > now()) AS live
"""

# Work that never left: sending rows of an instance without an open submission mark.
RELEASE_UNSUBMITTED = """
UPDATE sendd.message m SET
    status = CASE WHEN EXISTS (SELECT 1 FROM sendd.campaign c
                               WHERE c.id = m.campaign_id AND c.status = 'cancelled')
                  THEN 'cancelled' ELSE 'queued' END,
    lease_owner = NULL
WHERE m.lease_owner = $1 AND m.status = 'sending'
  AND sendd.transition_allowed(m.status, 'queued')
  AND NOT EXISTS (SELECT 1 FROM sendd.submission s
                  WHERE s.instance_id = $1 AND m.id = ANY(s.message_ids))
"""

# Only a daemon whose own lease is alive adopts (KEY SHARE: nobody adopts it meanwhile):
# work adopted by a dead one would belong to no instance row and never be adopted again.
EXPIRED_INSTANCE = """
SELECT id FROM sendd.instance
WHERE id <> $1 AND lease_until < now() AND stopped_at IS NULL
  AND EXISTS (SELECT 1 FROM sendd.instance me WHERE me.id = $1 AND me.stopped_at IS NULL
                AND me.lease_until > now() FOR KEY SHARE)
ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED
"""

ADOPT_MARKS = """
UPDATE sendd.submission SET instance_id = $2, adopted_at = now() WHERE instance_id = $1
"""

# Adopted marks still waiting for settlement; `handed` are those already with the settler.
ADOPTED_MARKS = """
SELECT id, account, message_ids FROM sendd.submission
WHERE instance_id = $1 AND adopted_at IS NOT NULL AND NOT (id = ANY($2::bigint[]))
ORDER BY id
"""

ADOPT_MESSAGES = """
UPDATE sendd.message SET lease_owner = $2 WHERE lease_owner = $1 AND status = 'sending'
"""

MESSAGES_OF_MARK = """
SELECT id, tenant_id, campaign_id, account, sender, recipient, body, segments, attempts
FROM sendd.message WHERE id = ANY($1::bigint[]) AND status = 'sending' AND lease_owner = $2
ORDER BY id
"""


# This instance's marks held for longer than `$2` seconds: counted from the mark, or from its
# hand-over to settlement (adopted_at: a dead daemon's mark, or one the writer could not close).
STALE_MARKS = """
SELECT id, cardinality(message_ids) AS messages,
       extract(epoch FROM now() - coalesce(adopted_at, created_at))::float8 AS age
FROM sendd.submission
WHERE instance_id = $1 AND coalesce(adopted_at, created_at) < now() - make_interval(secs => $2)
ORDER BY id
"""


@dataclass
class Adopted:
    """A dead instance whose work was taken over: `released` claims went back to the queue,
    `marks` submission marks now wait for settlement (see `adopted_marks`)."""

    instance_id: str
    released: int
    marks: int


async def register(conn: Any, instance_id: str, lease_seconds: float) -> None:
    await conn.execute(REGISTER, instance_id, socket.gethostname(), os.getpid(), lease_seconds)


# Whether this daemon sends at its local share of the limits (Redis away), and how many other
# live daemons do (sendd.shared.limits).
SET_LIMITS_LOCAL = "UPDATE sendd.instance SET limits_local = $2 WHERE id = $1"
OTHERS_LOCAL = """
SELECT count(*) FROM sendd.instance
WHERE id <> $1 AND limits_local AND stopped_at IS NULL AND lease_until > now()
"""


async def set_limits_local(conn: Any, instance_id: str, local: bool) -> None:
    await conn.execute(SET_LIMITS_LOCAL, instance_id, local)


async def others_local(conn: Any, instance_id: str) -> int:
    return await conn.fetchval(OTHERS_LOCAL, instance_id)


async def renew(conn: Any, instance_id: str, lease_seconds: float) -> int | None:
    """Extend the lease; the live daemons, or None when it had already ended (our claims may
    be someone else's)."""
    return await conn.fetchval(RENEW, instance_id, lease_seconds)


async def release_unsubmitted(conn: Any, instance_id: str) -> int:
    """Put back every claim of the instance that never reached a provider (no attempt used)."""
    status = await conn.execute(RELEASE_UNSUBMITTED, instance_id)
    return int(status.split()[-1])


async def finish(conn: Any, instance_id: str) -> int:
    """On a clean stop: release what never left; end the lease so open marks are adopted at once.

    Returns the number of open submission marks left for a reaper to settle.
    """
    async with conn.transaction():
        await release_unsubmitted(conn, instance_id)
        open_marks = await conn.fetchval(
            "SELECT count(*) FROM sendd.submission WHERE instance_id = $1", instance_id
        )
        if open_marks:
            await conn.execute(
                "UPDATE sendd.instance SET lease_until = now() WHERE id = $1", instance_id
            )
        else:
            await conn.execute("DELETE FROM sendd.instance WHERE id = $1", instance_id)
    return open_marks


async def adopt_expired(conn: Any, instance_id: str) -> Adopted | None:
    """Take over one dead instance's work in one transaction (only one reaper wins it)."""
    async with conn.transaction():
        dead = await conn.fetchval(EXPIRED_INSTANCE, instance_id)
        if dead is None:
            return None
        released = await release_unsubmitted(conn, dead)
        marks = await conn.execute(ADOPT_MARKS, dead, instance_id)
        await conn.execute(ADOPT_MESSAGES, dead, instance_id)
        await conn.execute("DELETE FROM sendd.instance WHERE id = $1", dead)
    return Adopted(dead, released, int(marks.split()[-1]))


async def adopted_marks(conn: Any, instance_id: str, handed: set[int]) -> list[Any]:
    """Adopted marks not yet handed to the settler: kept in the database, so a reaper that
    fails half-way through handing them over simply finds the rest on its next pass."""
    return await conn.fetch(ADOPTED_MARKS, instance_id, list(handed))


async def messages_of_mark(conn: Any, message_ids: list[int], instance_id: str) -> list[Any]:
    """The still-unsettled messages of an adopted mark."""
    return await conn.fetch(MESSAGES_OF_MARK, message_ids, instance_id)


def stale_after(config: Config) -> float:
    """Seconds after which an open mark of this daemon is stuck, not slow: longer than a request
    (an account's timeout), the wait before its references are looked up (as long again), the
    settlement window and a lease's length for the rest (results waiting for the writer through
    a database outage, which cannot outlast the lease without the daemon exiting)."""
    longest = max((account.timeout for account in config.accounts.values()), default=0.0)
    return 2 * longest + config.pipeline.settle_seconds + config.pipeline.lease_seconds


async def stale_marks(conn: Any, instance_id: str, seconds: float) -> list[Any]:
    """This instance's marks open for more than `seconds` (id, messages, age)."""
    return await conn.fetch(STALE_MARKS, instance_id, seconds)


def check_runnable(config: Config) -> None:
    """What a daemon (or a pipeline rebuilt by a reload) needs beyond each key's own checks:
    an account, and a lease that outlives any request started while it was valid (a request
    needs timeout + margin of lease left, and a heartbeat leaves at least 2/3 of it)."""
    if not config.accounts:
        raise ConfigError("no [accounts.NAME] configured: sendd has no provider to send to")
    longest = max(account.timeout for account in config.accounts.values())
    needed = 1.5 * (longest + LEASE_MARGIN)
    if config.pipeline.lease_seconds <= needed:
        raise ConfigError(f"pipeline.lease_seconds: must be more than {needed:g} (1.5 x the "
                          f"longest account timeout, {longest:g}s, plus {LEASE_MARGIN:g}s)")


# What this daemon sends for, so every daemon can tell messages no daemon serves
# (sendd.state.unserved).
SERVED_ACCOUNTS = "UPDATE sendd.instance SET accounts = $2 WHERE id = $1"


async def serve_accounts(conn: Any, instance_id: str, accounts: list[str]) -> None:
    await conn.execute(SERVED_ACCOUNTS, instance_id, sorted(accounts))
