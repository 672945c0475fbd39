"""What this daemon knows live about each provider account: its connection, its rate governor
(and the fleet's, in Redis), its circuit breaker, a suspension by the provider, and the largest
batch the provider took.

The account *settings* (limits, timeouts) are configuration and live in `Controls.config`;
this is what the daemon learned by sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sendd.config import AccountConfig
from sendd.core.breaker import Breakers
from sendd.core.ratelimit import Governor
from sendd.providers.base import Provider

if TYPE_CHECKING:
    from sendd.shared.limits import FleetLimits


@dataclass
class Accounts:
    providers: dict[str, Provider]
    governor: Governor
    breakers: Breakers = field(default_factory=Breakers)
    # Accounts suspended by the provider (401/403/402): account -> reason. An operator's
    # `resume account` lifts it.
    suspended: dict[str, str] = field(default_factory=dict)
    # Accounts whose provider refused a batch as too large: account -> the size that fits.
    batch_cap: dict[str, int] = field(default_factory=dict)
    # The limits shared with the other daemons through Redis (`redis.url`), or None.
    fleet: FleetLimits | None = None

    def max_batch(self, settings: AccountConfig, tenant: str | None) -> int:
        """The largest batch for an account and tenant: provider limit, 413s and rate limits
        (`tenant` None: those of the account alone)."""
        cap = self.batch_cap.get(settings.name, settings.max_batch)
        governed = self.governor.max_batch(settings.name, tenant, settings.single)
        return max(1, min(settings.max_batch, cap, governed))

    def shrink_batches(self, account: str, size: int) -> int:
        """The provider refused a batch as too large: no batch for it above `size` from now."""
        self.batch_cap[account] = min(self.batch_cap.get(account, size), size)
        return self.batch_cap[account]

    def held_back(self) -> set[str]:
        """Accounts nothing may be claimed for: suspended by the provider, or held back by
        their breaker (the provider cannot be reached; a probe is on the wire)."""
        now = trio.current_time()
        unreachable = {a for a in self.breakers.unavailable_accounts()
                       if not self.breakers.may_claim(a, now)}
        return set(self.suspended) | unreachable

    def may_send(self, account: str) -> bool:
        return account not in self.suspended and self.breakers.may_claim(
            account, trio.current_time())
