"""Token-bucket rate limits: parsing ``"10/s"`` and the bucket arithmetic.

Pure maths, no I/O and no clock: the store keeps each bucket's state (tokens and
when they were counted) and calls these functions with the ``now`` it is given.

A bucket holds at most ``capacity`` tokens (the burst, by default the count of the
rate, so ``"10/s"`` allows 10 at once) and gains ``rate / per`` tokens a second.
Claiming a job takes one token; a job that finds less than one stays queued.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asyncjobs._errors import ConfigurationError
from asyncjobs._settings import is_storable

_SLACK = 1e-6
"""Seconds of refill granted for float drift: epoch seconds near 2e9 carry about 2e-7 s
of rounding, so a bucket due a token "now" may count 0.9999998 of one."""

_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")

_HELP = (
    "write it as '<count>/<unit>' with unit s, m, h or d (e.g. '10/s', '100/m', '5/h', "
    "'1000/d', '20/30s'), or pass RateLimit(rate=..., per=..., burst=...)"
)


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"RateLimit {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(f"RateLimit {name} must be a finite number > 0, got {value!r}")
    return number


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class RateLimit:
    """``rate`` jobs per ``per`` seconds, with bursts of up to ``burst`` jobs.

    ``RateLimit(rate=100, per=60, burst=20)``: 100 a minute, at most 20 at once.
    ``per`` may be a ``timedelta`` too (kept as seconds).
    ``burst`` defaults to ``rate`` (at least 1), as ``"10/s"`` allows 10 at once.
    """

    rate: float
    per: float = 1.0
    burst: int | None = None

    def __init__(
        self, *, rate: float, per: float | timedelta = 1.0, burst: int | None = None
    ) -> None:
        if isinstance(per, timedelta):
            per = per.total_seconds()
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "per", per)
        object.__setattr__(self, "burst", burst)
        _positive(self.rate, "rate")
        _positive(self.per, "per")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)):
            raise ConfigurationError(f"RateLimit burst must be a whole number, got {burst!r}")
        if burst is not None and burst < 1:
            raise ConfigurationError(f"RateLimit burst must be >= 1, got {burst!r}")

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds: the burst."""
        return float(self.burst) if self.burst is not None else max(1.0, float(self.rate))

    @property
    def per_second(self) -> float:
        """Tokens gained per second."""
        return self.rate / self.per

    @property
    def refill_seconds(self) -> float:
        """Seconds the bucket takes to refill from empty."""
        return self.capacity / self.per_second

    def __str__(self) -> str:
        burst = "" if self.burst is None else f" burst {self.burst}"
        return f"{self.rate:g}/{self.per:g}s{burst}"


def parse_rate(value: object) -> RateLimit:
    """A ``RateLimit`` from ``"10/s"``-style text or a ``RateLimit`` (returned as is).

    Raises ``ConfigurationError`` naming the value and the accepted forms.
    """
    if isinstance(value, RateLimit):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(
            f"rate limit must be a string or a RateLimit, got {value!r}; {_HELP}"
        )
    match = _RATE.match(value.lower())
    if match is None:
        raise ConfigurationError(f"rate limit {value!r} is not understood; {_HELP}")
    count, multiple, unit = match.groups()
    if unit not in _UNITS:
        raise ConfigurationError(f"rate limit {value!r} has an unknown unit {unit!r}; {_HELP}")
    if int(count) < 1:
        raise ConfigurationError(f"rate limit {value!r} must allow at least 1 job; {_HELP}")
    per = _UNITS[unit] * (float(multiple) if multiple is not None else 1.0)
    if per <= 0:
        raise ConfigurationError(f"rate limit {value!r} has a zero period; {_HELP}")
    return RateLimit(rate=int(count), per=per)


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket's tokens as counted at ``updated_at`` (epoch seconds)."""

    tokens: float
    updated_at: float


def full(limit: RateLimit, now: float) -> BucketState:
    """A bucket never used before: full."""
    return BucketState(limit.capacity, now)


def refill(limit: RateLimit, state: BucketState, now: float) -> BucketState:
    """The bucket at ``now``: tokens gained since ``updated_at``, capped at the burst.

    A ``now`` earlier than ``updated_at`` (another process's clock runs ahead) adds
    nothing and keeps the later time, so a skew of up to a refill never mints tokens;
    an ``updated_at`` further ahead counts as a refill ahead (``bounded``).
    """
    state = bounded(limit, state, now)
    elapsed = max(0.0, now - state.updated_at)
    tokens = min(limit.capacity, state.tokens + elapsed * limit.per_second)
    return BucketState(tokens, max(now, state.updated_at))


def bounded(limit: RateLimit, state: BucketState, now: float) -> BucketState:
    """The bucket as ``now`` may trust it: counted at most one refill
    (``refill_seconds``) after ``now``. The store writes the bounded state back (see
    ``Admission.bucket``), or each claim would bound it anew from its own ``now``.

    A bucket counted later than ``now`` was counted by a clock ahead of this one: another
    host's, or this one's before it was set back. Trusted in full, an hour's lead held
    the bucket empty for the hour. Bounded at a refill, a token comes at most a refill
    late and at most a bucketful is held back. A skew under a refill (hosts under NTP
    are milliseconds apart) is still waited out, so it mints nothing; one over a refill
    mints at most a bucketful each time the host ahead counts after the host behind (as
    a forward jump of the clock always could), rather than a skew's worth each time, as
    taking ``now`` for a later ``updated_at`` would.
    """
    latest = now + limit.refill_seconds
    if state.updated_at <= latest:
        return state
    return BucketState(state.tokens, latest)


def has_token(limit: RateLimit, state: BucketState) -> bool:
    """Whether the (refilled) bucket holds a whole token, allowing for float drift."""
    return state.tokens + _SLACK * limit.per_second >= 1.0 - 1e-12


def take(limit: RateLimit, state: BucketState, now: float) -> BucketState | None:
    """Take one token at ``now``: the new state, or None when there is no token."""
    current = refill(limit, state, now)
    if not has_token(limit, current):
        return None
    return BucketState(max(0.0, current.tokens - 1.0), current.updated_at)


def next_token_at(limit: RateLimit, state: BucketState, now: float) -> float:
    """When the bucket next holds a whole token (``now`` if it already does)."""
    current = refill(limit, state, now)
    if has_token(limit, current):
        return now
    return current.updated_at + (1.0 - current.tokens) / limit.per_second


MAX_KEY_BYTES = 1000
"""The longest bucket key, in UTF-8 bytes. PostgreSQL indexes a bucket by its limiter's
name and its key, and refuses an index entry over about 2,700 bytes: the claim that
took the first token of a longer key failed, and with it every claim of the store."""


def is_bucket_key(key: str) -> bool:
    """Whether a bucket can be stored under ``key``: storable text of at most
    ``MAX_KEY_BYTES`` as UTF-8."""
    return is_storable(key) and (
        len(key) <= MAX_KEY_BYTES // 4 or len(key.encode()) <= MAX_KEY_BYTES
    )


KEY_RULE = (
    "a key must be text without NUL characters or lone surrogates, of at most "
    f"{MAX_KEY_BYTES} bytes as UTF-8 (key on a shorter value, or a hash of it)"
)

KeyFunction = Callable[..., Any]
"""Computes a bucket key from a job's arguments: ``key(*args, **kwargs)``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limiter:
    """A named rate limit shared by tasks (``jobs.limiter(name, rate, key=...)``).

    With ``key``, each distinct key (a customer, a domain) gets its own bucket of
    this rate; the key is computed from the job's arguments when it is enqueued.
    """

    name: str
    limit: RateLimit
    key: KeyFunction | None = None

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The bucket key of a job with these arguments (None: the shared bucket)."""
        if self.key is None:
            return None
        value = self.key(*args, **kwargs)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ConfigurationError(
                f"the key function of limiter {self.name!r} returned {value!r}; "
                "it must return a string, an int or None"
            )
        key = str(value)
        if not is_bucket_key(key):
            raise ConfigurationError(
                f"the key function of limiter {self.name!r} returned {value!r:.200}; {KEY_RULE}"
            )
        return key
