"""Retry delays: exponential backoff with a cap and multiplicative jitter.

Jitter spreads the retries of a batch that failed together (a provider outage fails thousands
of messages in the same second), so they do not all come back in the same instant.
"""

from __future__ import annotations

import random

# 2.0 ** 1024 overflows a float; any exponent this large is far past every sensible cap anyway.
_MAX_EXPONENT = 1000


def retry_delay(
    attempt: int,
    *,
    base: float = 3.0,
    cap: float = 600.0,
    jitter: float = 0.2,
    rand: random.Random | None = None,
) -> float:
    """Seconds to wait before the next try, after ``attempt`` failed attempts (``attempt >= 1``).

    The delay is ``min(cap, base * 2 ** (attempt - 1))`` scaled by a uniform factor in
    ``[1 - jitter, 1 + jitter]``; pass ``rand`` for reproducible results.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    nominal = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    source = rand if rand is not None else random
    return nominal * source.uniform(1.0 - jitter, 1.0 + jitter)
