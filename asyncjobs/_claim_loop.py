"""The claim loops: ``serve``, the workers' long-lived loop, and ``drain``, which runs
ready jobs until none is left (tests, scripts). Each claims (``Runner.claim``) when a
slot is free and something may be ready: a job enqueued here or by another process, the
next scheduled job or rate-limit token, or the poll interval.

``_ClaimLoop`` holds these methods of ``Runner``, which inherits them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math

import anyio
from anyio.abc import TaskStatus

from asyncjobs._clock import within
from asyncjobs._errors import AsyncJobsError
from asyncjobs._leases import FINAL_RECORD_TIME
from asyncjobs._runner_state import _RunnerState

logger = logging.getLogger("asyncjobs")


# Seconds the outcomes of finished jobs wait, when every slot is busy or promised, for a
# slot to free: the claim it makes writes them in the same transaction. Past that they
# are written alone, so result waiters and follow-up jobs do not wait on long jobs.
_OUTBOX_DELAY = 0.01


class _ClaimLoop(_RunnerState):
    """``Runner``'s claim loops (``serve``, ``drain``)."""

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
                with anyio.CancelScope(shield=True), within(self.clock, FINAL_RECORD_TIME):
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
