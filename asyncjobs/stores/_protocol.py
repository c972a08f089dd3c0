"""The contract between asyncjobs and a database.

The protocol is domain-level: insert jobs, claim ready ones, finish them. The
store decides nothing. The runner computes retries, backoff and dead-letter
decisions with pure functions and hands the store an ``Outcome`` to apply
atomically. The store never reads a clock: every method that needs the time is
given ``now`` (epoch seconds). Only a lease, which must be counted from when it is
written, is counted from the caller's clock read once the store holds the lock
(``ClaimRequest.clock``, a ``heartbeat``'s ``lease_until``): a write that first waited
for another process's lock would otherwise write a lease already short by that wait.

This module holds the ``Store`` protocol, and what ``Store.list(preview=N)`` gives
(``Preview``, ``previewed``). The values it takes and returns live in modules beside
it: ``_job_rows`` (jobs to insert, stored jobs), ``_claims`` (a claim's request and
result), ``_outcomes`` (how attempts end) and ``_ops_rows`` (workers and the operations
snapshot). They can be imported from here too (``__all__``), as the PostgreSQL store
and the runner do.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from asyncjobs.stores._claims import Claimed, ClaimRequest, RateKeyed, TaskLimits
from asyncjobs.stores._job_rows import Inserted, JobRow, NewJob
from asyncjobs.stores._ops_rows import FinishedSample, OpsSnapshot, StuckJob, WorkerBeat, WorkerRow
from asyncjobs.stores._outcomes import Applied, Outcome, OutcomeKind, Recovered

__all__ = [
    "MAX_PREVIEW",
    "PREVIEWED",
    "SEEN_KEY",
    "SLOT_KEY",
    "Applied",
    "ClaimRequest",
    "Claimed",
    "FinishedSample",
    "Inserted",
    "JobRow",
    "NewJob",
    "OpsSnapshot",
    "Outcome",
    "OutcomeKind",
    "Preview",
    "RateKeyed",
    "Recovered",
    "Store",
    "StuckJob",
    "TaskLimits",
    "WorkerBeat",
    "WorkerRow",
    "checked_preview",
    "previewed",
]

SLOT_KEY = "schedule:"
"""The ``asyncjobs_meta`` key of a schedule's last slot: this, then the schedule's name."""

SEEN_KEY = "schedule-seen:"
"""The ``asyncjobs_meta`` key of the time up to which a schedule was seen (``seen_until``)."""


PREVIEWED = ("payload", "result", "error")
"""The columns ``Store.list(preview=N)`` reads only the start of: each may be megabytes."""


class Preview(str):
    """The first characters of a longer stored value, as ``Store.list(preview=N)`` gives
    ``payload``, ``result`` or ``error``: ``size`` is the whole value's length in bytes
    (in the database's encoding: UTF-8 for SQLite, the server's for PostgreSQL). A JSON
    value cut short no longer parses; ``Store.get`` reads it whole."""

    size: int

    def __new__(cls, text: str, size: int) -> Preview:
        self = super().__new__(cls, text)
        self.size = size
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # copy.deepcopy (dataclasses.asdict) keeps it
        return (Preview, (str(self), self.size))


MAX_PREVIEW = 2**30
"""A preview this long reads any value whole (PostgreSQL stores at most 1 GiB a value,
SQLite 10**9 bytes by default), and one more character still fits the 32-bit length
that both databases' substr() takes: past 2**31 SQLite read each value as '', and
PostgreSQL refused the query."""


def checked_preview(preview: object) -> int:
    """``list``'s ``preview``, at most ``MAX_PREVIEW``; ``ValueError`` unless a whole
    number of characters >= 0."""
    if isinstance(preview, bool) or not isinstance(preview, int) or preview < 0:
        raise ValueError(f"preview must be a whole number of characters >= 0, got {preview!r}")
    return min(preview, MAX_PREVIEW)


def previewed(row: JobRow, preview: int, sizes: Sequence[int | None]) -> JobRow:
    """``row`` as ``list(preview=...)`` returns it, from a row whose ``PREVIEWED`` columns
    were read as their first ``preview + 1`` characters, and ``sizes``, the bytes of each
    whole: a value with more than ``preview`` becomes a ``Preview`` of that many."""
    cut: dict[str, Any] = {
        name: Preview(value[:preview], size or 0)
        for name, size in zip(PREVIEWED, sizes, strict=True)
        if isinstance(value := getattr(row, name), str) and len(value) > preview
    }
    return row._replace(**cut) if cut else row


class Store(Protocol):
    """A durable job table. Implementations: ``SQLiteStore``, ``PostgresStore``.

    Every method is safe to call from many coroutines at once and, for stores
    shared by several processes, from many processes at once.
    """

    async def open(self) -> None:
        """Connect and create or migrate the schema. Idempotent."""
        ...

    async def close(self) -> None:
        """Finish pending writes and disconnect. Idempotent."""
        ...

    def set_deadline(self, seconds: float | None) -> None:
        """Bound the waits of calls under way and to come: at ``seconds`` from now, a
        call stops waiting for a busy database or a slow reply and fails with
        ``StoreError`` (``None``: no bound, the default). Past it, a call is still
        tried, with next to no wait: SQLite tries once, waiting a quarter of a second
        at most on a busy file; PostgreSQL waits a second for the reply. Workers set
        one at shutdown, so that ``stop()`` ends in time while another process holds
        the database, and their last records still get through to one that is free."""
        ...

    async def insert(self, jobs: Sequence[NewJob], *, now: float | Callable[[], float]) -> Inserted:
        """Insert jobs in one transaction; return their ids in order.

        A job whose ``idempotency_key`` is already stored is not inserted; its
        slot in the result holds the id of the stored job. A job with ``worker``
        set is inserted running: attempt 1 started at ``now``, leased to that
        worker for ``lease`` seconds from then, and its ``seq`` is in the result's
        ``seqs``. ``now`` may be a clock, read once the store holds the write lock
        (or a connection), so that no wait for it comes off the lease; the time read
        is the result's ``at``.

        Refuses (``ConfigurationError``, nothing written) a job ``Jobs`` would never
        build (``_job_rows.check_new_jobs``): one given as a ``CheckedJob``, built by
        ``Jobs`` from what it checked, is taken as it is.
        """
        ...

    async def claim(self, request: ClaimRequest, *, now: float) -> list[JobRow]:
        """Atomically take up to ``limit`` due jobs: status ``running``, attempts
        raised by one, ``lease_until = now + lease``, ``worker`` set (``now`` read from
        ``request.clock`` once the lock is held, by a store whose claim waits for one).

        Only jobs whose task is in ``request.tasks`` (and queue in ``queues``)
        are taken; higher priority first, then enqueue order. Flow control holds
        across every process sharing the store, checked in the same transaction:
        only the oldest unfinished job of a ``group_key`` runs; a task's or queue's
        ``concurrency`` bounds its running jobs; a job of a rate-limited task takes
        one token from each of its buckets, and one that finds none is skipped
        without spending an attempt. A store that knows when a skipped job can next
        get a token returns a ``Claimed`` carrying it.
        """
        ...

    async def finish(self, outcomes: Sequence[Outcome], *, now: float) -> list[str]:
        """Apply outcomes in one transaction; return the ids that were applied (an
        ``Applied`` tells which of them ended cancelled instead).

        Also releases what waits on a finished job: the next chain member on
        success, the rest of the chain on dead/cancelled, a batch's callback
        when its last member finishes. A released job whose options ask for it
        gets the result or the batch counts in its payload, in the same
        transaction (``asyncjobs/stores/_dependents.py``).
        """
        ...

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[builtins.list[str], builtins.list[JobRow]]:
        """``finish(outcomes)`` then ``claim(request)``: the runner's hot path, one
        transaction where the store can (it need not be atomic across the two)."""
        ...

    async def heartbeat(
        self, job_ids: Sequence[str], *, worker: str, lease_until: float | Callable[[], float]
    ) -> set[str]:
        """Extend the leases of jobs still running under ``worker`` to ``lease_until``
        (or what it returns, called once the store holds the lock, and again for each
        try of a write tried again: the last call gives the lease written); return
        those ids, less the ones asked to stop (cancelled while running).

        The runner counts on that lease: a job it cannot renew in time (this raises
        until the lease is about to end) it stops, before another worker may take it."""
        ...

    async def recover(self, *, now: float) -> list[Recovered]:
        """Requeue running jobs whose lease expired (dead when out of attempts,
        cancelled when asked to stop)."""
        ...

    async def next_run_at(self) -> float | None:
        """The earliest ``run_at`` of a scheduled job, to sleep until it."""
        ...

    async def changed(self) -> bool:
        """Whether another connection wrote since the last call (cheap)."""
        ...

    def on_change(self, wake: Callable[[], None] | None) -> bool:
        """Call ``wake`` (on the event loop) as soon as another connection writes, from
        now on (None: no more); return whether this store hears of writes at all
        (PostgreSQL's NOTIFY, once ``changed()`` has opened its listener). A store that
        cannot (SQLite) returns False, and its ``changed()`` is polled."""
        ...

    async def get(self, job_id: str) -> JobRow | None: ...

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
        now: float,
        preview: int | None = None,
    ) -> list[JobRow]:
        """Jobs newest first. ``status="scheduled"``/``"queued"`` follow ``run_at``;
        ``status="dead"`` takes the jobs with a status not in ``STATUSES`` too, as they
        read as dead (``DEAD_AS_READ``, in ``_statuses.py``).

        ``preview`` (a number of characters, at least 0) is for list views: at most that
        many of each ``payload``, ``result`` and ``error`` come back from the database (a
        result may be 64 MiB; PostgreSQL reads only that slice, SQLite reads each value
        whole in its own memory, one row at a time), and a longer value comes back as a
        ``Preview`` of its start (``previewed``). None reads them whole; a negative one
        raises ``ValueError``."""
        ...

    async def retry(self, job_id: str, *, now: float) -> bool:
        """Put a dead or cancelled job (or one whose status is not in ``STATUSES``, which
        reads as dead) back to queued with at least one more attempt.

        One that never ran waits again for what it waited on (the chain member before
        it, a batch's members). The chain members after it that were cancelled before
        they ran wait again, each for the one before it. Raises ``RetryRefused`` for a
        chain member that takes the previous result, never got it, and whose
        predecessor is no longer stored."""
        ...

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        """Cancel jobs that have not finished; return the ids cancelled.

        Cancelling a job cancels the rest of its chain. A running job is only asked to
        stop (``cancel_requested_at``): it stays running until its worker's outcome,
        which ends it cancelled where it would have run again, or its lease expires
        (``recover``: cancelled). ``heartbeat`` no longer counts it as the worker's.
        """
        ...

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        """Delete the jobs (never running ones) with that status (as ``list`` filters it)
        and/or finished before ``older_than``; unfinished chain and batch members as
        ``delete`` does, but for a chain member after the first that has not finished,
        which is kept (``PURGEABLE``), and one cancelled before it ran behind one that
        did not succeed, kept while that one is stored and taken with it when the
        purge takes it too."""
        ...

    async def set_progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        *,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record the progress of a running job; with ``worker`` and ``attempt``, only
        while that worker runs that attempt (a late attempt, its lease lost and the job
        claimed again, writes nothing over the progress of the one running now)."""
        ...

    async def counts(self, *, now: float) -> dict[tuple[str, str, str], int]:
        """Job counts keyed by (queue, task, status); scheduled/queued follow ``run_at``."""
        ...

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Counts by status of the members of a batch (jobs with that ``batch_id``), the
        stored ones and those deleted since (tallied by ``delete``, ``purge``, ``prune``
        while a job of the batch is stored)."""
        ...

    async def pending_keys(self, tasks: Collection[str], *, limit: int) -> builtins.list[JobRow]:
        """Up to ``limit`` queued jobs of these tasks, in claim order, whose rate-limit
        key is pending: enqueued by name where their task was not defined
        (``NewJob.key_pending``). A claim under a keyed limiter that has such a job
        holds the limiter's jobs back (``Claimed.unkeyed``)."""
        ...

    async def set_rate_keys(self, keys: Sequence[RateKeyed]) -> None:
        """Store the rate-limit keys a worker computed for such jobs; their keys are no
        longer pending (a job whose key another worker stored meanwhile keeps that)."""
        ...

    # -- operations (stats, dashboard, pruning) --------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        """Everything ``jobs.stats()`` needs, read in one transaction.

        Counts per (queue, task, status) with scheduled/queued following ``run_at``;
        jobs finished in each of ``windows`` (seconds back from ``now``); the newest
        ``sample`` succeeded/dead jobs for run/wait times; running jobs whose lease
        expired; workers seen since ``workers_since``. Reads only indexes or recent
        rows, so it stays cheap with millions of finished jobs.
        """
        ...

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        """Upsert this process's row in the workers table (``last_seen_at = now``)."""
        ...

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        """Delete up to ``limit`` succeeded/cancelled jobs finished before
        ``finished_before`` and dead ones before ``dead_before`` (one transaction),
        and workers not seen since ``workers_before``; return the jobs deleted. A
        call that deletes fewer than ``limit`` (the last of a prune's batches) also
        deletes the tallies of deleted batch members past those times whose batch
        has no job left."""
        ...

    async def prune_buckets(
        self, *, full_before: Mapping[str, float], limit: int, others_before: float | None = None
    ) -> int:
        """Delete up to ``limit`` rate-limit buckets (one transaction) whose name is in
        ``full_before`` and whose tokens were counted before the time given for that
        name; return how many. The caller, which knows each name's rate, gives the
        time by which such a bucket has refilled: deleting it changes nothing (a missing
        bucket is a full one), and a keyed limiter's buckets do not pile up.

        With ``others_before``, also the buckets of every other name stored (a limiter
        the app dropped or renamed, or one only another deploy defines) counted before
        that time. Reads the names stored by seeks, not their buckets, and each name's
        buckets in the order they were counted, as for ``full_before``."""
        ...

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        """``retry`` every job that reads as dead (of that queue/task; as ``list``
        filters them); return how many."""
        ...

    async def delete(self, job_ids: Sequence[str], *, now: float) -> int:
        """Delete these jobs unless they are running; return how many were deleted.

        An unfinished member of a chain or batch is cancelled first, in the same
        transaction, so what waits on it moves on; ``purge`` does the same."""
        ...

    async def meta(self, key: str, default: str) -> str:
        """The shared value stored under ``key``, storing ``default`` first if absent."""
        ...

    async def last_slot(self, schedule: str, slot: int | None = None) -> int | None:
        """The latest slot (epoch seconds) recorded for ``schedule``, or None; with
        ``slot``, record it first (a later slot already recorded is kept). Kept apart
        from the jobs, so pruning their rows never loses it."""
        ...

    async def seen_until(self, schedule: str, at: int | None = None) -> int | None:
        """The latest time (epoch seconds) up to which a process saw ``schedule``, or
        None; with ``at``, record it first (a later time already recorded is kept). Apart
        from ``last_slot``: a slot at or before it is not caught up (it was not missed
        while the app was down, or a start with catch_up=False skipped it), but it may
        not have run yet (a process that runs it ticks later)."""
        ...
