"""Slots: which jobs hold ``Runner``'s ``concurrency`` slots, and when a job takes one.

A job takes a slot as it starts (``_start_ready``, highest priority first), or before
its insert commits when this process enqueues it while a slot is free (local dispatch:
``reserve``, then ``dispatched``, or ``unreserve`` if the insert failed); jobs claimed
ahead wait in ``_ready``. A job that ends frees its slot at once (``_complete``), its
outcome left in the outbox (``_Outbox``). At shutdown nothing new starts
(``stop_accepting``) and the jobs still running are cancelled (``cancel_running``).

``_Slots`` holds these methods of ``Runner``, which inherits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from asyncjobs._clock import within
from asyncjobs._execution import _Running
from asyncjobs._outbox import _Finished
from asyncjobs._runner_state import _RunnerState
from asyncjobs.stores._protocol import Inserted, JobRow, NewJob, Outcome

logger = logging.getLogger("asyncjobs")


# Seconds a job cancelled at shutdown has to end (its cleanup, its finally blocks)
# before shutdown goes on without it: one that ignores the cancellation (catches
# CancelledError and carries on) would otherwise hold the process forever.
CANCEL_GRACE = 5.0


class _Slots(_RunnerState):
    """``Runner``'s slots: local dispatch, starting ready jobs, freeing slots."""

    # -- local dispatch --------------------------------------------------------------

    def reserve(self, job_id: str) -> bool:
        """May a job this process enqueues now go straight to a free slot?

        Then it is inserted running (one write instead of insert plus claim) and runs
        as soon as the insert commits. Only while nothing waits, as far as this
        worker knows: a slot is free (not promised to a job claimed ahead or being
        dispatched), and the last claim found every ready job, so a job jumps no queue.
        """
        if not self._accepting or self._backlog:
            return False
        if self._busy >= self.settings.concurrency:
            # It waits in the store for a slot: a job enqueued once one frees, before a
            # claim took this one, would run first (and ahead of its higher priority).
            self._backlog = True
            self._queued_for_room += 1
            return False
        self._reserved.add(job_id)
        return True

    def unreserve(self, jobs: Sequence[NewJob]) -> None:
        """The insert of ``jobs`` failed or was abandoned: free their slots."""
        for job in jobs:
            self._reserved.discard(job.id)
        self._start_ready()  # a job claimed ahead may have waited for that slot
        # Whether or not other reservations remain: the claim loop may wait for room,
        # and a slot kept free until the others' jobs end would leave jobs waiting.
        self._free_slot()

    def dispatched(self, jobs: Sequence[NewJob], inserted: Inserted) -> bool:
        """The insert of ``jobs`` committed: run those inserted running. True if
        shutdown began meanwhile and they were queued to go back instead (the caller
        writes that now: the workers' last write may be past)."""
        now = self.clock.now() if inserted.at is None else inserted.at
        rows: list[JobRow] = []
        promised: list[JobRow] = []  # into the slot each kept for it (not ready jobs')
        for job in jobs:
            if job.worker is None:
                continue
            # Run it even if its reservation was dropped: its enqueue was cancelled
            # while the insert was under way, and the insert committed after all. It
            # waits for a slot then, as a job claimed ahead does.
            reserved = job.id in self._reserved
            self._reserved.discard(job.id)
            seq = inserted.seqs.get(job.id)
            if seq is not None:  # else not inserted (an idempotency key already stored)
                (promised if reserved else rows).append(_dispatched_row(job, seq, now))
        if not self._accepting:  # shutdown began meanwhile: give them back unstarted
            self._give_back([*promised, *rows])
            self._free_slot()  # wait_idle waits for reservations too
            return bool(promised or rows)
        for row in promised:
            self._start(row)
        if rows:
            self._add_ready(rows)
        elif self._ready:  # a reservation without its row (not inserted): a slot is free
            self._start_ready()
        return False

    # -- slots -----------------------------------------------------------------------

    @property
    def _held(self) -> int:
        """Slots held by a job's task: running, or a stale attempt being stopped."""
        return len(self.running) + len(self._stopping)

    @property
    def _busy(self) -> int:
        """Slots taken or promised: held, claimed ahead, or being dispatched."""
        return self._held + len(self._ready) + len(self._reserved)

    def _add_ready(self, rows: Sequence[JobRow]) -> None:
        self._ready.extend(rows)
        self._ready.sort(key=_run_order)
        self._start_ready()
        # Past drain()'s bound none starts, and the drain gives them all back as it
        # raises: given back now, those on their last attempt were claimed again at once.
        spent = self._start_limit is not None and self.jobs_started >= self._start_limit
        if self._ready and not spent:
            self._give_back_last_attempts()

    def _give_back_last_attempts(self) -> None:
        """Give back at once, attempt unspent, the jobs on their last attempt that found
        no slot. A claim counts its free slots before its round trip to the store, and
        an enqueue may dispatch to one of them meanwhile (or the other way round): one
        of the two jobs then waits here, its attempt spent, and a kill -9 before it
        starts would leave it dead without its having run. (The store claims none such
        ahead of a free slot.) Jobs with attempts left wait, as jobs claimed ahead do."""
        last = [row for row in self._ready if row.attempts >= row.max_attempts]
        if not last:
            return
        self._ready = [row for row in self._ready if row.attempts < row.max_attempts]
        self._give_back(last)
        self._backlog = True  # they are back in the queue: no enqueue jumps them
        self.wake()  # write the release soon

    def _start_ready(self) -> None:
        """Start ready jobs, highest priority first, while slots are free (not running a
        job nor promised to one being dispatched).

        Each job gets a plain asyncio task of its own (cheaper than a task group's):
        cancelling it (``cancel_local``, shutdown) stops that job alone. A job's task
        starts the next ready job when it ends (``_complete``), so no task waits
        between jobs. ``cancel_running`` stops whatever still runs at shutdown.
        """
        # Not in the slots promised to jobs being dispatched (reserve): their inserts
        # commit them running, and a job claimed ahead that took one would make them
        # wait in its place.
        free = self.settings.concurrency - self._held - len(self._reserved)
        if self._start_limit is not None:
            free = min(free, self._start_limit - self.jobs_started)
        if free <= 0 or not self._ready or not self._accepting:
            return
        for _ in range(min(free, len(self._ready))):
            self._start(self._ready.pop())

    def _start(self, row: JobRow) -> None:
        """Run ``row`` in a task of its own, in a slot the caller found free."""
        stale = self.running.get(row.id)
        if stale is not None:
            # An earlier attempt still runs here: its lease expired (the loop or the
            # store stalled) and the job was claimed again. Stop that copy, as a
            # heartbeat would have; the store ignores its outcome (attempt number).
            logger.warning(
                "job %s was claimed again while attempt %d still ran here; stopping it",
                row.id, stale.row.attempts,
                extra={"job_id": row.id, "task": row.task, "attempt": stale.row.attempts},
            )  # fmt: skip
            if stale.task is not None:
                if not stale.cancelled_by_user:  # else being stopped already (its lease
                    stale.task.cancel()  # lost): cancelled again, its cleanup is cut short
                # Until its task ends (its cleanup may take a while), it still takes
                # the slot: the new attempt takes the one the caller found free.
                self._stopping.append(stale)
                stale.task.add_done_callback(lambda _: self._stopped(stale))
            stale.cancelled_by_user = True
        running = self.running[row.id] = _Running(row)
        self.jobs_started += 1
        loop = asyncio.get_running_loop()
        running.task = loop.create_task(self._execute(running), context=self._context.copy())

    def _stopped(self, stale: _Running) -> None:
        """A stale attempt's task ended (``_start``): its slot is free."""
        self._stopping = [other for other in self._stopping if other is not stale]
        self._free_slot()
        self._start_ready()
        self.wake()

    def _complete(self, running: _Running, outcome: Outcome | None, started: float) -> None:
        """Free the slot now (for the next job claimed ahead, if any); the outcome is
        written by the next claim (or flush)."""
        row = running.row
        # The wall clock: set back while the job ran (NTP), it gave a negative duration,
        # which held the mean below zero for dozens of jobs (full look-ahead) and was logged.
        duration = max(0.0, self.clock.now() - started)
        if outcome is not None:
            self._outbox.append(_Finished(row, outcome, duration, running.lease_lost_raised))
        mean = self._mean_duration
        self._mean_duration = duration if mean is None else mean + (duration - mean) / 8
        if self.running.get(row.id) is running:  # not a later attempt's entry
            del self.running[row.id]
        self._free_slot()
        self._start_ready()
        self.wake()  # write the outcome soon, and claim the next job

    def _free_slot(self) -> None:
        freed, self._slot_freed = self._slot_freed, asyncio.Event()
        freed.set()

    # -- shutdown --------------------------------------------------------------------

    async def cancel_running(self) -> None:
        """Cancel the jobs still running and wait for each to record its release
        (``CANCEL_GRACE`` at most).

        A job whose task was cancelled before its first step never ran its code (nor
        ``_execute``'s cleanup): it goes back unspent here. Nothing new starts. Those
        still running past the grace (stale attempts being stopped too) are forgotten,
        logged: they take no slot once the workers start again.
        """
        self.stop_accepting()
        tasks = [
            running.task
            for running in [*self.running.values(), *self._stopping]
            if running.task is not None
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            with within(self.clock, CANCEL_GRACE):
                await asyncio.wait(tasks)
        never_started: list[JobRow] = []
        for running in self.running.values():
            if running.task is None or running.task.done():
                never_started.append(running.row)
                continue
            # It keeps its lease: once that expires, the job runs again elsewhere.
            row = running.row
            logger.error(
                "shutdown: job %s (%s) ignored its cancellation for %ss; going on without "
                "it, it will run again once its lease expires", row.id, row.task, CANCEL_GRACE,
                extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
            )  # fmt: skip
        for stale in self._stopping:
            if stale.task is not None and not stale.task.done():
                row = stale.row
                logger.error(
                    "shutdown: attempt %d of job %s (%s), stopped as the job was claimed "
                    "again here, ignored its cancellation and outlived shutdown; going on "
                    "without it", row.attempts, row.id, row.task,
                    extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
                )  # fmt: skip
        # Forgotten, as the running ones: kept, an attempt that outlived shutdown would
        # hold its slot (and the lease recovery) after a start() of the same Jobs. Their
        # tasks are held until they end: asyncio holds tasks weakly, and one waiting on
        # what only it reaches was collected mid-run ("Task was destroyed but it is
        # pending!", its code thrown GeneratorExit), unseen by ``asyncjobs worker``,
        # which waits for the tasks left at its exit (``_worker._cancel_leftovers``).
        for task in tasks:
            if not task.done():
                self._left_behind.add(task)
                task.add_done_callback(self._left_behind.discard)
        self.running.clear()
        self._stopping = []
        self._give_back(never_started)
        self._free_slot()

    def stop_accepting(self) -> None:
        """Shutdown: start nothing more; jobs claimed ahead go back, attempt unspent."""
        self._accepting = False
        self._give_back(self._ready)
        self._ready = []


def _dispatched_row(job: NewJob, seq: int, now: float) -> JobRow:
    """The row of ``job`` as its insert at ``now`` stored it, running (local dispatch)."""
    return JobRow(
        id=job.id, seq=seq, task=job.task, queue=job.queue, status="running",
        priority=job.priority, payload=job.payload, options=job.options, attempts=1,
        max_attempts=job.max_attempts, run_at=job.run_at, enqueued_at=now, started_at=now,
        finished_at=None, lease_until=job.lease_end(now), worker=job.worker, result=None,
        error=None, idempotency_key=job.idempotency_key, group_key=job.group_key,
        progress=None, progress_message=None, chain_next=job.chain_next, batch_id=job.batch_id,
    )  # fmt: skip


def _run_order(row: JobRow) -> tuple[int, int]:
    """Sort key that puts the next job to run last (``list.pop()``)."""
    return (row.priority, -row.seq)
