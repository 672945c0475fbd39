"""Masking: the configuration as plain data with every secret replaced by ***, and URLs with
their passwords hidden (for logs too)."""

import re
from dataclasses import fields
from typing import Any

from sendd.config.model import SECTIONS, Config

MASK = "***"


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as plain JSON-able data, every secret replaced by ***."""
    out: dict[str, Any] = {"source": config.source}
    for name in SECTIONS:
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
