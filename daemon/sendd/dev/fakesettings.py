"""The fake provider's behaviour knobs (`FakeSettings`) and their validation.

Each field is a flag of `python -m sendd.dev.fakeprovider` and a key of `POST /_control`; both go
through `apply_settings`, so a bad value is refused the same way on the command line and live.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeSettings:
    """The fake's behaviour knobs; each is a CLI flag and a `/_control` key."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_429_rate: float = 0.0
    error_key: str = ""  # only requests with this API key get the 429s and 503s ("": all)
    retry_after: int = 1
    error_503_rate: float = 0.0
    status_override: int = 0
    max_batch: int = 1000
    reject_prefix: str = "+99"
    honour_references: bool = False
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    lookup_fail: bool = False
    message_id_prefix: str = ""
    api_keys: list[str] = field(default_factory=lambda: ["test-key"])
    seed: int = 0


_FIELDS = {f.name: f for f in dataclasses.fields(FakeSettings)}


def apply_settings(settings: FakeSettings, changes: Any) -> None:
    """Validate a `/_control` object and apply it; raises ValueError naming the bad key."""
    if type(changes) is not dict:
        raise ValueError("expected a JSON object")
    checked = {name: _check_setting(name, value) for name, value in changes.items()}
    for name, value in checked.items():
        setattr(settings, name, value)


def _check_setting(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        raise ValueError(f"unknown setting {name!r}")
    checked = _typed(getattr(FakeSettings(), name), value)
    if checked is None:
        raise ValueError(f"bad value for {name}: {value!r}")
    if name.endswith("_rate") and checked > 1:
        raise ValueError(f"{name} is a fraction, at most 1")
    if name == "status_override" and checked and not 400 <= checked <= 599:
        raise ValueError("status_override must be 0 or 400..599")
    return checked


def _typed(default: Any, value: Any) -> Any:
    """`value` converted to the type of `default`, or None when it does not fit (or < 0)."""
    if type(default) is float and type(value) in (int, float) and value >= 0:
        return float(value)
    if type(default) is int and type(value) is int and value >= 0:
        return value
    if type(default) in (str, bool) and type(value) is type(default):
        return value
    if type(default) is list and _is_key_list(value):
        return list(value)
    return None


def _is_key_list(value: Any) -> bool:
    return type(value) is list and bool(value) and all(type(v) is str for v in value)
