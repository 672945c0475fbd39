"""Configuration: a TOML file, then SENDD_<SECTION>__<KEY> environment overrides, then CLI flags.

Everything is validated at load so a bad setting stops the daemon at start with one line naming
the key, instead of failing later in an actor. Secrets (the database/redis URL password, provider
credentials) may come from `<key>_file` paths and never appear in errors, reprs or `masked()`.

This module reads the file and puts the steps together: `rules` (what each value must be),
`model` (the dataclasses), `tree` (sections, unknown keys, the environment's overrides), `build`
(values parsed and checked, secret files read) and `masking`.
"""

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from sendd.config.build import SECRET_FILE_MAX, build_config, why
from sendd.config.masking import MASK, mask_url, masked
from sendd.config.model import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DATABASE_URL,
    AccountConfig,
    Config,
    DaemonConfig,
    DatabaseConfig,
    PipelineConfig,
    RedisConfig,
    RetryConfig,
)
from sendd.config.rules import ConfigError
from sendd.config.tree import ENV_CONFIG, ENV_PREFIX, Env, apply_env, check_tree, override

__all__ = [
    "CONFIG_FILE_MAX", "DEFAULT_CONTROL_SOCKET", "DEFAULT_DATABASE_URL", "DEFAULT_PATH",
    "DEFAULTS_SOURCE", "ENV_CONFIG", "ENV_PREFIX", "MASK", "SECRET_FILE_MAX", "AccountConfig",
    "Config", "ConfigError", "DaemonConfig", "DatabaseConfig", "PipelineConfig", "RedisConfig",
    "RetryConfig", "control_socket_of", "load_config", "mask_url", "masked",
]

DEFAULT_PATH = "/etc/sendd/sendd.toml"
DEFAULTS_SOURCE = "built-in defaults"
CONFIG_FILE_MAX = 1024 * 1024
_NEWLINE = b"\n"


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> Config:
    """Load, override and validate the configuration; raises ConfigError on any problem."""
    env = os.environ if env is None else env
    path, origin = _resolve_path(path, env)
    source = path or DEFAULTS_SOURCE
    tree = check_tree(_read_toml(path, origin) if path else {}, source)
    apply_env(tree, env)
    if database_url is not None:
        flag = Env(database_url, "--database-url")
        override(DatabaseConfig, "database", tree["database"], "url", flag)
    return build_config(tree, source)


def control_socket_of(path: str | None, env: Mapping[str, str] | None = None) -> str:
    """daemon.control_socket, read when the configuration as a whole cannot be: `sendd ctl`
    must reach a running daemon even while the file on disk is broken. The same order as
    load_config: the environment, then the file (if it is TOML at all), then the default."""
    env = os.environ if env is None else env
    if env.get("SENDD_DAEMON__CONTROL_SOCKET"):
        return env["SENDD_DAEMON__CONTROL_SOCKET"]
    try:
        path, origin = _resolve_path(path, env)
        daemon = _read_toml(path, origin).get("daemon") if path else None
    except ConfigError:
        daemon = None
    value = daemon.get("control_socket") if isinstance(daemon, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_CONTROL_SOCKET


def _resolve_path(path: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    if path is not None:
        return path, ""
    if env.get(ENV_CONFIG):
        return env[ENV_CONFIG], f" (from {ENV_CONFIG})"
    # Only the implicit default may be absent; a path someone asked for must exist.
    return (DEFAULT_PATH, "") if os.path.exists(DEFAULT_PATH) else (None, "")


def _read_toml(path: str, origin: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_MAX + 1)  # bounded: --config /dev/zero must end
    except FileNotFoundError:
        raise ConfigError(f'config file "{path}"{origin} does not exist') from None
    except OSError as e:
        raise ConfigError(f'cannot read config file "{path}"{origin}: {why(e)}') from None
    if len(data) > CONFIG_FILE_MAX:
        raise ConfigError(f'config file "{path}"{origin} is larger than '
                          f"{CONFIG_FILE_MAX // 1024 // 1024} MiB")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {_with_line(str(e), data)}") from None


def _with_line(message: str, data: bytes) -> str:
    # tomllib says "(at line N, column M)", except for "(at end of document)": add the line there.
    if "line" in message:
        return message
    return f"{message} (line {data.count(_NEWLINE) + 1})"
