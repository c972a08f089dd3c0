"""What users see of a job: its status, a snapshot (``JobInfo``) and a handle (``Job``)."""

from __future__ import annotations

import enum
import itertools
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from asyncjobs._clock import to_datetime
from asyncjobs._codec import JSON, decode, decode_payload
from asyncjobs._settings import wait_timeout
from asyncjobs.stores._job_rows import JobRow
from asyncjobs.stores._statuses import STATUSES

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

R = TypeVar("R")


_sequence = itertools.count()

_RANDOM_BYTES_PER_ID = 10
_IDS_PER_DRAW = 256
_random_hex: list[str] = []  # random suffixes drawn ahead, taken from the end


def _forget_random_hex() -> None:
    _random_hex.clear()  # a forked child must not reuse its parent's suffixes


os.register_at_fork(after_in_child=_forget_random_hex)


def _random_suffix() -> str:
    """80 random bits as 20 hex characters, from the OS's CSPRNG.

    Drawn 256 at a time: ``os.urandom`` releases the GIL, and taking it back can wait
    for the store's thread, so one draw per job cost far more than the bytes.
    """
    if not _random_hex:
        draw = os.urandom(_RANDOM_BYTES_PER_ID * _IDS_PER_DRAW).hex()
        step = 2 * _RANDOM_BYTES_PER_ID
        _random_hex.extend(draw[i : i + step] for i in range(0, len(draw), step))
    return _random_hex.pop()


def new_job_id(now: float) -> str:
    """A job id: 32 hex characters (unique, safe in URLs), like a UUIDv7.

    48 bits grow with the enqueue time ``now`` (epoch seconds): its milliseconds, then
    6 bits of a counter, so ids made in one millisecond still differ in their first 12
    characters, which the dashboard shows. 80 random bits follow. Jobs enqueued one
    after another get ids that sort together, so an insert adds to the end of the
    unique index on ``id`` instead of dirtying a random page of it.
    """
    head = (int(now * 1000) << 6 | next(_sequence) & 0x3F) & 0xFFFFFFFFFFFF
    return f"{head:012x}{_random_suffix()}"


class JobStatus(enum.StrEnum):
    """Where a job is in its life. Compares equal to the plain strings."""

    WAITING = "waiting"
    """A chain member or batch callback waiting on other jobs."""
    SCHEDULED = "scheduled"
    """``run_at`` is in the future (a delay, or a retry's backoff)."""
    QUEUED = "queued"
    """Due, waiting for a worker."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    """Failed on every attempt (the dead-letter state); ``jobs.retry()`` revives it."""
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})
_STATUSES = frozenset(STATUSES)  # JobStatus's values: the stores' SQL filters by these


@dataclass(frozen=True, slots=True, kw_only=True)
class JobInfo:
    """A snapshot of one job, as stored."""

    id: str
    task: str
    queue: str
    status: JobStatus
    attempts: int
    max_attempts: int
    priority: int
    run_at: datetime
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JSON
    error: str | None
    idempotency_key: str | None
    args: list[JSON]
    kwargs: dict[str, JSON]
    group: str | None = None
    progress: float | None = None
    progress_message: str | None = None


class Job(Generic[R]):
    """A handle on an enqueued job. Cheap to create; every method reads the store."""

    __slots__ = ("_jobs", "id")

    def __init__(self, jobs: Jobs, job_id: str) -> None:
        self.id = job_id
        self._jobs = jobs

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def info(self) -> JobInfo:
        """The job as stored now; raises ``AsyncJobsError`` when it no longer exists
        (discarded, purged or pruned)."""
        info = await self._jobs.get(self.id)
        if info is None:
            from asyncjobs._errors import AsyncJobsError

            raise AsyncJobsError(f"job {self.id} no longer exists (discarded, purged or pruned)")
        return info

    async def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the job to finish and return its result.

        Raises ``JobFailed`` when it ends dead or cancelled, ``AsyncJobsError`` when the
        job no longer exists (discarded, purged or pruned), ``TimeoutError`` when
        ``timeout`` (seconds or a timedelta, real time) passes first.
        """
        value: Any = await self._jobs._wait_result(self.id, wait_timeout(timeout))
        return value  # type: ignore[no-any-return]

    async def cancel(self) -> bool:
        """Cancel the job unless it already finished; True if this call cancelled it
        (a running job stops first: see ``Jobs.cancel``)."""
        return await self._jobs.cancel(self.id)


def info_from_row(row: JobRow, now: float) -> JobInfo:
    """The user's view of a stored row; ``scheduled``/``queued`` follow ``run_at``."""
    status = row.status
    if status in ("scheduled", "queued"):
        status = "scheduled" if row.run_at > now else "queued"
    try:
        args, kwargs = decode_payload(row.payload)
    except ValueError:
        args, kwargs = [], {}
    try:
        result = decode(row.result)
    except ValueError:
        result = None
    error = row.error
    if status not in _STATUSES:  # written by hand, or by a newer asyncjobs: never claimed
        status = JobStatus.DEAD  # needs a human, and ``jobs.retry()`` takes it back
        error = f"the stored status {row.status!r} is not one asyncjobs knows" + (
            "" if error is None else f"; last error: {error}"
        )
    return JobInfo(
        id=row.id,
        task=row.task,
        queue=row.queue,
        status=JobStatus(status),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        priority=row.priority,
        run_at=_dt(row.run_at),
        enqueued_at=_dt(row.enqueued_at),
        started_at=to_datetime(row.started_at),
        finished_at=to_datetime(row.finished_at),
        result=result,
        error=error,
        idempotency_key=row.idempotency_key,
        args=args,
        kwargs=kwargs,
        group=row.group_key,
        progress=row.progress,
        progress_message=row.progress_message,
    )


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
