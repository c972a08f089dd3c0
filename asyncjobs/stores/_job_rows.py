"""The jobs a store takes and gives back: ``NewJob``, a job to insert; ``Inserted``, what
an insert returns; and ``JobRow``, a stored job.

Values of the contract between asyncjobs and a database (``_protocol``): times are
epoch seconds, JSON columns raw text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple


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
