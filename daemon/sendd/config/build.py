"""Building the dataclasses from the raw tree: each value parsed to its field's type and
checked by its rule, secrets read from their `<key>_file`, and the checks across keys."""

import dataclasses
import math
import os
import stat
from dataclasses import MISSING, fields
from typing import Any

from sendd.config.masking import mask_url
from sendd.config.model import (
    ALIASES,
    DEFAULT_DATABASE_URL,
    SECTIONS,
    AccountConfig,
    Config,
    RetryConfig,
)
from sendd.config.rules import BASIC, ConfigError
from sendd.config.tree import Env, show

SECRET_FILE_MAX = 64 * 1024
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def build_config(tree: dict[str, dict[str, Any]], source: str) -> Config:
    database = tree["database"]
    if "url" not in database and "url_file" not in database:
        database["url"] = DEFAULT_DATABASE_URL
    sections = {name: _build(cls, tree[name], name) for name, cls in SECTIONS.items()}
    _check_retry(sections["retry"])
    accounts = {n: _build_account(n, raw) for n, raw in sorted(tree["accounts"].items())}
    return Config(**sections, accounts=accounts, source=source)


def _build(cls: type, raw: dict[str, Any], prefix: str, **fixed: Any) -> Any:
    entries = _entries(cls, raw, prefix)
    kwargs = dict(fixed)
    for f in fields(cls):
        if f.name in fixed:
            continue
        if f.name in entries:
            kwargs[f.name] = _coerce(f, *entries[f.name])
        elif f.default is MISSING:
            raise ConfigError(f"{prefix}.{f.name}: required")
    return cls(**kwargs)


def _entries(cls: type, raw: dict[str, Any], prefix: str) -> dict[str, tuple[str, Any]]:
    """Field name -> (label naming what the user wrote, value), reading *_file secrets."""
    entries: dict[str, tuple[str, Any]] = {}
    aliases = ALIASES.get(cls, {})
    for key, value in raw.items():
        label = _label(f"{prefix}.{key}", value)
        name = aliases.get(key, key)
        if key.endswith("_file") and key not in aliases:
            name, value = key[:-5], _read_secret(label, value)
        if name in entries:
            raise ConfigError(f"{prefix}: set only one of {entries[name][0]} and {label}")
        entries[name] = (label, value)
    return entries


def _label(key: str, value: Any) -> str:
    return f"{key} (from {value.origin})" if isinstance(value, Env) else key


def _read_secret(label: str, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{label}: must be a file path")
    data = _read_regular_file(label, path)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:  # its message quotes bytes of the secret
        raise ConfigError(f'{label}: "{path}" is not UTF-8 text') from None
    if not text:
        raise ConfigError(f'{label}: "{path}" is empty')
    return text


def _read_regular_file(label: str, path: str) -> bytes:
    """A secret file's bytes. Only a regular file of at most SECRET_FILE_MAX bytes: a FIFO
    would hang every command and /dev/zero would never end."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f'{label}: "{path}" is not a regular file')
            data = f.read(SECRET_FILE_MAX + 1)
    except OSError as e:
        raise ConfigError(f'{label}: cannot read "{path}": {why(e)}') from None
    if len(data) > SECRET_FILE_MAX:
        raise ConfigError(f'{label}: "{path}" is larger than {SECRET_FILE_MAX // 1024} KiB; '
                          "a secret file holds only the secret")
    return data


def _coerce(f: dataclasses.Field, label: str, value: Any) -> Any:
    rule = f.metadata.get("rule") or BASIC[f.type]
    try:
        parsed = rule.norm(_parse(value, f.type))
        ok = rule.ok(parsed)
    except (ValueError, TypeError):
        ok = False
    if ok:
        return parsed
    shown = "" if f.metadata.get("secret") else f", got {show(_masked_value(f, value))}"
    raise ConfigError(f"{label}: must be {rule.expect}{shown}")


def _masked_value(f: dataclasses.Field, value: Any) -> Any:
    if f.metadata.get("url") and isinstance(value, str):
        return mask_url(str(value))
    return value


def _parse(value: Any, typ: type) -> Any:
    if isinstance(value, Env):
        return _parse_text(str(value), typ)
    if typ is float and type(value) in (int, float):
        value = float(value)  # TOML writes 30 for 30.0; both mean the same number
    if type(value) is not typ:  # `type is`, because bool is a subclass of int
        raise ValueError(value)
    if typ is float and not math.isfinite(value):
        raise ValueError(value)
    return value


def _parse_text(text: str, typ: type) -> Any:
    if typ is str:
        return text
    if typ is bool:
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise ValueError(text)
        return _BOOL_WORDS[word]
    value = typ(text.strip())
    if typ is float and not math.isfinite(value):
        raise ValueError(text)
    return value


def _check_retry(retry: RetryConfig) -> None:
    if retry.max_delay < retry.base_delay:
        raise ConfigError(
            f"retry.max_delay: must be >= retry.base_delay ({retry.base_delay:g}),"
            f" got {retry.max_delay:g}"
        )


def _build_account(name: str, raw: dict[str, Any]) -> AccountConfig:
    prefix = f"accounts.{name}"
    account = _build(AccountConfig, raw, prefix, name=name)
    if account.kind == "mitto":
        _require(account, prefix, "api_key")
        return account
    _require(account, prefix, "token", "phone_number_id")
    if "max_batch" in raw and account.max_batch != 1:
        raise ConfigError(f"{prefix}.max_batch: whatsapp sends one message per request; must be 1")
    return dataclasses.replace(account, max_batch=1)


def _require(account: AccountConfig, prefix: str, *keys: str) -> None:
    for key in keys:
        if not getattr(account, key):
            raise ConfigError(f'{prefix}.{key}: required for kind "{account.kind}"')


def why(error: OSError) -> str:
    # strerror only: str(error) may carry more than we want to echo.
    return error.strerror or type(error).__name__
