"""SMS segment counting (GSM 03.38 / UCS-2), for billing and credit checks.

Providers bill per segment, so the count must match theirs exactly, including the two cases a
naive ``ceil(length / per_segment)`` gets wrong: a GSM-7 escape pair (extension character) and
a UTF-16 surrogate pair (emoji) are never split across two segments, so a segment may carry one
septet or code unit less than its nominal capacity.
"""

from __future__ import annotations

from collections.abc import Iterable

# GSM 03.38 default alphabet. ESC (0x1B) is left out on purpose: it is the escape prefix, not a
# character a message can contain. 0x09 is the capital C-cedilla, as in the standard.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each costs two septets (ESC + code).
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

GSM7_SINGLE = 160  # septets in a single-part message
GSM7_PART = 153  # septets per part once a user data header (UDH) is needed
UCS2_SINGLE = 70  # UTF-16 code units in a single-part message
UCS2_PART = 67  # UTF-16 code units per part with UDH


def encoding(text: str) -> str:
    """``"gsm7"`` if the text fits the GSM 03.38 alphabet (with extensions), else ``"ucs2"``."""
    for ch in text:
        if ch not in GSM7_BASIC and ch not in GSM7_EXTENSION:
            return "ucs2"
    return "gsm7"


def count_segments(text: str) -> int:
    """Number of SMS segments the text is sent (and billed) as; empty text is one segment."""
    if encoding(text) == "gsm7":
        return _count(map(_septets, text), GSM7_SINGLE, GSM7_PART)
    return _count(map(_code_units, text), UCS2_SINGLE, UCS2_PART)


def _septets(ch: str) -> int:
    return 2 if ch in GSM7_EXTENSION else 1


def _code_units(ch: str) -> int:
    # Characters outside the BMP become a surrogate pair in UTF-16.
    return 2 if ord(ch) > 0xFFFF else 1


def _count(costs: Iterable[int], single: int, part: int) -> int:
    """Pack costs greedily into parts; an indivisible pair that does not fit starts a new part."""
    sizes = list(costs)
    if sum(sizes) <= single:
        return 1
    parts, used = 1, 0
    for size in sizes:
        if used + size > part:
            parts, used = parts + 1, 0
        used += size
    return parts
