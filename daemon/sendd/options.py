"""Value types for command-line options. A bad value is refused where it is read, so the error
is argparse's, naming the option ("argument --rate: must be ..."), before anything reaches the
database (which would only say "query argument $2")."""

from __future__ import annotations

import argparse
from collections.abc import Callable

BIGINT_MAX = 2**63 - 1  # PostgreSQL bigint: campaign ids, credits
MAX_RATE = 1_000_000  # messages or requests a second, as accounts.*.msgs_per_s allows
MAX_NAME = 200  # tenant, account and campaign names
MAX_WEIGHT = 1000  # a tenant's weight (sendd.tenant.weight's CHECK)


def integer_between(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from lo to hi, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also a number of more than 4,300 digits
            raise argparse.ArgumentTypeError(f"must be an integer, got {_shown(text)}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {lo} to {hi}, got {_shown(text)}")
        return value

    return parse


def text(*, empty: bool = False, printable: bool = False,
         max_chars: int | None = None) -> Callable[[str], str]:
    """UTF-8 text (a shell hands Python other bytes as lone surrogates, which PostgreSQL
    refuses), non-empty unless `empty`, only printable characters if `printable`."""

    def parse(value: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError("not UTF-8 text") from None
        if not value.strip() and not empty:
            raise argparse.ArgumentTypeError("must not be empty")
        if printable and not value.isprintable():
            raise argparse.ArgumentTypeError(
                f"must be printable characters only, got {_shown(value)}")
        if max_chars is not None and len(value) > max_chars:
            raise argparse.ArgumentTypeError(f"must be at most {max_chars} characters")
        return value

    return parse


def short_name() -> Callable[[str], str]:
    """A tenant or account name: 1 to MAX_NAME printable characters."""
    return text(printable=True, max_chars=MAX_NAME)


def _shown(value: str) -> str:
    # repr keeps the message on one line; a long value is cut.
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
