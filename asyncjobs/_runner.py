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

This module holds ``Runner`` itself, its state and its claims (``claim``); it
inherits the rest: the claim loops (``_ClaimLoop``, ``_claim_loop.py``), its slots and
local dispatch (``_Slots``, ``_slots.py``), the outbox's writes (``_Outbox``,
``_outbox.py``), heartbeats and lease recovery (``_Leases``, ``_leases.py``) and the
running of one job (``_Execution``, ``_execution.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from asyncjobs._claim_loop import _ClaimLoop
from asyncjobs._execution import JobContext as JobContext
from asyncjobs._execution import _Execution, _Running
from asyncjobs._execution import current_job as current_job
from asyncjobs._leases import _Leases
from asyncjobs._outbox import _Finished, _Outbox
from asyncjobs._slots import _Slots
from asyncjobs.stores._dependents import original_arguments
from asyncjobs.stores._protocol import (
    Claimed,
    ClaimRequest,
    JobRow,
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


_EmptyKeys = dict[tuple[str, str], tuple["RateLimit", float]]
"""Limiter buckets (name, key) found without tokens: their limit, and their next token."""


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Runner(_ClaimLoop, _Slots, _Outbox, _Leases, _Execution):
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
        # Tasks of jobs that shutdown went on without (_Slots.cancel_running): held
        # until they end, as asyncio holds tasks weakly.
        self._left_behind: set[asyncio.Task[None]] = set()
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
        # The shielded store writes under way, and when they are given up on: past the
        # store's deadline (_Outbox.set_store_deadline).
        self._writes_give_up_at: float | None = None
        self._shielded_writes: set[anyio.CancelScope] = set()

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
                self._outbox.append(_Finished(row, outcome, 0.0))
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

    def _give_back(self, rows: Sequence[JobRow]) -> None:
        """Queue jobs that never started to go back with the next write, attempt unspent."""
        for row in rows:
            self._outbox.append(_Finished(row, self._outcome(row, OutcomeKind.RELEASE), 0.0))

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
                with self._by_store_deadline():
                    if outbox:
                        applied, rows = await self.jobs.store.finish_and_claim(
                            [finished.outcome for finished in outbox], request, now=now
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
        held = {(finished.row.id, finished.row.attempts) for finished in self._outbox}
        held.update((row.id, row.attempts) for row in self._ready)
        held.update((job.row.id, job.row.attempts) for job in self.running.values())
        return [
            row
            for row in rows
            if (row.id, row.attempts) not in held and row.id not in self._reserved
        ]
