"""The raw tree: the TOML document split into its sections with every unknown key refused (and
the key probably meant named), then the environment's SENDD_<SECTION>__<KEY> overrides."""

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from sendd.config.model import ALIASES, SECTIONS, AccountConfig
from sendd.config.rules import ConfigError

ENV_PREFIX = "SENDD_"
ENV_CONFIG = "SENDD_CONFIG"
_ACCOUNT_NAME = re.compile(r"[a-z0-9_-]+")


class Env(str):
    """A string from outside the TOML file: parsed to the field's type, and its origin named."""

    origin: str

    def __new__(cls, value: str, origin: str) -> "Env":
        self = super().__new__(cls, value)
        self.origin = origin
        return self


def show(value: Any) -> str:
    # JSON quoting keeps the message on one line and shows strings as strings ("8" vs 8).
    text = json.dumps(str(value) if isinstance(value, Env) else value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_tree(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Split the TOML document into sections, rejecting anything unknown."""
    tree: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    tree["accounts"] = {}
    for name, value in raw.items():
        if name not in tree:
            raise _unknown("", name, f"in {source}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a table ([{name}]) in {source}")
        if name == "accounts":
            tree["accounts"] = {n: _check_account(n, v, source) for n, v in value.items()}
        else:
            tree[name] = _check_keys(SECTIONS[name], name, value, source)
    return tree


def _check_account(name: str, value: Any, source: str) -> dict[str, Any]:
    _check_account_name(name, f"accounts.{name}")
    if not isinstance(value, dict):
        raise ConfigError(f"accounts.{name}: must be a table ([accounts.{name}]) in {source}")
    return _check_keys(AccountConfig, f"accounts.{name}", value, source)


def _check_account_name(name: str, label: str) -> None:
    if not _ACCOUNT_NAME.fullmatch(name):
        raise ConfigError(f"{label}: account names must be made of a-z 0-9 _ -, got {show(name)}")


def _check_keys(cls: type, prefix: str, table: dict[str, Any], where: str) -> dict[str, Any]:
    for key in table:
        _check_key(cls, prefix, key, f"in {where}")
    return dict(table)


def _check_key(cls: type, prefix: str, key: str, where: str) -> None:
    if key not in _known_keys(cls):
        raise _unknown(prefix, key, where)


def _known_keys(cls: type) -> set[str]:
    names = {f.name for f in fields(cls)} - {"name"}  # an account's name is its table name
    files = {f"{f.name}_file" for f in fields(cls) if f.metadata.get("secret")}
    return names | files | set(ALIASES.get(cls, {}))


def _unknown(prefix: str, key: str, where: str) -> ConfigError:
    label = f"{prefix}.{key}" if prefix else key
    # The same key in another section is a surer guess than a similar spelling in this one.
    elsewhere = [f"{s}.{key}" for s in _owners(key) if prefix and s != prefix]
    match = elsewhere[:1] or difflib.get_close_matches(label, _suggestions(prefix, key), n=1)
    hint = f' (did you mean "{match[0]}"?)' if match else ""
    return ConfigError(f'unknown key "{label}" {where}{hint}')


def _suggestions(prefix: str, key: str) -> list[str]:
    if not prefix:  # top level: a section name, or a key that belongs inside a section
        return [*SECTIONS, "accounts", *(f"{s}.{key}" for s in _owners(key))]
    if prefix.startswith("accounts."):
        return [f"{prefix}.{k}" for k in _known_keys(AccountConfig)]
    own = [f"{prefix}.{k}" for k in _known_keys(SECTIONS[prefix])]
    return own + [f"{s}.{key}" for s in _owners(key)]


def _owners(key: str) -> list[str]:
    return [name for name, cls in SECTIONS.items() if key in _known_keys(cls)]


# --- environment overrides -------------------------------------------------------------------


def apply_env(tree: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    # Sorted so that, with conflicting variables, the error names the same pair every time.
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        section, account, key = _env_target(var)
        if account is None:
            override(SECTIONS[section], section, tree[section], key, Env(env[var], var))
        else:
            table = tree["accounts"].setdefault(account, {})
            override(AccountConfig, f"accounts.{account}", table, key, Env(env[var], var))


def _env_target(var: str) -> tuple[str, str | None, str]:
    """Map SENDD_<SECTION>__<KEY> / SENDD_ACCOUNTS__<NAME>__<KEY> to (section, account, key)."""
    parts = var[len(ENV_PREFIX) :].lower().split("__")
    where = f"in environment variable {var}"
    if parts[0] != "accounts" and parts[0] not in SECTIONS:
        raise _unknown("", parts[0], where)
    if parts[0] == "accounts":
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"{var}: expected the form SENDD_ACCOUNTS__<NAME>__<KEY>")
        _check_account_name(parts[1], var)
        _check_key(AccountConfig, f"accounts.{parts[1]}", parts[2], where)
        return "accounts", parts[1], parts[2]
    if len(parts) != 2 or not parts[1]:
        raise ConfigError(f"{var}: expected the form SENDD_<SECTION>__<KEY>")
    _check_key(SECTIONS[parts[0]], parts[0], parts[1], where)
    return parts[0], None, parts[1]


def override(cls: type, prefix: str, table: dict[str, Any], key: str, value: Env) -> None:
    """Set key from outside the file; it replaces the file's other spelling of the same setting."""
    for other in _alternatives(cls, key):
        if isinstance(table.get(other), Env):
            both = f"{table[other].origin} and {value.origin}"
            raise ConfigError(f"{prefix}.{key}: set only one of {both}")
        table.pop(other, None)
    table[key] = value


def _alternatives(cls: type, key: str) -> list[str]:
    """Other keys that set the same field: `x` <-> `x_file` for secrets, and aliases."""
    secrets = {f.name for f in fields(cls) if f.metadata.get("secret")}
    aliases = ALIASES.get(cls, {})
    found = [f"{key}_file"] if key in secrets else []
    if key.endswith("_file") and key[:-5] in secrets:
        found.append(key[:-5])
    found += [alias for alias, target in aliases.items() if target == key]
    if key in aliases:
        found.append(aliases[key])
    return found
