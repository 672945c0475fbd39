"""Provider adapters, one module per provider kind."""

from __future__ import annotations

from sendd.config import AccountConfig
from sendd.errors import UserError
from sendd.providers.base import Provider


def open_provider(account: AccountConfig, connections: int) -> Provider:
    """The adapter for an account's kind."""
    if account.kind == "mitto":
        from sendd.providers.mitto import MittoProvider

        return MittoProvider(account, connections)
    raise UserError(f"accounts.{account.name}.kind: {account.kind!r} is not supported yet")
