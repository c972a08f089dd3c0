"""The runner: claim ready jobs, run them under limits, ack the outcome.

One ``Runner`` per ``Jobs``. ``serve`` is the long-lived loop used when workers
are started; ``drain`` runs ready jobs until none is left (tests, scripts).

The hot path costs one store round trip per batch, not per job: a finished job
frees its slot at once and leaves its outcome in the outbox; the next claim
writes the outbox and takes new jobs in the same transaction
(``Store.finish_and_claim``). Result waiters are told, and the transition
logged, only once the outcome is durable.

Short jobs are claimed a little ahead: while a claim is in flight the slots keep
running jobs claimed by the previous one, so the event loop and the store work at
the same time instead of taking turns. How far ahead is bounded by how long the
recent jobs took (see ``_PREFETCH_WAIT``), so long jobs are never hoarded by one
process; jobs claimed ahead are given back, attempt unspent, when workers stop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from asyncjobs._clock import within
from asyncjobs._errors import AsyncJobsError, DataRefused
from asyncjobs._execution import JobContext as JobContext
from asyncjobs._execution import _Execution, _Running
from asyncjobs._execution import current_job as current_job
from asyncjobs._leases import _Leases
from asyncjobs.stores._dependents import original_arguments
from asyncjobs.stores._protocol import (
    Applied,
    Claimed,
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    Outcome,
    OutcomeKind,
    RateKeyed,
    TaskLimits,
)

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs
    from asyncjobs._ratelimit import RateLimit
    from asyncjobs.stores import Store

logger = logging.getLogger("asyncjobs")

# A job claimed ahead waits for a free slot about this long on average, at most: the
# look-ahead is concurrency * _PREFETCH_WAIT / (recent mean job duration), capped at
# _PREFETCH_MAX * concurrency. Jobs under about 1.7 ms get the full look-ahead, 10 ms
# jobs one per two slots, 100 ms jobs one per twenty, 1 s jobs none.
_PREFETCH_WAIT = 0.005
# At most this many jobs per slot are claimed ahead: with the running ones, 4 per slot
# in hand, as Celery's default prefetch. A claim of 40 no-op jobs instead of 20 (at
# concurrency 10) wrote about 20% more jobs per second: one commit per batch.
_PREFETCH_MAX = 3

# At most this many jobs per claim (a larger room is filled by the next claims): the
# transaction stays short enough for the SQLite store to run it on the event loop.
_CLAIM_MAX = 100

# Seconds a job cancelled at shutdown has to end (its cleanup, its finally blocks)
# before shutdown goes on without it: one that ignores the cancellation (catches
# CancelledError and carries on) would otherwise hold the process forever.
CANCEL_GRACE = 5.0

# Seconds shutdown goes on trying to write the last outcomes (the last jobs' results,
# the jobs cut off and given back) while the store fails or is held by another process,
# their leases renewed meanwhile. Past that, those jobs run again once their leases
# expire, as after a crash: a job that succeeded runs twice, and one cut off on its last
# attempt ends dead.
FINAL_WRITE_TIME = 5.0

# Seconds the outcomes of finished jobs wait, when every slot is busy or promised, for a
# slot to free: the claim it makes writes them in the same transaction. Past that they
# are written alone, so result waiters and follow-up jobs do not wait on long jobs.
_OUTBOX_DELAY = 0.01


_EmptyKeys = dict[tuple[str, str], tuple["RateLimit", float]]
"""Limiter buckets (name, key) found without tokens: their limit, and their next token."""

_Finished = tuple[JobRow, Outcome, float]
"""A job that ended, its outcome, and how long it ran."""

# Outcomes that carry data of their own (a result, an error) the database may refuse.
_REFUSABLE = frozenset({OutcomeKind.SUCCEEDED, OutcomeKind.RETRY, OutcomeKind.DEAD})


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Runner(_Leases, _Execution):
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.clock = jobs.settings.clock
        self.worker_id = _worker_id()
        self._pid = os.getpid()
        self.started_at = self.clock.now()
        self.running: dict[str, _Running] = {}
        # Earlier attempts stopped because their job was claimed again here (``_start``):
        # each keeps its slot until its task ends.
        self._stopping: list[_Running] = []
        self.jobs_started = 0  # attempts started here, ever: drain() bounds its own
        # While a drain() runs: start none once jobs_started is this.
        self._start_limit: int | None = None
        # Claimed ahead, waiting for a slot; popped from the end (highest priority first).
        self._ready: list[JobRow] = []
        self._accepting = True  # False once shutdown begins: nothing new starts
        # Each job runs in a copy of this context (taken when the workers start), so
        # context variables a job sets never leak into another job or into the code
        # whose enqueue dispatched it.
        self._context = contextvars.copy_context()
        self._mean_duration: float | None = None  # recent jobs, moving average
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._outbox: list[_Finished] = []  # finished, outcome not yet written
        # Per job held, the attempt the last successful heartbeat renewed, and its lease
        # end then (_Leases._lease_end). Written by heartbeats only: a claim's row carries
        # its own lease.
        self._confirmed: dict[str, tuple[int, float]] = {}
        # Outboxes taken by writes under way: their leases are renewed too (_take_outbox).
        self._writing: list[list[_Finished]] = []
        self._next_token_at: float | None = None
        self._partial = False  # the last claim looked at only some jobs (Claimed.partial)
        # Keys whose bucket a claim found without tokens, until their next one (the
        # claims' memory: ClaimRequest.empty_keys), and the store they were found in.
        self._empty_keys: tuple[Store | None, _EmptyKeys] = (None, {})
        # Local dispatch (reserve / dispatched): ids of jobs being inserted running,
        # each holding a slot; whether the last claim left ready jobs behind; and how
        # many jobs reserve() sent to the queue for want of a free slot (see claim).
        self._reserved: set[str] = set()
        self._backlog = True
        self._queued_for_room = 0
        # Claims awaiting the store, and the jobs cancelled here meanwhile that were not
        # in hand: one of those claims may have taken them (cancel_local, claim).
        self._claims_under_way = 0
        self._cancelled_unseen: set[str] = set()

    def starting(self) -> None:
        """The workers start: in a process forked after this ``Jobs`` was built (a
        prefork server that imported the app first), under an id of their own, not
        the parent's, which every forked sibling would share."""
        if os.getpid() != self._pid:
            self.worker_id, self._pid = _worker_id(), os.getpid()
            self.started_at = self.clock.now()

    # -- signals ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """Is a ``drain()`` running?"""
        return self._start_limit is not None

    @property
    def accepting(self) -> bool:
        """Is a claim loop running (the workers' or a ``drain()``)?"""
        return self._accepting

    def wake(self) -> None:
        """A job was enqueued locally: claim now instead of at the next poll."""
        self._wakeup.set()

    def cancel_local(self, job_id: str, attempt: int | None = None) -> None:
        """Stop this process's attempt at ``job_id`` (only attempt ``attempt``, if given):
        cancelled (by the user), or lost (its lease expired). Its outcome, cancelled, is
        written; the store ignores it for an attempt that is no longer this worker's."""

        def this(row: JobRow) -> bool:
            return row.id == job_id and attempt in (None, row.attempts)

        dropped = [row for row in self._ready if this(row)]
        if dropped:  # claimed ahead, not started: it never will be
            self._ready = [row for row in self._ready if not this(row)]
            for row in dropped:
                outcome = self._outcome(row, OutcomeKind.CANCELLED, error="cancelled before it ran")
                self._outbox.append((row, outcome, 0.0))
            self._free_slot()  # the claim loop may wait for room: it writes the outcome
            self.wake()
        running = self.running.get(job_id)
        if not dropped and running is None and attempt is None and self._claims_under_way:
            self._cancelled_unseen.add(job_id)  # a claim under way may have taken it
        # Once: a job being stopped (every heartbeat finds it asked to stop until it
        # has) is not cancelled again, which would cut its cleanup short.
        if running is not None and this(running.row) and not running.cancelled_by_user:
            running.cancelled_by_user = True
            if running.started and running.task is not None:
                running.task.cancel()  # else it sees the flag before it starts

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

    # -- claiming --------------------------------------------------------------------

    def _request(self, limit: int, *, ahead: int = 0) -> ClaimRequest:
        tasks = {
            name: TaskLimits(
                max_attempts=task.retries + 1,
                concurrency=task.concurrency,
                limiter=task.limiter,
                rate_limit=task.rate_limit,
            )
            for name, task in self.jobs.registry.items()
        }
        return ClaimRequest(
            worker=self.worker_id,
            tasks=tasks,
            queues=self.settings.queues,
            limit=limit,
            lease=self.settings.visibility_timeout,
            queue_concurrency=self.jobs.queue_limits,
            limiters={name: limiter.limit for name, limiter in self.jobs.limiters.items()},
            ahead=ahead,
            keyed=frozenset(name for name, lim in self.jobs.limiters.items() if lim.key),
            empty_keys=self._known_empty_keys(),
            clock=self.clock.now,  # the lease counts from when the store holds the lock
        )

    def _known_empty_keys(self) -> _EmptyKeys:
        store, known = self._empty_keys
        if store is not self.jobs.store:  # another store's buckets (replace_store)
            known = {}
            self._empty_keys = (self.jobs.store, known)
        return known

    @property
    def _held(self) -> int:
        """Slots held by a job's task: running, or a stale attempt being stopped."""
        return len(self.running) + len(self._stopping)

    @property
    def _busy(self) -> int:
        """Slots taken or promised: held, claimed ahead, or being dispatched."""
        return self._held + len(self._ready) + len(self._reserved)

    @property
    def room(self) -> int:
        """How many jobs to claim now: free slots plus the look-ahead not yet filled."""
        return self.settings.concurrency + self._look_ahead() - self._busy

    def _look_ahead(self) -> int:
        mean = self._mean_duration
        if mean is None or not self._accepting:
            return 0  # nothing ran yet: no idea how long a slot stays busy
        cap = _PREFETCH_MAX * self.settings.concurrency
        if mean <= 0:
            return cap
        return min(cap, int(self.settings.concurrency * _PREFETCH_WAIT / mean))

    async def claim(self) -> int:
        """Write the outbox, claim up to ``room`` jobs and start those that have a slot.

        Returns how many jobs were claimed plus how many outcomes were written.
        """
        room = min(self.room, _CLAIM_MAX)
        self._partial = False
        if not self.jobs.registry:
            return 0
        if room <= 0:
            return await self._write_outbox()
        # Shielded: shutdown cancels the claim loop, but a claim the store committed must
        # reach self.running, or its jobs stay 'running' until their lease expires and
        # spend an attempt they never had.
        with self._take_outbox() as outbox, anyio.CancelScope(shield=True):
            # Beyond the free slots, jobs are claimed ahead: the store skips those on
            # their last attempt (a kill -9 before they start would leave them dead).
            free = max(0, self.settings.concurrency - self._busy)
            request = self._request(room, ahead=max(0, room - free))
            now = self.clock.now()
            queued_for_room = self._queued_for_room
            self._claims_under_way += 1
            try:
                if outbox:
                    applied, rows = await self.jobs.store.finish_and_claim(
                        [outcome for _, outcome, _ in outbox], request, now=now
                    )
                else:
                    applied, rows = [], await self.jobs.store.claim(request, now=now)
            except BaseException as error:
                written = await self._put_back(outbox, error)
                if written:
                    self._backlog = True  # claim next round, at once
                    return written
                raise
            finally:
                self._claims_under_way -= 1
                cancelled = self._cancelled_unseen
                if not self._claims_under_way:  # also after a claim that failed: the
                    self._cancelled_unseen = set()  # ids are of no claim's jobs then
        self._acknowledged(outbox, applied)
        # When a ready job was held back by an empty rate-limit bucket: its next token.
        self._next_token_at = rows.next_token_at if isinstance(rows, Claimed) else None
        self._partial = isinstance(rows, Claimed) and rows.partial
        # A full claim, or every free slot filled (jobs on their last attempt may wait
        # behind those claimed ahead): more may be ready. So may a job queued here for
        # want of a slot while the claim was under way: it may have read the store first.
        self._backlog = (
            len(rows) >= room or 0 < free <= len(rows) or self._queued_for_room != queued_for_room
        )
        if rows:
            handed_back = isinstance(rows, Claimed) and rows.handed_back
            self._add_ready(self._not_held(rows) if handed_back else rows)
            for row in rows:
                if row.id in cancelled:  # cancelled here as this claim took it
                    self.cancel_local(row.id)
        keyed = 0
        if isinstance(rows, Claimed) and rows.unkeyed:
            keyed = await self.assign_keys()
            if keyed:  # their limiter's jobs were held back: claim again
                self._backlog = True
        return len(rows) + len(outbox) + keyed

    async def assign_keys(self) -> int:
        """Compute the rate-limit keys of jobs enqueued by name where their task was not
        defined (``NewJob.key_pending``), as their enqueue would have, from the arguments
        it gave; return how many. A key that cannot be computed (the key function
        raises, the payload is corrupt) is logged, and the job takes its limiter's
        shared bucket."""
        keyed = {name: lim for name, lim in self.jobs.limiters.items() if lim.key}
        tasks = [name for name, task in self.jobs.registry.items() if task.limiter in keyed]
        rows = await self.jobs.store.pending_keys(tasks, limit=_CLAIM_MAX)
        keys: list[RateKeyed] = []
        for row in rows:
            limiter = keyed[self.jobs.registry[row.task].limiter or ""]
            try:
                args, kwargs = original_arguments(row.payload, row.options)
                key = limiter.key_for(tuple(args), kwargs)
            except Exception as error:  # the user's key function, or a corrupt payload
                logger.error(
                    "job %s (task %s, enqueued by name): the key of limiter %r could not be "
                    "computed (%s: %s); it takes the limiter's shared bucket", row.id,
                    row.task, limiter.name, type(error).__name__, error,
                    extra={"job_id": row.id, "task": row.task, "limiter": limiter.name},
                )  # fmt: skip
                key = None
            keys.append(RateKeyed(row.id, key))
        await self.jobs.store.set_rate_keys(keys)
        return len(keys)

    def _not_held(self, rows: Sequence[JobRow]) -> list[JobRow]:
        """``rows`` (``handed_back``) less the attempts this worker holds already. A claim
        retried after its reply was lost hands out again the rows its first try took
        (PostgreSQL), found by that try's claim token: none of them should be held here,
        but one handed out twice would run twice, so they are checked all the same."""
        held = {(row.id, row.attempts) for row, _, _ in self._outbox}
        held.update((row.id, row.attempts) for row in self._ready)
        held.update((job.row.id, job.row.attempts) for job in self.running.values())
        return [
            row
            for row in rows
            if (row.id, row.attempts) not in held and row.id not in self._reserved
        ]

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

    async def cancel_running(self) -> None:
        """Cancel the jobs still running and wait for each to record its release
        (``CANCEL_GRACE`` at most).

        A job whose task was cancelled before its first step never ran its code (nor
        ``_execute``'s cleanup): it goes back unspent here. Nothing new starts.
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
        self.running.clear()
        self._give_back(never_started)
        self._free_slot()

    def stop_accepting(self) -> None:
        """Shutdown: start nothing more; jobs claimed ahead go back, attempt unspent."""
        self._accepting = False
        self._give_back(self._ready)
        self._ready = []

    def _give_back(self, rows: Sequence[JobRow]) -> None:
        """Queue jobs that never started to go back with the next write, attempt unspent."""
        for row in rows:
            self._outbox.append((row, self._outcome(row, OutcomeKind.RELEASE), 0.0))

    async def flush_outbox(self) -> int:
        """Write finished jobs' outcomes now (shutdown, or no claim coming); a failed
        write is logged and left for the next one. Returns how many were written."""
        try:
            return await self._write_outbox()
        except Exception:
            # Not "no longer ours", as an outcome the store refused would be logged.
            logger.exception(
                "recording the outcome of %d job(s) failed; the next write tries again, "
                "and if none comes they will run again once their leases expire",
                len(self._outbox),
            )  # fmt: skip
            return 0

    async def flush_last(self) -> None:
        """Shutdown's last write, after ``cancel_running``: the outcomes left, tried
        again until written or ``FINAL_WRITE_TIME`` has passed (the store's waits are
        bounded to it too). Heartbeats go on renewing their leases meanwhile."""
        self.jobs.store.set_deadline(FINAL_WRITE_TIME)
        with within(self.clock, FINAL_WRITE_TIME):
            await self.flush_outbox()
            while self._outbox:
                freed = self._slot_freed  # a job that ignored its cancellation ends
                with within(self.clock, self.settings.poll_interval):
                    await freed.wait()
                await self.flush_outbox()
        for row, outcome, _ in self._outbox:
            logger.error(
                "shutdown: could not record the outcome (%s) of job %s (%s) within %ss; "
                "it will run again once its lease expires", outcome.kind, row.id, row.task,
                FINAL_WRITE_TIME, extra={"job_id": row.id, "task": row.task,
                                         "attempt": row.attempts},
            )  # fmt: skip

    async def _write_outbox(self) -> int:
        if not self._outbox:
            return 0
        with self._take_outbox() as outbox, anyio.CancelScope(shield=True):
            try:
                applied = await self.jobs.store.finish(
                    [outcome for _, outcome, _ in outbox], now=self.clock.now()
                )
            except BaseException as error:
                written = await self._put_back(outbox, error)
                if written:
                    return written
                raise
        self._acknowledged(outbox, applied)
        return len(outbox)

    async def _put_back(self, outbox: list[_Finished], error: BaseException) -> int:
        """After a failed write of ``outbox``: keep it for the next write (heartbeats
        renew its leases meanwhile; a crash leaves them to expire), or, refused as
        data, write it apart at once. Returns how many outcomes that wrote."""
        self._outbox[:0] = outbox
        if outbox and isinstance(error, DataRefused):
            return await self._write_apart()
        return 0

    async def _write_apart(self) -> int:
        """After a write refused as data (``DataRefused``): write the outcomes one at a
        time, so that one the database refuses for good (a result over its size limit)
        holds back neither the others nor this worker, whose claims carry the outbox.
        (After a failure of the store itself, down, locked or timing out, pieces would
        fail the same way: the callers do not come here.)

        An outcome refused as data on its own is recorded as a failed attempt instead:
        the job is retried, or dead when out of attempts, and shows why. Should the
        store fail meanwhile, the outcomes left stay for the next write, their leases
        renewed. Returns how many outcomes were written (the callers shield it)."""
        store, written = self.jobs.store, 0
        with self._take_outbox() as outbox:
            try:
                while outbox:
                    row, outcome, duration = outbox[0]
                    try:
                        applied = await store.finish([outcome], now=self.clock.now())
                    except DataRefused as refused:
                        if outcome.kind not in _REFUSABLE:
                            raise  # nothing of its own to refuse: the store fails
                        outcome = self._failure(row, f"the store refused its outcome: {refused}")
                        applied = await store.finish([outcome], now=self.clock.now())
                        if row.id in applied:
                            logger.error(
                                "the store refused the outcome of job %s (%s); recorded as "
                                "a failed attempt instead: %s", row.id, row.task, refused,
                                extra={"job_id": row.id, "task": row.task,
                                       "attempt": row.attempts},
                            )  # fmt: skip
                    outbox.pop(0)
                    self._acknowledged([(row, outcome, duration)], applied)
                    written += 1
            except Exception:  # the caller raises its own failure, the same store's
                logger.debug("writing outcomes one at a time failed too", exc_info=True)
            finally:
                self._outbox[:0] = outbox
        return written

    @contextmanager
    def _take_outbox(self) -> Iterator[list[_Finished]]:
        """The outbox, taken to be written. Until each outcome is written (or put back
        after a failure), heartbeats still renew its job's lease: else a slow write
        could outlast it and the job run again."""
        outbox, self._outbox = self._outbox, []
        self._writing.append(outbox)
        try:
            yield outbox
        finally:
            self._writing = [taken for taken in self._writing if taken is not outbox]

    def _acknowledged(self, outbox: list[_Finished], applied: Sequence[str]) -> None:
        ids = set(applied)
        cancelled = applied.cancelled if isinstance(applied, Applied) else frozenset()
        for row, outcome, duration in outbox:
            if row.id in cancelled:  # asked to stop while it ran: not retried, cancelled
                outcome = outcome._replace(kind=OutcomeKind.CANCELLED)
            self._log(row, outcome, row.id in ids, duration)
            self.jobs._notify_finished(row.id)

    async def drain(self, *, max_jobs: int) -> None:
        """Run ready jobs until none is ready or running (workers must not be started).

        Past ``max_jobs`` started attempts it stops, with an error: jobs that enqueue
        one another without end would otherwise keep it (and the test) running for good.
        """
        if self.draining:
            # Two claim loops on one runner would replace each other's wake-up event,
            # and both would wait for good.
            raise AsyncJobsError(
                "drain() is already running for this Jobs (in another task, or around this "
                "job): await that one"
            )
        # Started jobs run to their end; past the bound none starts (not one per free
        # slot, cancelled before it ran), and ready jobs left then raise (_drain).
        self._start_limit = limit = self.jobs_started + max_jobs
        try:
            await self._drain(max_jobs, limit)
        finally:
            self._start_limit = None

    async def _drain(self, max_jobs: int, limit: int) -> None:
        await self.recover()
        self._accepting = True
        self._context = contextvars.copy_context()
        drained = False
        try:
            while True:
                self._wakeup = asyncio.Event()  # a job's end, or one enqueued by a job
                if await self.claim() or self._outbox or self._partial:
                    continue  # (a partial claim: the next looks at the rest)
                if not self.running and not self._ready:
                    # A claim makes only so many due jobs ready (DUE_PER_CLAIM), and
                    # those may all be other processes' tasks: claim until none is due.
                    due = await self._next_run_at()
                    if due is None or due > self.clock.now() or not self.jobs.registry:
                        drained = True
                        break  # (with no task, claim() makes nothing ready)
                    continue
                if not self.running and self.jobs_started >= limit:
                    raise AsyncJobsError(
                        f"drain() started {max_jobs:,} jobs and more are still ready: do jobs "
                        "enqueue one another without end (a task that enqueues itself)? "
                        "Give the follow-up a delay, so it waits for jobs.clock.advance(), "
                        "or pass drain(jobs, max_jobs=...) for more"
                    )
                await self._wakeup.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self.cancel_running()  # drain itself was cancelled
                await self.flush_outbox()
            if not drained:
                # Cut short (a store error, a cancellation): a claim whose answer was
                # lost may have taken jobs unseen (the PostgreSQL store keeps track), and
                # no later claim of this drain hands them out, nor does any heartbeat
                # keep them. Record a stop, as the workers do: that gives them back,
                # attempt unspent, instead of leaving them to wait out their leases and
                # spend an attempt. (Run to its end, a drain's last claim handed them out.)
                with anyio.CancelScope(shield=True), self.clock.move_on_after(5):
                    await self.record_beat(stopped=True)

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        """Claim loop: runs until cancelled (that is how shutdown stops claiming); each
        job runs in a task of its own (``_start_ready``)."""
        self._accepting = True
        self._context = contextvars.copy_context()
        task_status.started()
        try:
            await self._serve(hears=self.jobs.store.on_change(self.wake))
        finally:
            self.jobs.store.on_change(None)
            self.stop_accepting()

    async def _serve(self, *, hears: bool) -> None:
        """``hears``: the store wakes this runner when another process writes (``wake``,
        through ``Store.on_change``); the runner still looks every 0.1 s, in case its
        listener is down."""
        check_every = min(self.settings.poll_interval, 0.1)
        last_full_poll = self.clock.now()
        looked_at = -math.inf  # the last look at the store before an idle wait
        if hears:
            # The listener opens before the first claim, which is the look its opening
            # calls for (what was written before it listened went unheard). Opened at
            # the first idle wait instead, it made the runner claim again for nothing.
            await self._store_changed()
        while True:
            if self.room <= 0:
                await self._wait_for_room()
                continue
            self._wakeup = asyncio.Event()
            try:
                claimed = await self.claim()  # also writes finished outcomes
            except Exception:
                logger.exception(
                    "writing outcomes and claiming jobs failed; retrying in %.1fs",
                    self.settings.poll_interval,
                )
                await self.clock.sleep(self.settings.poll_interval)
                continue
            last_full_poll = self.clock.now()
            if claimed and self._backlog:
                # More may be ready: claim again now, or (when full) as soon as a slot
                # frees at the top of the loop, not after the poll interval. Otherwise
                # the claim found every ready job: another would find none (under
                # load, that empty claim cost about as much as the write before it).
                continue
            # Idle: sleep until a local enqueue or a job's end, another process's write,
            # the next scheduled job, or the poll interval.
            wake_at = last_full_poll + self.settings.poll_interval
            # With no task, a claim neither runs nor queues the jobs that come due: waking
            # for one would find it due again at once, forever (on SQLite, without a wait).
            next_run = await self._next_run_at() if self.jobs.registry else None
            if next_run is not None:
                wake_at = min(wake_at, next_run)
            if self._next_token_at is not None:
                wake_at = min(wake_at, self._next_token_at)
            if self._partial:  # the claim looked at some of the jobs: the rest at the next look
                wake_at = min(wake_at, self.clock.now() + check_every)
            # A store that hears of writes: its listener open (or reopened) before the
            # wait, so a write from now on wakes it; one heard meanwhile: claim again. As
            # often as the wait below looks at most: a listener the server keeps closing
            # must not make this loop reconnect and claim without a pause.
            if hears and self.clock.now() >= looked_at + check_every:
                looked_at = self.clock.now()
                if await self._store_changed():
                    continue
            if wake_at <= self.clock.now():
                # The poll interval passed during the claim (one shorter than a claim):
                # claim again, but let the loop in first. On SQLite the claim and the
                # reads above may not yield, and shutdown cancels this loop only where it
                # yields outside the shielded claim: stop() would wait for ever.
                await anyio.lowlevel.checkpoint()
                continue
            while True:
                remaining = wake_at - self.clock.now()
                if remaining <= 0 or self._wakeup.is_set():
                    break
                with self.clock.move_on_after(min(check_every, remaining)):
                    await self._wakeup.wait()
                if self._wakeup.is_set():
                    break
                if await self._store_changed():
                    break

    async def _wait_for_room(self) -> None:
        """Every slot is busy or promised: wait until one frees. The outcomes of jobs
        that ended meanwhile wait ``_OUTBOX_DELAY`` at most for the claim that slot
        makes, then go alone (long jobs may hold every slot for minutes)."""
        # The event of the slot that frees next, taken before any write: a job that
        # ends during the write sets this one and puts a new one in its place.
        freed = self._slot_freed
        if self._outbox:
            with within(self.clock, _OUTBOX_DELAY):
                await freed.wait()
            if self.room > 0:
                return
            freed = self._slot_freed
            if not await self.flush_outbox():  # the write failed (logged): pause
                with within(self.clock, self.settings.poll_interval):
                    await freed.wait()
                return
        await freed.wait()
        # Jobs acked in one write free their slots in the next few loop iterations;
        # claim once for all of them rather than one by one.
        for _ in range(3):
            await anyio.lowlevel.checkpoint()

    async def _next_run_at(self) -> float | None:
        try:
            return await self.jobs.store.next_run_at()
        except Exception:
            logger.exception("reading the next scheduled job failed")
            return None

    async def _store_changed(self) -> bool:
        try:
            return await self.jobs.store.changed()
        except Exception:
            logger.exception("checking the store for changes failed")
            return False

    # -- slots -----------------------------------------------------------------------

    def _complete(self, running: _Running, outcome: Outcome | None, started: float) -> None:
        """Free the slot now (for the next job claimed ahead, if any); the outcome is
        written by the next claim (or flush)."""
        row = running.row
        # The wall clock: set back while the job ran (NTP), it gave a negative duration,
        # which held the mean below zero for dozens of jobs (full look-ahead) and was logged.
        duration = max(0.0, self.clock.now() - started)
        if outcome is not None:
            self._outbox.append((row, outcome, duration))
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

    async def wait_idle(self) -> None:
        """Shutdown: wait until no job runs, writing each outcome as its job ends (no
        claim comes to write it; left for the end, a job that finished early would stay
        running in the store while others run on, and its lease could expire)."""
        await self.flush_outbox()  # jobs claimed ahead, given back when shutdown began
        while self.running or self._stopping or self._reserved:
            freed = self._slot_freed  # before the write: a job may end during it
            if self._outbox and await self.flush_outbox():
                continue
            if self._outbox:  # the write failed (logged): again after a pause
                with within(self.clock, self.settings.poll_interval):
                    await freed.wait()
            else:
                await freed.wait()


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
