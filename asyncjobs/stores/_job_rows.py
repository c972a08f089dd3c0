"""The jobs a store takes and gives back: ``NewJob``, a job to insert; ``Inserted``, what
an insert returns; and ``JobRow``, a stored job.

Values of the contract between asyncjobs and a database (``_protocol``): times are
epoch seconds, JSON columns raw text. A store checks the jobs it is given to insert
(``check_new_jobs``) with the checks ``Jobs`` applies to what it is given: the
``CheckedJob`` rows ``Jobs`` builds from what it checked are not checked again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from asyncjobs._codec import decode, decode_payload
from asyncjobs._errors import ConfigurationError
from asyncjobs._ratelimit import KEY_RULE, is_bucket_key
from asyncjobs._settings import (
    check_instant,
    check_name,
    check_text,
    is_storable,
    job_id_or_none,
    seconds,
)
from asyncjobs._tasks import check_max_attempts, check_priority


class NewJob(NamedTuple):
    """A job to insert. ``payload`` and ``options`` are JSON text.

    Named tuples, this and ``Outcome`` (one per job on the enqueue and finish paths):
    immutable like a frozen dataclass, built three times faster. Build them with
    keywords."""

    id: str
    task: str
    queue: str
    payload: str
    status: str  # "queued", "scheduled", "waiting", or "running" when ``worker`` is set
    priority: int
    run_at: float
    max_attempts: int
    options: str | None = None  # per-call settings that win over the task definition
    idempotency_key: str | None = None
    group_key: str | None = None
    chain_next: str | None = None  # released when this job succeeds
    batch_id: str | None = None  # the batch's on_complete job, released when all finish
    rate_key: str | None = None  # bucket key within the task's named limiter (None: shared)
    # Local dispatch: the enqueuing process runs the job at once. Inserted 'running',
    # first attempt started at insert, leased to ``worker`` for ``lease`` seconds from
    # the insert's time (``Inserted.at``), not from the enqueue's: an insert that waited
    # for the write lock would otherwise write a lease short by that wait.
    worker: str | None = None
    lease: float | None = None
    # Enqueued by name where its task is not defined: a keyed limiter's key for it
    # is computed by a worker that defines the task (``Store.pending_keys``).
    key_pending: bool = False

    def lease_end(self, now: float) -> float | None:
        """When the lease of this job, inserted running at ``now``, ends (None: it is
        not inserted running)."""
        return None if self.worker is None or self.lease is None else now + self.lease


class CheckedJob(NewJob):
    """A ``NewJob`` that ``Jobs`` built from what it checked (the task's definition, the
    options given, the arguments it encoded): a store inserts it without checking it
    again, so an enqueue is checked once."""

    __slots__ = ()


def check_new_jobs(jobs: Sequence[NewJob]) -> None:
    """Refuse (``ConfigurationError``) a job ``Jobs`` would never build, before a store
    writes any of ``jobs``: each but a ``CheckedJob`` goes through ``check_new_job``."""
    for job in jobs:
        if type(job) is not CheckedJob:
            check_new_job(job)


_INSERTED_AS = ("queued", "scheduled", "waiting", "running")


def check_new_job(job: NewJob) -> None:
    """Check a job given to ``Store.insert``, as ``Jobs`` checks what it is given.

    Such a row broke what reads it: a priority beyond PostgreSQL's integer, a date no
    ``datetime`` holds (every list of jobs failed), a job running without a worker or a
    lease (never recovered), a payload that is not what ``encode_payload`` writes, an
    empty queue no worker names, a bucket key over PostgreSQL's index limit (every claim
    of its limiter failed)."""
    ids: tuple[tuple[object, str], ...] = (
        (job.id, "job id"), (job.chain_next, "chain_next"), (job.batch_id, "batch_id")
    )  # fmt: skip
    for value, what in ids:
        if value is not None and (not isinstance(value, str) or job_id_or_none(value) is None):
            raise ConfigurationError(
                f"{what} must be a job id: a non-empty string of at most 1000 characters "
                f"without NUL characters or lone surrogates, got {value!r:.200}"
            )
    check_name(job.task, "task name")
    check_name(job.queue, "queue")
    if job.group_key is not None:
        check_name(job.group_key, "group")
    check_priority(job.priority)
    check_max_attempts(job.max_attempts)
    check_instant(job.run_at, "run_at")
    if job.idempotency_key is not None:
        check_text(job.idempotency_key, "idempotency_key", max_length=500)
    if job.status not in _INSERTED_AS:
        raise ConfigurationError(
            f"a job is inserted {', '.join(map(repr, _INSERTED_AS))}, got status {job.status!r}"
        )
    if (job.status == "running") != (job.worker is not None):
        raise ConfigurationError(
            "a job is inserted 'running' with the worker that runs it, and only then: got "
            f"status {job.status!r} and worker {job.worker!r}"
        )
    if job.worker is not None:
        check_text(job.worker, "worker", max_length=1000)
        seconds(job.lease, "lease", allow_zero=False)
    rate_key: object = job.rate_key
    if rate_key is not None and (not isinstance(rate_key, str) or not is_bucket_key(rate_key)):
        raise ConfigurationError(f"rate_key {rate_key!r:.200} is refused: {KEY_RULE}")
    _check_json(job)


def _check_json(job: NewJob) -> None:
    try:
        decode_payload(job.payload)  # ValueError if not text, or not such an object
        if not is_storable(job.payload):  # PostgreSQL refuses NUL, UTF-8 a lone surrogate
            raise ValueError("NUL characters or lone surrogates")
    except ValueError as error:
        raise ConfigurationError(
            'payload must be JSON text of an object {"args": [...], "kwargs": {...}}, as '
            f"asyncjobs.Jobs encodes arguments; got {job.payload!r:.200} ({error})"
        ) from None
    text: object = job.options
    if text is not None:
        try:
            options = decode(text) if isinstance(text, str) else None
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise ConfigurationError(
                f"options must be None or JSON text of an object, got {text!r:.200}"
            )


class Inserted(list[str]):
    """What ``insert`` returns: the job ids in order, plus ``seqs``, the ``seq`` of
    every job inserted running (local dispatch), which the runner orders them by, and
    ``at``, the time the insert wrote as the jobs' enqueue and such a job's start."""

    __slots__ = ("at", "seqs")

    def __init__(
        self,
        ids: Iterable[str] = (),
        *,
        seqs: Mapping[str, int] | None = None,
        at: float | None = None,
    ) -> None:
        super().__init__(ids)
        self.seqs: Mapping[str, int] = seqs or {}
        self.at = at


class JobRow(NamedTuple):
    """A stored job. Times are epoch seconds; JSON columns are raw text.

    A named tuple, not a frozen dataclass: a claim builds one per job, and from the
    driver's row tuple that costs a twentieth as much (the fields are the column order).
    """

    id: str
    seq: int
    task: str
    queue: str
    status: str
    priority: int
    payload: str
    options: str | None
    attempts: int
    max_attempts: int
    run_at: float
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    lease_until: float | None
    worker: str | None
    result: str | None
    error: str | None
    idempotency_key: str | None
    group_key: str | None
    progress: float | None
    progress_message: str | None
    chain_next: str | None
    batch_id: str | None
