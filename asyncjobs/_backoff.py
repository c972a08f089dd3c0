"""Retry backoff: exponential with full jitter. Pure maths, no I/O, no clock."""

from __future__ import annotations

import random


def backoff_cap(attempt: int, *, base: float, maximum: float) -> float:
    """The upper bound of the delay before retry number ``attempt`` (1-based).

    ``base * 2**(attempt-1)``, capped at ``maximum``.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    # 2**1100 overflows float; the cap is reached long before that.
    exponent = min(attempt - 1, 1000)
    return float(min(maximum, base * 2.0**exponent))


def backoff_delay(
    attempt: int, *, base: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Full jitter: a uniform draw in ``[0, backoff_cap(attempt)]``.

    Full jitter spreads retries of jobs that failed together (an outage) so they
    do not return together (see the AWS architecture blog on backoff and jitter).
    """
    cap = backoff_cap(attempt, base=base, maximum=maximum)
    return (rng or random).uniform(0.0, cap)
