"""Whatever JSON a provider sends, what sendd keeps of its strings fits PostgreSQL text and the
bounds (sendd.providers.clean); checked by a real PostgreSQL, not by a list of bad characters."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import query
from sendd.providers.clean import CODE_LIMIT, ID_LIMIT, TEXT_LIMIT, provider_id, provider_text

# Every code point, lone surrogates and NUL included (orjson refuses lone surrogates, other JSON
# readers do not), and text around the bounds' lengths.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=3 * TEXT_LIMIT)
NASTY = st.sampled_from(["\x00", "\n", "\r\n", "\t", "\x1b[31m", "\u2028", "\ufeff", "\ud800",
                         "\u200e", "\x85", " ", "\xa0", "é", "😀"])
STRINGS = ANY_TEXT | st.lists(ANY_TEXT | NASTY, max_size=60).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | STRINGS,
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
LIMITS = st.sampled_from([1, 2, CODE_LIMIT, TEXT_LIMIT])


def _storable(text: str | None, limit: int) -> bool:
    if text is None:
        return True
    text.encode("utf-8")  # no lone surrogate: asyncpg could not even send it
    return 0 < len(text) <= limit and text.isprintable() and text == text.rstrip()


@given(value=JSON, limit=LIMITS)
def test_provider_text_is_printable_bounded_and_stable(value: Any, limit: int) -> None:
    text = provider_text(value, limit)
    assert _storable(text, limit)
    assert provider_text(text, limit) == text  # cleaning what is clean changes nothing


@given(text=STRINGS, limit=LIMITS)
def test_clean_text_within_the_bound_is_kept_as_it_is(text: str, limit: int) -> None:
    if text.isprintable() and 0 < len(text) <= limit:
        assert provider_text(text, limit) == text


@given(value=JSON)
def test_provider_id_is_the_id_itself_or_none(value: Any) -> None:
    kept = provider_id(value)
    if kept is not None:
        assert _storable(kept, ID_LIMIT) and " " not in kept
        assert kept == (str(value) if type(value) is int else value)  # never altered


def test_numbers_are_their_digits() -> None:
    assert provider_id(42) == "42" and provider_text(42) == "42"
    assert provider_text(1.5) == "1.5" and provider_id(1.5) is None
    assert provider_text(math.inf, CODE_LIMIT) == "inf"
    assert provider_text(True) is None and provider_id(False) is None


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(JSON, min_size=1, max_size=20))
def test_postgresql_stores_whatever_is_kept(database_url: str, values: list[Any]) -> None:
    texts = [provider_text(v) for v in values] + [provider_text(v, CODE_LIMIT) for v in values]
    ids = [provider_id(v) for v in values]
    # Sent to the server as text parameters and read back: it refuses NUL and bad UTF-8.
    [row] = query(database_url, "SELECT $1::text[] AS texts, $2::text[] AS ids", texts, ids)
    assert (row["texts"], row["ids"]) == (texts, ids)
