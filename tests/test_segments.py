import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendd.core.segments import GSM7_BASIC, GSM7_EXTENSION, count_segments, encoding

BASIC = "".join(sorted(GSM7_BASIC))
EXTENSION = "".join(sorted(GSM7_EXTENSION))
EMOJI = "\U0001f600"
# A mix that exercises every branch: basic, extension, BMP non-GSM, astral (surrogate pair).
MIXED = st.text(alphabet=st.sampled_from(list("aZ0 @\n" + EXTENSION + "ąж中" + EMOJI)))


def test_encoding() -> None:
    assert encoding("") == "gsm7"
    assert encoding("Hello @ £5, Ünïcode? no: Ç") == "ucs2"  # ï is not GSM
    assert encoding("Hello @ £5 Ä{}[]~|^\\€\f") == "gsm7"
    assert encoding("ç") == "ucs2"  # only the capital is in the table
    assert encoding("\x1b") == "ucs2"  # the escape prefix is not a character
    assert encoding(EMOJI) == "ucs2"
    assert encoding(BASIC + EXTENSION) == "gsm7"


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("a" * 159 + "€", 2),  # 161 septets
        ("a" * 158 + "€", 1),  # 160 septets
        ("€" * 80, 1),
        ("€" * 81, 2),
        # 306 septets, but the escape pair cannot straddle parts 1 and 2.
        ("a" * 152 + "{" + "a" * 152, 3),
        ("a" * 151 + "{" + "a" * 153, 2),
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        (EMOJI * 35, 1),  # 70 code units
        ("ж" * 69 + EMOJI, 2),  # 71 code units
        # 134 code units, but the surrogate pair cannot straddle parts 1 and 2.
        ("x" * 66 + EMOJI + "x" * 65 + "ж", 3),
        ("x" * 65 + EMOJI + "x" * 67, 2),
    ],
)
def test_boundaries(text: str, segments: int) -> None:
    assert count_segments(text) == segments


@settings(max_examples=300, deadline=None)
@given(MIXED, MIXED)
def test_appending_never_lowers_the_count(text: str, suffix: str) -> None:
    assert count_segments(text + suffix) >= count_segments(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(BASIC), max_size=1000))
def test_basic_gsm7_matches_the_formula(text: str) -> None:
    n = len(text)
    assert count_segments(text) == (1 if n <= 160 else math.ceil(n / 153))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x400, max_codepoint=0x4FF), max_size=800))
def test_bmp_ucs2_matches_the_formula(text: str) -> None:
    n = len(text)
    assert count_segments(text) == (1 if n <= 70 else math.ceil(n / 67))


@settings(max_examples=200, deadline=None)
@given(MIXED)
def test_count_is_at_least_the_capacity_bound(text: str) -> None:
    if encoding(text) == "gsm7":
        size, single, part = sum(2 if c in GSM7_EXTENSION else 1 for c in text), 160, 153
    else:
        size, single, part = len(text.encode("utf-16-le")) // 2, 70, 67
    expected_min = 1 if size <= single else math.ceil(size / part)
    # Pairs never straddle, so at most one unit per part is lost.
    assert expected_min <= count_segments(text) <= max(1, math.ceil(size / (part - 1)))
