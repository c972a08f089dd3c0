"""Retry backoff: exponential bound, cap, full jitter."""

from __future__ import annotations

import random

import pytest

from asyncjobs._backoff import backoff_cap, backoff_delay


@pytest.mark.parametrize(
    ("attempt", "cap"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (50, 30.0), (5000, 30.0)],
)
def test_cap_is_base_times_two_to_the_attempt_minus_one_capped(attempt: int, cap: float) -> None:
    assert backoff_cap(attempt, base=2.0, maximum=30.0) == cap


def test_attempt_is_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_cap(0, base=1.0, maximum=10.0)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 8, 2000])
def test_delay_stays_within_zero_and_the_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    cap = backoff_cap(attempt, base=1.5, maximum=60.0)
    delays = [backoff_delay(attempt, base=1.5, maximum=60.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= cap for d in delays)


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    """Jobs that failed together must not come back together."""
    rng = random.Random(7)
    delays = [backoff_delay(4, base=1.0, maximum=100.0, rng=rng) for _ in range(4000)]
    cap = 8.0
    # Uniform over [0, cap]: every eighth of the range gets a fair share.
    buckets = [0] * 8
    for d in delays:
        buckets[min(int(d / cap * 8), 7)] += 1
    assert min(buckets) > 350
    assert len(set(delays)) > 3900


def test_zero_base_means_no_delay() -> None:
    assert backoff_delay(3, base=0.0, maximum=10.0) == 0.0
