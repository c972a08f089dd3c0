"""The errors' own checks: ``Retry``'s delay, ``JobFailed``'s message."""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest

from asyncjobs import JobFailed, Retry


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        (Decimal("1.5"), 1.5),
        (Fraction(3, 2), 1.5),
        (timedelta(minutes=2), 120.0),
        (0, 0.0),
        (None, None),
    ],
)
def test_retry_takes_any_real_number_of_seconds_as_a_float(
    delay: float | None, seconds: float | None
) -> None:
    signal = Retry(delay=delay)
    assert signal.delay == seconds
    assert signal.delay is None or type(signal.delay) is float


@pytest.mark.parametrize(
    "delay",
    [-1, -0.5, math.nan, math.inf, Decimal("NaN"), Decimal("sNaN"), Decimal("-1"), 10**400, 4e9],
)
def test_retry_refuses_a_delay_out_of_range(delay: float) -> None:
    with pytest.raises(ValueError, match="Retry delay must be 0 to 100 years in seconds"):
        Retry(delay=delay)


@pytest.mark.parametrize("delay", ["5", b"5", True, [5], 1j])
def test_retry_refuses_a_delay_that_is_no_number_saying_so(delay: object) -> None:
    with pytest.raises(TypeError, match="Retry delay must be a number of seconds or a timedelta"):
        Retry(delay=delay)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", ["", " ", "\n\t \n", None])
def test_job_failed_from_an_error_of_only_whitespace_says_no_more(error: str | None) -> None:
    failed = JobFailed("j1", "dead", error)
    assert str(failed) == "job j1 ended dead"
    assert failed.error == error


def test_job_failed_names_the_last_line_of_the_error() -> None:
    failed = JobFailed("j1", "dead", "Traceback ...\n  ...\nValueError: no such user\n\n")
    assert str(failed) == "job j1 ended dead: ValueError: no such user"
