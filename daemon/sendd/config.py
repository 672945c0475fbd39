"""Configuration: a TOML file, then SENDD_<SECTION>__<KEY> environment overrides, then CLI flags.

Everything is validated at load so a bad setting stops the daemon at start with one line naming
the key, instead of failing later in an actor. Secrets (the database/redis URL password, provider
credentials) may come from `<key>_file` paths and never appear in errors, reprs or `masked()`.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_PATH = "/etc/sendd/sendd.toml"
DEFAULT_DATABASE_URL = "postgresql:///sendd"
DEFAULT_CONTROL_SOCKET = "/run/sendd/control.sock"
ENV_PREFIX = "SENDD_"
ENV_CONFIG = "SENDD_CONFIG"
MASK = "***"
DEFAULTS_SOURCE = "built-in defaults"
SECRET_FILE_MAX = 64 * 1024
CONFIG_FILE_MAX = 1024 * 1024
_NEWLINE = b"\n"


class ConfigError(Exception):
    """A configuration problem: one line that names the key and never contains a secret."""

    def __init__(self, message: str) -> None:
        # The CLI prints str(err) as its single stderr line, so multi-line text must not escape.
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


# --- validation rules, attached to dataclass fields as metadata --------------------------------


def _always(_value: Any) -> bool:
    return True


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Rule:
    expect: str  # completes "must be ...", so the message also says what IS accepted
    ok: Callable[[Any], bool] = _always
    norm: Callable[[Any], Any] = _same


_BASIC = {
    int: _Rule("an integer"),
    float: _Rule("a number"),
    bool: _Rule("true or false"),
    str: _Rule("a string"),
}


def _ints(lo: int, hi: int) -> _Rule:
    return _Rule(f"an integer between {lo} and {hi}", lambda v: lo <= v <= hi)


def _positive(hi: float) -> _Rule:
    return _Rule(f"a number > 0 and <= {hi:g}", lambda v: 0 < v <= hi)


def _nums(lo: float, hi: float) -> _Rule:
    return _Rule(f"a number between {lo:g} and {hi:g}", lambda v: lo <= v <= hi)


def _choice(*options: str) -> _Rule:
    expect = "one of " + ", ".join(f'"{o}"' for o in options)
    return _Rule(expect, lambda v: v in options, str.lower)


def _pattern(regex: str, expect: str) -> _Rule:
    compiled = re.compile(regex)
    return _Rule(expect, lambda v: compiled.fullmatch(v) is not None)


def _is_listen(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return False
    if host.startswith("["):  # IPv6 literal, e.g. [::1]:9464
        return host.endswith("]") and len(host) > 2
    return ":" not in host and not any(c.isspace() for c in host)


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        port_ok = parts.port != 0  # .port raises on a port that is not 1 to 65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok \
        and value.isprintable() and " " not in value


# One host of a postgresql:// URL (there may be several, comma-separated): a name or [IPv6],
# then an optional port. asyncpg raises a bare ValueError, not a connection error, on others.
_PG_HOST = re.compile(r"(\[[^\[\]]*\]|[^\[\]:]*)(?::([0-9]{1,5}))?")


def _is_pg_url(value: str) -> bool:
    if not value.startswith(("postgresql://", "postgres://")) or not value.isprintable():
        return False
    if "\x00" in unquote(value):  # a %00 reaches the resolver as a NUL
        return False
    try:
        netloc = urlsplit(value).netloc
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        return False
    hosts = netloc.rpartition("@")[2].split(",")
    return all(_is_pg_host(host) for host in hosts)


def _is_pg_host(host: str) -> bool:
    match = _PG_HOST.fullmatch(host)
    return match is not None and (match[2] is None or 1 <= int(match[2]) <= 65535)


_SECRET_TEXT = _Rule("a single line of printable text", str.isprintable)
_LISTEN = _Rule('"host:port" (e.g. "127.0.0.1:9464")', _is_listen)
_SOCKET = _Rule(  # AF_UNIX paths are limited to 108 bytes including the NUL
    "a socket path of 1 to 107 bytes", lambda v: 0 < len(v.encode()) <= 107
)
_PG_URL = _Rule("a postgresql:// URL whose ports are 1 to 65535, like "
                "postgresql://sendd@localhost:5432/sendd", _is_pg_url)
_REDIS_URL = _Rule(
    "empty or a redis://, rediss:// or unix:// URL",
    lambda v: v == "" or v.startswith(("redis://", "rediss://", "unix://")),
)
# Trailing slashes are dropped so adapters can always append "/api/...".
_BASE_URL = _Rule("an http:// or https:// URL with a host (and a port of 1 to 65535)",
                  _is_http_url, lambda v: v.rstrip("/"))


def _key(default: Any = MISSING, rule: _Rule | None = None, *, secret: str = "",
         url: bool = False) -> Any:
    """A config field; secret is "value" (hide all) or "url" (a secret URL: may come from a
    <key>_file, its password hidden). A url is shown with its userinfo hidden, secret or not."""
    return field(default=default, repr=not secret,
                 metadata={"rule": rule, "secret": secret, "url": url or secret == "url"})


# --- the configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = _key(rule=_PG_URL, secret="url")
    pool_size: int = _key(4, _ints(1, 1000))
    connect_timeout: float = _key(10.0, _positive(300))


@dataclass(frozen=True)
class DaemonConfig:
    instance_id: str = _key(  # empty: derived at start from hostname + pid
        "", _pattern(r"[A-Za-z0-9_.:@-]{0,64}", "up to 64 of the characters A-Z a-z 0-9 _.:@-")
    )
    control_socket: str = _key(DEFAULT_CONTROL_SOCKET, _SOCKET)
    http_listen: str = _key("127.0.0.1:9464", _LISTEN)
    stop_timeout: float = _key(30.0, _positive(3600))
    stall_seconds: float = _key(60.0, _positive(3600))  # an actor busy this long is wedged
    log_level: str = _key("info", _choice("debug", "info", "warning", "error"))
    log_format: str = _key("json", _choice("json", "console"))


@dataclass(frozen=True)
class PipelineConfig:
    claim_chunk: int = _key(1000, _ints(1, 100_000))
    poll_interval: float = _key(0.5, _positive(60))
    claim_capacity: int = _key(4, _ints(1, 100_000))  # chunks, poller -> batcher
    batch_capacity: int = _key(8, _ints(1, 100_000))  # batches, batcher -> senders
    result_capacity: int = _key(64, _ints(1, 100_000))  # batch results, senders -> writer
    linger_ms: int = _key(20, _ints(0, 10_000))
    senders: int = _key(8, _ints(1, 256))
    writer_flush_ms: int = _key(20, _ints(0, 10_000))
    writer_max_results: int = _key(5000, _ints(1, 1_000_000))
    lease_seconds: float = _key(30.0, _nums(1, 3600))
    settle_seconds: float = _key(60.0, _positive(86_400))  # lookups before a message is unknown


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = _key(5, _ints(1, 100))
    base_delay: float = _key(3.0, _positive(86_400))
    max_delay: float = _key(600.0, _positive(86_400))
    jitter: float = _key(0.2, _nums(0, 1))
    # A provider that cannot be reached is probed with backoff up to this many seconds apart.
    probe_cap: float = _key(60.0, _positive(3600))
    # An account unreachable this long pauses the campaigns waiting for it (with the reason).
    provider_down_pause: float = _key(3600.0, _positive(30 * 86_400))


@dataclass(frozen=True)
class RedisConfig:
    url: str = _key("", _REDIS_URL, secret="url")  # empty: in-process rate governor only


@dataclass(frozen=True)
class AccountConfig:
    name: str
    kind: str = _key(rule=_choice("mitto", "whatsapp"))
    base_url: str = _key(rule=_BASE_URL, url=True)
    api_key: str = _key("", _SECRET_TEXT, secret="value")  # mitto
    token: str = _key("", _SECRET_TEXT, secret="value")  # whatsapp
    phone_number_id: str = _key("", _pattern(r"[A-Za-z0-9_-]*", "letters, digits, _ or -"))
    api_version: str = _key("v21.0", _pattern(r"v\d+(\.\d+)?", 'a version like "v21.0"'))
    app_secret: str = _key("", _SECRET_TEXT, secret="value")
    verify_token: str = _key("", _SECRET_TEXT, secret="value")
    max_batch: int = _key(1000, _ints(1, 1000))  # forced to 1 for whatsapp
    msgs_per_s: int = _key(0, _ints(0, 1_000_000))  # 0: unlimited
    reqs_per_s: int = _key(0, _ints(0, 1_000_000))  # 0: unlimited
    timeout: float = _key(10.0, _positive(600))
    single: bool = False  # use the one-message endpoint
    idempotent_references: bool = False


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    daemon: DaemonConfig
    pipeline: PipelineConfig
    retry: RetryConfig
    redis: RedisConfig
    accounts: dict[str, AccountConfig]
    source: str  # the file it came from, or "built-in defaults"


_SECTIONS: dict[str, type] = {
    "database": DatabaseConfig,
    "daemon": DaemonConfig,
    "pipeline": PipelineConfig,
    "retry": RetryConfig,
    "redis": RedisConfig,
}
# The contract's own example is SENDD_PIPELINE__BATCH_SIZE; it names the claim chunk.
_ALIASES: dict[type, dict[str, str]] = {PipelineConfig: {"batch_size": "claim_chunk"}}
_ACCOUNT_NAME = re.compile(r"[a-z0-9_-]+")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _Env(str):
    """A string from outside the TOML file: parsed to the field's type, and its origin named."""

    origin: str

    def __new__(cls, value: str, origin: str) -> "_Env":
        self = super().__new__(cls, value)
        self.origin = origin
        return self


# --- loading ---------------------------------------------------------------------------------


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
    tree = _check_tree(_read_toml(path, origin) if path else {}, source)
    _apply_env(tree, env)
    if database_url is not None:
        flag = _Env(database_url, "--database-url")
        _override(DatabaseConfig, "database", tree["database"], "url", flag)
    return _build_config(tree, source)


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
        raise ConfigError(f'cannot read config file "{path}"{origin}: {_why(e)}') from None
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


def _why(error: OSError) -> str:
    # strerror only: str(error) may carry more than we want to echo.
    return error.strerror or type(error).__name__


def _check_tree(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Split the TOML document into sections, rejecting anything unknown."""
    tree: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    tree["accounts"] = {}
    for name, value in raw.items():
        if name not in tree:
            raise _unknown("", name, f"in {source}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a table ([{name}]) in {source}")
        if name == "accounts":
            tree["accounts"] = {n: _check_account(n, v, source) for n, v in value.items()}
        else:
            tree[name] = _check_keys(_SECTIONS[name], name, value, source)
    return tree


def _check_account(name: str, value: Any, source: str) -> dict[str, Any]:
    _check_account_name(name, f"accounts.{name}")
    if not isinstance(value, dict):
        raise ConfigError(f"accounts.{name}: must be a table ([accounts.{name}]) in {source}")
    return _check_keys(AccountConfig, f"accounts.{name}", value, source)


def _check_account_name(name: str, label: str) -> None:
    if not _ACCOUNT_NAME.fullmatch(name):
        raise ConfigError(f"{label}: account names must be made of a-z 0-9 _ -, got {_show(name)}")


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
    return names | files | set(_ALIASES.get(cls, {}))


def _unknown(prefix: str, key: str, where: str) -> ConfigError:
    label = f"{prefix}.{key}" if prefix else key
    # The same key in another section is a surer guess than a similar spelling in this one.
    elsewhere = [f"{s}.{key}" for s in _owners(key) if prefix and s != prefix]
    match = elsewhere[:1] or difflib.get_close_matches(label, _suggestions(prefix, key), n=1)
    hint = f' (did you mean "{match[0]}"?)' if match else ""
    return ConfigError(f'unknown key "{label}" {where}{hint}')


def _suggestions(prefix: str, key: str) -> list[str]:
    if not prefix:  # top level: a section name, or a key that belongs inside a section
        return [*_SECTIONS, "accounts", *(f"{s}.{key}" for s in _owners(key))]
    if prefix.startswith("accounts."):
        return [f"{prefix}.{k}" for k in _known_keys(AccountConfig)]
    own = [f"{prefix}.{k}" for k in _known_keys(_SECTIONS[prefix])]
    return own + [f"{s}.{key}" for s in _owners(key)]


def _owners(key: str) -> list[str]:
    return [name for name, cls in _SECTIONS.items() if key in _known_keys(cls)]


# --- environment overrides -------------------------------------------------------------------


def _apply_env(tree: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    # Sorted so that, with conflicting variables, the error names the same pair every time.
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        section, account, key = _env_target(var)
        if account is None:
            _override(_SECTIONS[section], section, tree[section], key, _Env(env[var], var))
        else:
            table = tree["accounts"].setdefault(account, {})
            _override(AccountConfig, f"accounts.{account}", table, key, _Env(env[var], var))


def _env_target(var: str) -> tuple[str, str | None, str]:
    """Map SENDD_<SECTION>__<KEY> / SENDD_ACCOUNTS__<NAME>__<KEY> to (section, account, key)."""
    parts = var[len(ENV_PREFIX) :].lower().split("__")
    where = f"in environment variable {var}"
    if parts[0] != "accounts" and parts[0] not in _SECTIONS:
        raise _unknown("", parts[0], where)
    if parts[0] == "accounts":
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"{var}: expected the form SENDD_ACCOUNTS__<NAME>__<KEY>")
        _check_account_name(parts[1], var)
        _check_key(AccountConfig, f"accounts.{parts[1]}", parts[2], where)
        return "accounts", parts[1], parts[2]
    if len(parts) != 2 or not parts[1]:
        raise ConfigError(f"{var}: expected the form SENDD_<SECTION>__<KEY>")
    _check_key(_SECTIONS[parts[0]], parts[0], parts[1], where)
    return parts[0], None, parts[1]


def _override(cls: type, prefix: str, table: dict[str, Any], key: str, value: _Env) -> None:
    """Set key from outside the file; it replaces the file's other spelling of the same setting."""
    for other in _alternatives(cls, key):
        if isinstance(table.get(other), _Env):
            both = f"{table[other].origin} and {value.origin}"
            raise ConfigError(f"{prefix}.{key}: set only one of {both}")
        table.pop(other, None)
    table[key] = value


def _alternatives(cls: type, key: str) -> list[str]:
    """Other keys that set the same field: `x` <-> `x_file` for secrets, and aliases."""
    secrets = {f.name for f in fields(cls) if f.metadata.get("secret")}
    aliases = _ALIASES.get(cls, {})
    found = [f"{key}_file"] if key in secrets else []
    if key.endswith("_file") and key[:-5] in secrets:
        found.append(key[:-5])
    found += [alias for alias, target in aliases.items() if target == key]
    if key in aliases:
        found.append(aliases[key])
    return found


# --- building and checking the dataclasses ---------------------------------------------------


def _build_config(tree: dict[str, dict[str, Any]], source: str) -> Config:
    database = tree["database"]
    if "url" not in database and "url_file" not in database:
        database["url"] = DEFAULT_DATABASE_URL
    sections = {name: _build(cls, tree[name], name) for name, cls in _SECTIONS.items()}
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
    aliases = _ALIASES.get(cls, {})
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
    return f"{key} (from {value.origin})" if isinstance(value, _Env) else key


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
        raise ConfigError(f'{label}: cannot read "{path}": {_why(e)}') from None
    if len(data) > SECRET_FILE_MAX:
        raise ConfigError(f'{label}: "{path}" is larger than {SECRET_FILE_MAX // 1024} KiB; '
                          "a secret file holds only the secret")
    return data


def _coerce(f: dataclasses.Field, label: str, value: Any) -> Any:
    rule = f.metadata.get("rule") or _BASIC[f.type]
    try:
        parsed = rule.norm(_parse(value, f.type))
        ok = rule.ok(parsed)
    except (ValueError, TypeError):
        ok = False
    if ok:
        return parsed
    shown = "" if f.metadata.get("secret") else f", got {_show(_masked_value(f, value))}"
    raise ConfigError(f"{label}: must be {rule.expect}{shown}")


def _masked_value(f: dataclasses.Field, value: Any) -> Any:
    if f.metadata.get("url") and isinstance(value, str):
        return mask_url(str(value))
    return value


def _parse(value: Any, typ: type) -> Any:
    if isinstance(value, _Env):
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


def _show(value: Any) -> str:
    # JSON quoting keeps the message on one line and shows strings as strings ("8" vs 8).
    text = json.dumps(str(value) if isinstance(value, _Env) else value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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


# --- masking ---------------------------------------------------------------------------------


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as plain JSON-able data, every secret replaced by ***."""
    out: dict[str, Any] = {"source": config.source}
    for name in _SECTIONS:
        out[name] = _masked_section(getattr(config, name))
    out["accounts"] = {n: _masked_section(a) for n, a in config.accounts.items()}
    return out


def _masked_section(section: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("url"):
            value = mask_url(value)
        elif f.metadata.get("secret") and value:  # an empty secret says "not set", no more
            value = MASK
        out[f.name] = value
    return out


def mask_url(url: str) -> str:
    """The URL with its password (userinfo or ?password=) replaced by ***; for logs too. The
    userinfo of an http(s) URL is hidden whole: a lone name there is usually a token."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK if url else url  # not a URL we understand: hide all of it
    head, q, query = rest.partition("?")
    if "@" in query and "@" not in head:  # perhaps a password with a "?" in it: hide it too
        head, q, query = rest, "", ""
    # The last @ before the query ends the userinfo, so an unescaped @ in a password stays hidden.
    userinfo, at, hostpath = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.partition(':')[0]}:{MASK}@{hostpath}"
    elif at and scheme.lower() in ("http", "https"):
        head = f"{MASK}@{hostpath}"
    shown = f"{scheme}://{head}{q}{query}"
    return re.sub(r"([?&](?:ssl)?password=)[^&#]*", rf"\1{MASK}", shown, flags=re.I)
