"""Messages that no daemon will ever send: their account is configured on no running daemon.

An application can insert a message naming any account; one that no daemon serves would wait
`queued` forever, and its campaign would never complete. The lead poller looks for them every
CHECK_INTERVAL seconds and makes them visible: `ctl status` (`unserved_accounts`), the metric
`sendd_unserved_messages{account}`, and one log line per account when it appears and when it is
gone (not one per message).

Cheap by construction: transactional messages are read through their partial index, and of the
campaigns only those this daemon has not claimed from for a while (a healthy campaign is never
scanned). The accounts the fleet serves come from `sendd.instance.accounts` of live daemons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHECK_INTERVAL = 30.0  # seconds between checks
STALE_AFTER = 30.0  # a sending campaign not claimed from for this long is checked

FLEET_ACCOUNTS = """
SELECT coalesce(array_agg(DISTINCT a), '{}') FROM sendd.instance i, unnest(i.accounts) a
WHERE i.stopped_at IS NULL AND i.lease_until > now()
"""

UNSERVED = """
SELECT account, count(*) AS waiting FROM (
    SELECT m.account FROM sendd.message m
    WHERE m.status = 'queued' AND m.campaign_id IS NULL AND NOT (m.account = ANY($1::text[]))
    UNION ALL
    SELECT m.account FROM sendd.message m
    WHERE m.campaign_id = ANY($2::bigint[]) AND m.status = 'queued'
      AND NOT (m.account = ANY($1::text[]))) u
GROUP BY account ORDER BY account
"""


@dataclass
class UnservedWatch:
    """The lead poller's view: when each sending campaign last gave this daemon a claim, and
    the unserved accounts found last time (account -> messages waiting)."""

    last_claim: dict[int, float] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)
    next_check: float = 0.0

    def saw(self, active: list[int], claimed: set[int], now: float) -> None:
        """After a claim: the sending campaigns, and those that gave messages."""
        last = self.last_claim
        self.last_claim = {c: now if c in claimed else last.get(c, now) for c in active}

    def stale(self, now: float) -> list[int]:
        return sorted(c for c, at in self.last_claim.items() if now - at >= STALE_AFTER)


async def check(conn: Any, watch: UnservedWatch, now: float, log: Any) -> None:
    """Find unserved accounts; log the ones that appeared or went away."""
    if now < watch.next_check:
        return
    watch.next_check = now + CHECK_INTERVAL
    fleet = await conn.fetchval(FLEET_ACCOUNTS)
    rows = await conn.fetch(UNSERVED, fleet, watch.stale(now))
    found = {r["account"]: r["waiting"] for r in rows}
    for account in sorted(found.keys() - watch.accounts.keys()):
        log.error("account_unknown", account=account, waiting=found[account],
                  served=sorted(fleet),
                  detail="messages name an account that no running daemon is configured for")
    for account in sorted(watch.accounts.keys() - found.keys()):
        log.info("account_unknown_cleared", account=account)
    watch.accounts = found
