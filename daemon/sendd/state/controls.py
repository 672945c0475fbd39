"""What the operator steers: the configuration in force, pauses, the drain, a pipeline rebuild.

Written by the control socket and signals (sendd.control), read by the pollers (what to claim),
the senders (account settings), the scheduler and status. One writer per field: the control
commands, but for the pauses, which the housekeeper also sets from where they are stored
(sendd.db.pauses), and the tenants' weights, which only the housekeeper sets (from the tenant
table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from sendd.config import AccountConfig, Config
from sendd.db.pauses import Pauses
from sendd.model import Batch


@dataclass
class Controls:
    # The configuration in force: reload and set-rate replace it (account settings apply live;
    # pipeline and retry settings reach the actors when a rebuild starts a new pipeline).
    config: Config
    paused_all: bool = False
    paused_tenants: set[str] = field(default_factory=set)
    paused_accounts: set[str] = field(default_factory=set)
    # Counts the pause and resume commands: the housekeeper drops a read of the stored pauses
    # that a command overtook (its snapshot may predate the command's commit).
    pause_commands: int = 0
    # Tenants' shares of the throughput (`sendd tenant set T --weight N`, read from the
    # database by the housekeeper): tenant -> weight; a tenant not here weighs 1.
    tenant_weights: dict[str, float] = field(default_factory=dict)
    # "Please stop": set by SIGTERM/SIGINT or the `drain` command.
    drain: trio.Event = field(default_factory=trio.Event)
    # A reload that needs a new pipeline puts its configuration in `next_config`, then sets
    # `rebuild` (the daemon replaces the event for each pipeline).
    rebuild: trio.Event = field(default_factory=trio.Event)
    next_config: Config | None = None
    # Replaced at each wake-up: a poller takes the current event before it claims and waits on
    # that one, so a wake-up that came during its claim is not missed.
    wakeup: trio.Event = field(default_factory=trio.Event)

    def account(self, name: str) -> AccountConfig:
        return self.config.accounts[name]

    def requests(self, batch: Batch) -> int:
        """Requests a batch takes: one, or one per message for a single-message account."""
        return len(batch.messages) if self.account(batch.account).single else 1

    def wake_pollers(self) -> None:
        """New work may be claimable (queued, a pause lifted, an account back)."""
        self.wakeup.set()
        self.wakeup = trio.Event()

    def apply_pauses(self, pauses: Pauses) -> bool:
        """Take the pauses as stored; True when one was lifted (the pollers are woken)."""
        lifted = ((self.paused_all and not pauses.all)
                  or not self.paused_tenants <= pauses.tenants
                  or not self.paused_accounts <= pauses.accounts)
        self.paused_all = pauses.all
        self.paused_tenants, self.paused_accounts = set(pauses.tenants), set(pauses.accounts)
        if lifted:
            self.wake_pollers()
        return lifted
