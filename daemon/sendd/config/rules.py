"""What each configuration value must be: the rules attached to the dataclass fields
(sendd.config.model) as metadata, and the error that names the key of a value that breaks one."""

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit


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
class Rule:
    expect: str  # completes "must be ...", so the message also says what IS accepted
    ok: Callable[[Any], bool] = _always
    norm: Callable[[Any], Any] = _same


BASIC = {
    int: Rule("an integer"),
    float: Rule("a number"),
    bool: Rule("true or false"),
    str: Rule("a string"),
}


def ints(lo: int, hi: int) -> Rule:
    return Rule(f"an integer between {lo} and {hi}", lambda v: lo <= v <= hi)


def positive(hi: float) -> Rule:
    return Rule(f"a number > 0 and <= {hi:g}", lambda v: 0 < v <= hi)


def nums(lo: float, hi: float) -> Rule:
    return Rule(f"a number between {lo:g} and {hi:g}", lambda v: lo <= v <= hi)


def choice(*options: str) -> Rule:
    expect = "one of " + ", ".join(f'"{o}"' for o in options)
    return Rule(expect, lambda v: v in options, str.lower)


def pattern(regex: str, expect: str) -> Rule:
    compiled = re.compile(regex)
    return Rule(expect, lambda v: compiled.fullmatch(v) is not None)


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


SECRET_TEXT = Rule("a single line of printable text", str.isprintable)
LISTEN = Rule('"host:port" (e.g. "127.0.0.1:9464")', _is_listen)
SOCKET = Rule(  # AF_UNIX paths are limited to 108 bytes including the NUL
    "a socket path of 1 to 107 bytes", lambda v: 0 < len(v.encode()) <= 107
)
PG_URL = Rule("a postgresql:// URL whose ports are 1 to 65535, like "
                "postgresql://sendd@localhost:5432/sendd", _is_pg_url)
REDIS_URL = Rule(
    "empty or a redis://, rediss:// or unix:// URL",
    lambda v: v == "" or v.startswith(("redis://", "rediss://", "unix://")),
)
# Trailing slashes are dropped so adapters can always append "/api/...".
BASE_URL = Rule("an http:// or https:// URL with a host (and a port of 1 to 65535)",
                  _is_http_url, lambda v: v.rstrip("/"))


def setting(default: Any = MISSING, rule: Rule | None = None, *, secret: str = "",
         url: bool = False) -> Any:
    """A config field; secret is "value" (hide all) or "url" (a secret URL: may come from a
    <key>_file, its password hidden). A url is shown with its userinfo hidden, secret or not."""
    return field(default=default, repr=not secret,
                 metadata={"rule": rule, "secret": secret, "url": url or secret == "url"})
