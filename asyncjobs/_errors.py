"""The errors asyncjobs raises, and the one signal task code may raise.

::

    AsyncJobsError                          root of everything asyncjobs raises
    ├── ConfigurationError(ValueError)      bad URL, setting, rate string, missing extra
    ├── NotSerializable(TypeError)          an argument or result is not strict JSON
    ├── PayloadTooLarge(ValueError)         the encoded job is over max_payload_bytes
    ├── TaskNotRegistered(LookupError)      no task of that name in this process
    ├── JobFailed                           a job ended dead or cancelled
    ├── RetryRefused                        jobs.retry() cannot run that job as it is
    └── StoreError                          the database failed; driver error as __cause__
        └── DataRefused                     ...refused a value itself (too large, say)

    Retry(Exception)                        raised by task code to ask for a retry

``Retry`` sits outside the tree on purpose: an ``except AsyncJobsError`` in a task
must not swallow it.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta
from decimal import Decimal
from typing import SupportsFloat


class AsyncJobsError(Exception):
    """Root of every error asyncjobs raises."""


class ConfigurationError(AsyncJobsError, ValueError):
    """A setting, URL or option is invalid, or an optional extra is missing."""


class NotSerializable(AsyncJobsError, TypeError):
    """A job argument or result cannot be encoded as strict JSON."""


class PayloadTooLarge(AsyncJobsError, ValueError):
    """The encoded job is larger than ``max_payload_bytes``."""


class TaskNotRegistered(AsyncJobsError, LookupError):
    """No task of that name is registered in this process."""


class JobFailed(AsyncJobsError):
    """The job ended ``dead`` or ``cancelled`` instead of succeeding."""

    def __init__(self, job_id: str, status: str, error: str | None) -> None:
        lines = error.strip().splitlines() if error else []  # none if only whitespace
        detail = f": {lines[-1]}" if lines else ""
        super().__init__(f"job {job_id} ended {status}{detail}")
        self.job_id = job_id
        self.status = status
        self.error = error


class RetryRefused(AsyncJobsError):
    """``jobs.retry()`` found the job retryable but cannot run it as it is: a chain member
    that takes the previous member's result, which it never got and never can."""


class StoreError(AsyncJobsError):
    """The store could not complete an operation; the driver's error is ``__cause__``."""


class DataRefused(StoreError):
    """The database refused a value itself (one over its size limit, say): the same
    write fails every time, unlike a store that is down, locked or timing out."""


class Retry(Exception):
    """Raise from a task to fail this attempt and retry after ``delay`` seconds.

    It spends an attempt like any failure; with no attempts left the job ends ``dead``.
    Without ``delay`` the task's usual exponential backoff applies.
    """

    def __init__(
        self, delay: SupportsFloat | timedelta | None = None, reason: str | None = None
    ) -> None:
        super().__init__(reason or "retry requested")
        self.delay = None if delay is None else _seconds(delay)
        self.reason = reason


def _seconds(delay: object) -> float:
    """A ``Retry`` delay as float seconds: any real number (an int, a ``Decimal``, a
    ``Fraction``) or a ``timedelta``. Converted here, since the runner computes with
    floats: a ``Decimal`` passed the range check, then failed inside the runner, and the
    attempt was recorded as an internal error instead of the retry asked for."""
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, bool) or not isinstance(delay, numbers.Real | Decimal):
        raise TypeError(f"Retry delay must be a number of seconds or a timedelta, got {delay!r}")
    else:
        try:
            seconds = float(delay)
        except (OverflowError, ValueError):  # too large for a float, or a signalling NaN
            seconds = math.nan
    # at most 100 years (asyncjobs._settings.MAX_DELAY): later dates are unreadable
    if not 0 <= seconds <= 3_155_760_000:
        raise ValueError(f"Retry delay must be 0 to 100 years in seconds, got {delay!r}")
    return seconds
