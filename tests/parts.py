"""The daemon's state objects, built for in-process tests of claims and actors the way
`sendd.pipeline.build_parts` builds them for the daemon, with test accounts and providers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import structlog

from sendd.config import AccountConfig, PipelineConfig, RetryConfig
from sendd.core.ratelimit import Governor
from sendd.metrics import Metrics
from sendd.pipeline import Parts, governor_for
from sendd.state.accounts import Accounts
from sendd.state.controls import Controls
from sendd.state.health import Health
from sendd.state.lease import Lease
from sendd.supervisor import Supervisor


def account(name: str, *, max_batch: int = 1000, timeout: float = 1.0,
            single: bool = False) -> AccountConfig:
    """An account's settings (its provider is the test's own, never reached over HTTP)."""
    return AccountConfig(name, kind="mitto", base_url="http://127.0.0.1:9", max_batch=max_batch,
                         timeout=timeout, single=single)


def claim_config(accounts: list[AccountConfig], chunk: int = 1000, **pipeline: Any) -> Any:
    """The parts of a configuration claims and actors read (no jitter: exact timings)."""
    return SimpleNamespace(pipeline=PipelineConfig(claim_chunk=chunk, **pipeline),
                           retry=RetryConfig(jitter=0.0), accounts={a.name: a for a in accounts})


def make_parts(config: Any, *, instance_id: str = "test", pool: Any = None,
               providers: dict[str, Any] | None = None, lease_until: float = 0.0,
               governor: Governor | None = None, now: float = 0.0) -> Parts:
    """State for `config` (a real Config or a claim_config); accounts at their configured
    limits unless `governor` says otherwise. `now`: the trio time the daemon started (0
    outside trio)."""
    if governor is None:
        governor = governor_for(config.accounts.values())
    accounts = Accounts(providers or {}, governor)
    health = Health(60.0, started=now)
    return Parts(pool, Lease(instance_id, lease_until), accounts, Controls(config), health,
                 Metrics(health, accounts), Supervisor(structlog.get_logger()))
