"""What a provider sends, made safe to store.

A provider's answer is input from outside, like a request body: valid JSON can still carry
strings a PostgreSQL `text` column refuses (NUL), characters that break one-line logs, or
megabytes where a few words were expected. Every string an adapter takes from an answer goes
through one of these two functions before it becomes part of an outcome, so that a provider can
never make the writer's statement fail (and hold up every other outcome of its flush).
"""

from __future__ import annotations

ID_LIMIT = 128  # characters of a message or bulk id
CODE_LIMIT = 64  # characters of an error code (and a lookup's status word)
TEXT_LIMIT = 500  # characters of an error text


def provider_id(value: object) -> str | None:
    """A provider's message or bulk id as it is, or None when it is not a sane id: 1 to
    ID_LIMIT printable characters, no spaces (a number counts as its digits).

    Never cleaned up: an id with a character taken out would be some other message's id."""
    if type(value) is int:
        value = str(value)
    if type(value) is str and 0 < len(value) <= ID_LIMIT and value.isprintable() \
            and " " not in value:
        return value
    return None


def provider_text(value: object, limit: int = TEXT_LIMIT) -> str | None:
    """A provider's free text (an error message, an error code) in at most `limit` printable
    characters: whitespace of any kind becomes one space, other non-printable characters (NUL,
    controls, lone surrogates, format marks) go; None when nothing is left.

    Numbers count as their digits; anything else that is not a string (an object, a list,
    true) is None: it is no text."""
    if type(value) in (int, float):
        value = str(value)
    if type(value) is not str:
        return None
    if len(value) <= limit and value.isprintable():
        return value or None  # the common case, as it is
    # Only the start can survive the cut: do not clean megabytes for `limit` characters.
    kept = "".join(c for c in value[: 4 * limit] if c.isprintable() or c.isspace())
    return " ".join(kept.split())[:limit].rstrip() or None
