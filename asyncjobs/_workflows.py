"""Chains and batches: several jobs inserted in one transaction, linked in the store.

A chain's first job is queued and the rest wait (status ``waiting``), each linked
to the next by ``chain_next``. When a member succeeds the store releases the next
one in the same transaction; when one ends dead or cancelled the rest are
cancelled. With ``pass_result=True`` each released member receives the result of
the one before as its first positional argument.

A batch's members run in parallel, each carrying ``batch_id``: the id of the
batch's ``on_complete`` job, which waits until the store sees the last member
finish (succeeded, dead or cancelled) and then runs exactly once. If that task
has a ``batch`` parameter (or ``**kwargs``), it receives the counts as
``batch=BatchCounts(...)`` (a dict).

A member's ``delay`` counts from when the chain or batch is created; a member
released later than that runs at once.

``jobs.retry()`` (or ``retry_dead``) of a chain member that ended dead or cancelled
carries the chain on: the members after it that were cancelled before they ran wait
again, each for the one before it. One cancelled before it ran waits again for the
member before it (run at once if that one has succeeded). If retention or a
purge deleted that member, the retried one runs on its own, as a plain job, unless
it takes the previous result: that retry is refused (``RetryRefused``), since the
result is gone and the job would run with its arguments shifted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

import anyio

from asyncjobs._errors import AsyncJobsError, ConfigurationError, JobFailed
from asyncjobs._models import FINISHED, Job, JobInfo, JobStatus, new_job_id
from asyncjobs._settings import wait_timeout
from asyncjobs._tasks import JobSpec
from asyncjobs.stores._dependents import with_batch
from asyncjobs.stores._job_rows import NewJob

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs


class BatchCounts(TypedDict):
    """What a batch's ``on_complete`` task receives as its ``batch`` keyword argument."""

    id: str
    total: int
    succeeded: int
    dead: int
    cancelled: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchProgress:
    """How far a batch is: ``done`` of ``total`` members finished."""

    total: int
    done: int
    succeeded: int
    dead: int
    cancelled: int

    @property
    def fraction(self) -> float:
        """``done / total`` (1.0 for an empty batch)."""
        return self.done / self.total if self.total else 1.0

    @property
    def finished(self) -> bool:
        return self.done == self.total


class Chain:
    """A handle on a chain: its members in order (``jobs``), its status and result."""

    __slots__ = ("_jobs", "jobs")

    def __init__(self, jobs: Jobs, job_ids: Sequence[str]) -> None:
        self._jobs = jobs
        self.jobs: list[Job[Any]] = [Job(jobs, job_id) for job_id in job_ids]

    def __repr__(self) -> str:
        return f"<Chain of {len(self.jobs)} jobs, first {self.jobs[0].id}>"

    async def infos(self) -> list[JobInfo]:
        """The members still stored, in order, each with its ``id``. One discarded,
        purged or pruned is left out, as ``status()`` passes over it (it had finished:
        an unfinished one is cancelled first, and the rest of the chain with it), so a
        chain broken by a discarded step can still be looked into. Raises
        ``AsyncJobsError`` when none is stored."""
        return await self._stored()

    async def _stored(self) -> list[JobInfo]:
        """The members still stored, in order (``infos()``); ``AsyncJobsError`` when
        none is."""
        stored = [info for job in self.jobs if (info := await self._jobs.get(job.id))]
        if not stored:
            raise AsyncJobsError(f"no job of {self!r} is stored any more (pruned or purged)")
        return stored

    async def status(self) -> JobStatus:
        """The status of the first member that has not succeeded (``succeeded`` when all
        have): ``running`` while one runs, ``dead`` or ``cancelled`` when it broke. A
        member discarded, purged or pruned is passed over, but not the last one: what
        became of it is gone with it (discarded unrun, dead, or succeeded), so with the
        rest succeeded this raises ``AsyncJobsError``, as ``result()`` does, rather than
        report a success it cannot tell."""
        stored = await self._stored()
        for info in stored:
            if info.status != JobStatus.SUCCEEDED:
                return info.status
        if stored[-1].id != self.jobs[-1].id:
            raise AsyncJobsError(
                f"the last job of {self!r}, {self.jobs[-1].id}, is no longer stored "
                "(discarded, purged or pruned): how the chain ended is not known"
            )
        return JobStatus.SUCCEEDED

    async def result(self, timeout: float | timedelta | None = None) -> Any:
        """Wait (real time) for the last member and return its result.

        Raises ``JobFailed`` for the member that ended dead or cancelled and broke the
        chain (the first still stored), ``TimeoutError`` when ``timeout`` seconds pass
        first.
        """
        try:
            return await self.jobs[-1].result(timeout=timeout)
        except JobFailed as error:
            for info in await self._stored():
                if info.status in (JobStatus.DEAD, JobStatus.CANCELLED):
                    raise JobFailed(info.id, info.status, info.error) from error
            raise

    async def cancel(self) -> bool:
        """Cancel every unfinished member; False if all had finished.

        Each one, not only the first: a running member is only asked to stop (another
        process's worker hears of it at its next heartbeat) and may succeed first, and
        the members after it, already cancelled, then stay so."""
        cancelled = False
        for job in self.jobs:
            cancelled = await job.cancel() or cancelled
        return cancelled


class Batch:
    """A handle on a batch: members (``jobs``), ``on_complete`` and progress."""

    __slots__ = ("_jobs", "id", "jobs", "on_complete")

    def __init__(
        self, jobs: Jobs, batch_id: str, job_ids: Sequence[str], on_complete: str | None
    ) -> None:
        self._jobs = jobs
        self.id = batch_id
        self.jobs: list[Job[Any]] = [Job(jobs, job_id) for job_id in job_ids]
        self.on_complete: Job[Any] | None = None if on_complete is None else Job(jobs, on_complete)

    def __repr__(self) -> str:
        return f"<Batch {self.id} of {len(self.jobs)} jobs>"

    async def progress(self) -> BatchProgress:
        """Counts of the members by outcome, read in one query. A member discarded,
        purged or pruned still counts under its outcome, until retention prunes the
        last job of its batch."""
        counts = await self._jobs.store.batch_counts(self.id)
        finished = {str(s): counts.get(str(s), 0) for s in FINISHED}
        return BatchProgress(
            total=len(self.jobs),
            done=sum(finished.values()),
            succeeded=finished[JobStatus.SUCCEEDED],
            dead=finished[JobStatus.DEAD],
            cancelled=finished[JobStatus.CANCELLED],
        )

    async def wait(self, timeout: float | timedelta | None = None) -> BatchProgress:
        """Wait (real time) until every member finished, and ``on_complete`` too.
        A ``timeout`` of 0 (or less) reads the batch once, as ``Job.result`` does.

        A member (or ``on_complete``) discarded or purged counts as finished; one
        retried by hand after ``on_complete`` ran does not, until it ends again."""
        limit, each = _limits(timeout)
        with anyio.fail_after(limit):
            if self.on_complete is not None and await self._succeeded(self.on_complete, each):
                # It ran: every member had finished, unless one was retried by hand since.
                progress = await self.progress()
                if progress.finished:
                    return progress
            # No on_complete, or it did not succeed (maybe cancelled or deleted before
            # the members finished), or a member runs again: wait for them too.
            for job in self.jobs:
                await self._succeeded(job, each)
        return await self.progress()

    async def _succeeded(self, job: Job[Any], timeout: float | None) -> bool:
        """Wait for ``job`` to finish (``timeout`` as ``Job.result`` takes it); whether
        it succeeded. A job of the batch that is no longer stored finished (deletion
        never takes a running job, and cancels an unfinished one) if the store still
        counts the batch: its jobs are all inserted in one transaction, so none visible
        means not committed (yet), or forgotten."""
        try:
            await job.result(timeout=timeout)
        except JobFailed:
            return False
        except AsyncJobsError:
            if await self._jobs.get(job.id) is not None or not await self._counted():
                raise  # not about a missing job, or a batch the store does not know
            return False
        return True

    async def _counted(self) -> bool:
        if await self._jobs.store.batch_counts(self.id):
            return True
        return (
            self.on_complete is not None and await self._jobs.get(self.on_complete.id) is not None
        )

    async def results(self, timeout: float | timedelta | None = None) -> list[Any]:
        """The members' results in order; raises ``JobFailed`` for the first that failed.
        A ``timeout`` of 0 (or less) reads them once, as ``Job.result`` does."""
        limit, each = _limits(timeout)
        with anyio.fail_after(limit):
            return [await job.result(timeout=each) for job in self.jobs]


def _limits(timeout: float | timedelta | None) -> tuple[float | None, float | None]:
    """A batch's wait for ``timeout``: its own limit, and each job's ``Job.result``
    timeout. One of 0 or less reads each job once (an unfinished one raises
    ``TimeoutError``) instead of a deadline already past, which no read could meet."""
    limit = wait_timeout(timeout)
    if limit is not None and limit <= 0:
        return None, 0
    return limit, None


def _member(jobs: Jobs, spec: object, what: str) -> JobSpec[Any]:
    if not isinstance(spec, JobSpec):
        raise TypeError(f"{what} must be a JobSpec (task.spec(...)), got {spec!r}")
    if spec.options.idempotency_key is not None:
        raise ConfigurationError(
            f"{what} has an idempotency_key; chain and batch members cannot have one "
            "(a member that already exists would leave the rest waiting)"
        )
    return spec


async def create_chain(jobs: Jobs, specs: Sequence[JobSpec[Any]], *, pass_result: bool) -> Chain:
    if not specs:
        raise ValueError("chain() needs at least one job")
    members = [_member(jobs, spec, f"chain member {i}") for i, spec in enumerate(specs)]
    now = jobs.clock.now()
    ids = [new_job_id(now) for _ in members]
    new: list[NewJob] = []
    for i, spec in enumerate(members):
        new.append(
            jobs._new_job(
                spec,
                now,
                status=None if i == 0 else "waiting",
                chain_next=ids[i + 1] if i + 1 < len(ids) else None,
                job_id=ids[i],
                pass_result=pass_result and i > 0,
            )
        )
    return Chain(jobs, await jobs._insert(new))


def _takes_batch(jobs: Jobs, spec: JobSpec[Any]) -> bool:
    """Whether the ``on_complete`` task may take ``batch=``: as defined here, or, when
    this process does not define it (enqueued by name), maybe; the worker that runs it
    leaves the counts out if its definition does not take them."""
    definition = spec.definition or jobs.registry.get(spec.task)
    return definition is None or definition.takes_batch


async def create_batch(
    jobs: Jobs, specs: Sequence[JobSpec[Any]], *, on_complete: JobSpec[Any] | None
) -> Batch:
    members = [_member(jobs, spec, f"batch member {i}") for i, spec in enumerate(specs)]
    now = jobs.clock.now()
    batch_id = new_job_id(now)
    new = [jobs._new_job(spec, now, batch_id=batch_id) for spec in members]
    if on_complete is not None:
        callback = _member(jobs, on_complete, "on_complete")
        # With no member there is nothing to wait for: the callback is due at once.
        counts = _takes_batch(jobs, callback)
        job = jobs._new_job(
            callback,
            now,
            status="waiting" if new else None,
            job_id=batch_id,
            batch_counts=counts,
        )
        if counts and not new:
            job = job._replace(payload=with_batch(job.payload, batch_id, {}))
        new.append(job)
    if not new:
        return Batch(jobs, batch_id, [], None)
    ids = await jobs._insert(new)
    if on_complete is None:
        return Batch(jobs, batch_id, ids, None)
    return Batch(jobs, batch_id, ids[:-1], ids[-1])
