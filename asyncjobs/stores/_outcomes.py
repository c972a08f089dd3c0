"""How attempts end: the ``Outcome`` of an attempt (its ``OutcomeKind``), which the
runner decides and the store applies; ``Applied``, what a finish applied; and
``Recovered``, a job whose lease expired.

Values of the contract between asyncjobs and a database (``_protocol``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple


class OutcomeKind(enum.StrEnum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"  # back to scheduled at run_at; the attempt is spent
    DEAD = "dead"
    RELEASE = "release"  # cut off by shutdown: back to queued, attempt refunded
    CANCELLED = "cancelled"


class Outcome(NamedTuple):
    """How one attempt ended, decided by the runner, applied by the store.

    The store applies it only while the job is still ``running`` under
    ``worker`` at ``attempt``: a job whose lease expired and was claimed again,
    or that was cancelled meanwhile, is left alone.
    """

    job_id: str
    worker: str
    attempt: int
    kind: OutcomeKind
    result: str | None = None
    error: str | None = None
    run_at: float | None = None  # for RETRY
    max_attempts: int | None = None  # the claiming worker's view, stored for lease expiry


class Applied(list[str]):
    """What ``finish`` may return: the ids of the outcomes applied, plus
    ``cancelled``: those of them, a retry or a release, that ended their job
    cancelled instead, as it was asked to stop while it ran (from another process,
    after this worker's last heartbeat)."""

    __slots__ = ("cancelled",)

    def __init__(self, ids: Iterable[str] = (), *, cancelled: Iterable[str] = ()) -> None:
        super().__init__(ids)
        self.cancelled = frozenset(cancelled)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """A job whose lease expired: requeued, dead when it had no attempts left, or
    cancelled when it had been asked to stop."""

    id: str
    task: str
    attempts: int
    status: str
    """``queued``, ``dead`` or ``cancelled``."""
