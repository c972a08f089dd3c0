"""Rate strings and token-bucket arithmetic (asyncjobs._ratelimit: pure, no clock)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from asyncjobs import ConfigurationError, RateLimit
from asyncjobs._ratelimit import (
    BucketState,
    Limiter,
    bounded,
    full,
    next_token_at,
    parse_rate,
    refill,
    take,
)


@pytest.mark.parametrize(
    ("text", "rate", "per"),
    [
        ("10/s", 10, 1.0),
        ("100/m", 100, 60.0),
        ("5/h", 5, 3600.0),
        ("1000/d", 1000, 86400.0),
        ("1/second", 1, 1.0),
        ("30/minute", 30, 60.0),
        ("20/30s", 20, 30.0),
        (" 7 / 2h ", 7, 7200.0),
        ("3/S", 3, 1.0),
    ],
)
def test_parse_rate_reads_count_and_period(text: str, rate: int, per: float) -> None:
    limit = parse_rate(text)
    assert (limit.rate, limit.per) == (rate, per)


def test_burst_defaults_to_the_count() -> None:
    assert parse_rate("10/s").capacity == 10
    assert parse_rate("100/m").capacity == 100
    assert RateLimit(rate=100, per=60, burst=20).capacity == 20
    assert RateLimit(rate=0.5).capacity == 1  # never less than one whole job


def test_a_rate_limit_period_may_be_a_timedelta() -> None:
    """Durations are seconds or a timedelta everywhere else (delay, every, timeout)."""
    hourly = RateLimit(rate=100, per=timedelta(hours=1), burst=5)
    assert hourly == RateLimit(rate=100, per=3600, burst=5)
    assert hourly.per_second == pytest.approx(100 / 3600)
    with pytest.raises(ConfigurationError, match="RateLimit per"):
        RateLimit(rate=1, per=timedelta(0))


def test_parse_rate_returns_a_rate_limit_unchanged() -> None:
    limit = RateLimit(rate=100, per=60, burst=20)
    assert parse_rate(limit) is limit
    assert limit.per_second == pytest.approx(100 / 60)


@pytest.mark.parametrize(
    "bad",
    ["", "10", "10/", "/s", "ten/s", "10/fortnight", "0/s", "-1/s", "1.5/s", "10/0s", "10/s/s"],
)
def test_bad_rate_strings_raise_configuration_error_naming_the_value(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="rate limit") as caught:
        parse_rate(bad)
    assert repr(bad) in str(caught.value)
    assert "'10/s'" in str(caught.value)  # the message shows the accepted form


@pytest.mark.parametrize("bad", [10, None, 1.5, ["10/s"]])
def test_rate_of_the_wrong_type_is_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="string or a RateLimit"):
        parse_rate(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0},
        {"rate": -1},
        {"rate": float("inf")},
        {"rate": 10, "per": 0},
        {"rate": 10, "burst": 0},
        {"rate": 10, "burst": 2.5},
        {"rate": True},
    ],
)
def test_invalid_rate_limit_values_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="RateLimit"):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_a_new_bucket_is_full_and_allows_a_burst_then_refuses() -> None:
    limit = parse_rate("10/s")
    state = full(limit, 1000.0)
    for _ in range(10):
        taken = take(limit, state, 1000.0)
        assert taken is not None
        state = taken
    assert take(limit, state, 1000.0) is None


def test_tokens_come_back_at_the_rate_and_are_capped_at_the_burst() -> None:
    limit = parse_rate("10/s")
    empty = BucketState(0.0, 1000.0)
    assert refill(limit, empty, 1000.05).tokens == pytest.approx(0.5)
    assert take(limit, empty, 1000.05) is None
    assert take(limit, empty, 1000.1) is not None
    assert refill(limit, empty, 1100.0).tokens == 10  # capped, however long it rested


def test_next_token_at_is_when_a_whole_token_is_back() -> None:
    limit = RateLimit(rate=1, per=2)  # one every two seconds
    state = BucketState(0.25, 1000.0)
    assert next_token_at(limit, state, 1000.0) == pytest.approx(1001.5)
    assert next_token_at(limit, state, 1001.0) == pytest.approx(1001.5)
    assert next_token_at(limit, state, 1002.0) == 1002.0  # already has one
    at = next_token_at(limit, state, 1000.0)
    assert take(limit, state, at) is not None  # float drift never leaves it a hair short


def test_a_clock_behind_the_bucket_mints_no_tokens() -> None:
    limit = parse_rate("10/s")  # refills in 1 s
    state = BucketState(0.0, 1000.0)
    assert refill(limit, state, 999.5) == BucketState(0.0, 1000.0)
    assert next_token_at(limit, state, 999.5) == pytest.approx(1000.1)
    assert take(limit, state, 999.5) is None


def test_a_bucket_counted_further_ahead_than_a_refill_waits_one_refill_at_most() -> None:
    """A clock set back an hour (or a host an hour behind the one that counted the
    bucket) waits no longer than the bucket takes to refill, not the hour."""
    limit = RateLimit(rate=10, per=1, burst=5)  # refills in 0.5 s
    state = BucketState(0.0, 1000.0)
    assert refill(limit, state, 990.0) == BucketState(0.0, 990.5)
    assert next_token_at(limit, state, 990.0) == pytest.approx(990.6)
    assert refill(limit, BucketState(3.0, 1000.0), 990.0).tokens == 3.0
    trusted = bounded(limit, state, 990.0)  # as the store writes it back
    assert trusted == BucketState(0.0, 990.5)
    assert take(limit, trusted, 990.6) is not None
    assert bounded(limit, trusted, 990.1) is trusted  # within a refill: as it is


def test_limiter_key_is_computed_from_the_job_arguments() -> None:
    limiter = Limiter(
        name="per_domain",
        limit=parse_rate("5/s"),
        key=lambda address, **kw: address.split("@")[1],
    )
    assert limiter.key_for(("a@example.com",), {}) == "example.com"
    assert Limiter(name="n", limit=parse_rate("5/s")).key_for((1,), {}) is None
    numeric = Limiter(name="n", limit=parse_rate("5/s"), key=lambda customer: customer)
    assert numeric.key_for((42,), {}) == "42"
    bad = Limiter(name="n", limit=parse_rate("5/s"), key=lambda customer: [customer])
    with pytest.raises(ConfigurationError, match="must return a string"):
        bad.key_for((42,), {})
