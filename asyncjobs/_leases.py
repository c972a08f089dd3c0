"""Leases: ``Runner``'s heartbeats, which extend the leases of the jobs it holds and
record this worker in the store, and lease recovery, which requeues the jobs of a
worker that died (``recover``, run with pruning by ``maintenance_loop``).

A worker whose heartbeats fail (the store unreachable, a disk error) stops its own
attempts before their leases run out: once a lease ends, any process's recovery may
requeue the job and another worker start it, and the two attempts would overlap
(``_watch_leases``).

``_Leases`` holds these methods of ``Runner``, which inherits them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from asyncjobs._clock import within
from asyncjobs._execution import CANCELLED_WHILE_RUNNING
from asyncjobs._outbox import _Finished
from asyncjobs._retention import Pruner
from asyncjobs._runner_state import _RunnerState
from asyncjobs.stores._protocol import JobRow, OutcomeKind, WorkerBeat

if TYPE_CHECKING:
    from asyncjobs._execution import _Running

logger = logging.getLogger("asyncjobs")

# Seconds shutdown (and a drain cut short) gives its last worker record, the one that
# says this worker stopped, of the clock's time and of real time: a test's fake clock
# that nobody advances must not hold stop() for good behind a store that hangs.
FINAL_RECORD_TIME = 5.0
# Seconds start() waits for the first worker record, of the clock's time and of real
# time: one that hangs (a locked workers table) must not hold the app's startup for
# good. Cut off, it is tried again at the next heartbeat.
FIRST_RECORD_TIME = 5.0


class _Leases(_RunnerState):
    """``Runner``'s heartbeat, worker record and lease recovery loops."""

    # -- leases ----------------------------------------------------------------------

    async def heartbeat_once(self) -> None:
        """Extend our leases; cancel local jobs that are no longer ours."""
        # The attempt each job is at now: by the time the store answers, a job may have
        # ended and been claimed again here, and that attempt is not the one asked about.
        rows = {job_id: running.row for job_id, running in self.running.items()}
        rows.update((row.id, row) for row in self._ready)
        held = {job_id: row.attempts for job_id, row in rows.items()}
        # Jobs that ended but whose outcome is not written yet are ours too: while every
        # slot is busy, or a write fails, their lease must not run out (they would run
        # again). One that is not ours any more needs nothing: its write is ignored.
        ended = {finished.row.id: finished.row.attempts for finished in self._outbox}
        ended.update((f.row.id, f.row.attempts) for taken in self._writing for f in taken)
        if not held and not ended:
            self._confirmed = {}
            return
        granted: list[float] = []

        def lease_until() -> float:
            granted.append(self._lease_until())
            return granted[-1]

        owned = await self.jobs.store.heartbeat(
            list(ended.keys() | held.keys()), worker=self.worker_id, lease_until=lease_until
        )
        if granted:  # the lease the store wrote: the last it asked for (it may retry)
            attempts = ended | held
            self._confirmed = {job_id: (attempts[job_id], granted[-1]) for job_id in owned}
            for job_id in attempts.keys() - owned:  # cancelled, or taken over
                self.cancel_asked(job_id, attempts[job_id])
        # Of those left out, only the attempts still held here were taken away. One that
        # ended while the store was asked may have had its outcome written before this
        # update ran, and the store rightly left it out: nothing to stop, and its write
        # tells whether it was still ours (a true loss is logged there, by _log).
        lost = [
            job_id
            for job_id, attempt in held.items()
            if job_id not in owned and self._holds(job_id, attempt)
        ]
        for job_id in lost:
            running = self.running.get(job_id)
            if (
                running is not None
                and running.cancelled_by_user
                and running.row.attempts == held[job_id]
            ):
                # Being stopped already (cancelled here, or found lost by an earlier
                # heartbeat), its cleanup not over: cancel_local would do nothing.
                continue
            # Running here: stop it. Claimed ahead and not started: never start it.
            extra = {"job_id": job_id, "task": rows[job_id].task, "attempt": held[job_id]}
            logger.warning(
                "job %s is no longer ours (cancelled, or lease expired); stopping it", job_id,
                extra=extra,
            )  # fmt: skip
            self.cancel_local(job_id, held[job_id])
        if lost:
            self.wake()  # a slot promised to a job claimed ahead may be free again

    def cancel_asked(self, job_id: str, attempt: int | None = None) -> None:
        """The user cancelled ``job_id`` (only attempt ``attempt``, if given), or the
        store no longer holds it as this worker's. An attempt here stopped for its lease
        (``_lose``) ends cancelled, as the user asked, not a failed attempt whose error
        says 'lease lost' (the store ends it cancelled all the same, with that error).

        Taken over instead, the job is not this worker's: the outcome, whichever, is
        ignored. Its outcome written already (``_writing``), nothing is left to say."""
        running = self.running.get(job_id)
        if running is not None and running.lease_lost and attempt in (None, running.row.attempts):
            running.cancel_asked = True
        for i, finished in enumerate(self._outbox):
            row, raised = finished.row, finished.lease_lost
            if row.id == job_id and attempt in (None, row.attempts) and raised is not None:
                error = CANCELLED_WHILE_RUNNING + raised
                cancelled = self._outcome(row, OutcomeKind.CANCELLED, error=error)
                self._outbox[i] = _Finished(row, cancelled, finished.duration)

    def _lease_until(self) -> float:
        """A lease from now. The store calls it once it holds the lock: counted from
        before a wait for another process's lock, the lease would be short by that wait."""
        return self.clock.now() + self.settings.visibility_timeout

    # -- leases that cannot be renewed -----------------------------------------------

    def _lease_end(self, row: JobRow) -> float | None:
        """Until when this worker's lease of attempt ``row`` is known to hold: its claim's
        lease, or the last a successful heartbeat wrote for that attempt."""
        attempt, renewed = self._confirmed.get(row.id, (0, -math.inf))
        if attempt == row.attempts and (row.lease_until is None or renewed > row.lease_until):
            return renewed
        return row.lease_until

    def _lapsing(self, now: float) -> tuple[list[JobRow], float]:
        """The attempts held here (running, or claimed ahead) to stop now, their leases
        ending within half a heartbeat interval unrenewed; and when the next is due.

        Why then: any process's recovery may requeue a job the moment its lease ends
        (``lease_until < now``, by that process's clock), and another worker start it at
        once; the attempt here must have stopped before, its cleanup included. Not a
        whole interval before: the last heartbeat before the end comes about then, and
        it must have its chance to renew the lease. Half an interval is left to it, and
        half to the job's cleanup (its ``finally`` blocks) and to clocks a little apart.
        Jobs that ended, their outcome not written yet, are left alone: nothing of
        theirs runs, and their outcome, written late, is ignored if the job ran again."""
        margin = self.settings.heartbeat_interval / 2
        rows = [r.row for r in self.running.values() if not self._being_stopped(r)]
        rows.extend(self._ready)  # (one being stopped already, above, is not again)
        lapsing: list[JobRow] = []
        due = math.inf
        for row in rows:
            end = self._lease_end(row)
            if end is None:
                continue
            if end - margin <= now:
                lapsing.append(row)
            else:
                due = min(due, end - margin)
        return lapsing, due

    def _being_stopped(self, running: _Running) -> bool:
        """Is the attempt being stopped already? Cancelled here (by the user, or as its
        lease was lost), or by shutdown, which cancels every job left at its end
        (``cancel_running``) and gives it back. Cancelled again, its cleanup (its
        ``finally`` blocks) would be cut short."""
        if running.cancelled_by_user:
            return True
        task = running.task
        return not self._accepting and task is not None and task.cancelling() > 0

    def _stop_lapsing(self) -> float:
        """Stop the attempts whose leases are about to end unrenewed (``_lapsing``);
        return when the next lease is due to be given up."""
        now = self.clock.now()
        lapsing, due = self._lapsing(now)
        for row in lapsing:
            end = self._lease_end(row) or now
            logger.warning(
                "job %s (%s): its lease could not be renewed (heartbeats failing) and ends "
                "in %.1fs; stopping attempt %d, which another worker may start then",
                row.id, row.task, end - now, row.attempts,
                extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
            )  # fmt: skip
            self._lose(row)
        if lapsing:
            self.wake()  # write their outcomes; a slot promised to one may be free again
        return due

    def _lose(self, row: JobRow) -> None:
        """Stop attempt ``row``, its lease lost: running, it is cancelled, and ends a
        failed attempt (``_Running.lease_lost``); claimed ahead, it goes back unstarted,
        attempt unspent. Not as ``cancelled``: the store may still hold it as this
        worker's, and would end it so, though nobody asked."""
        if any(ready is row for ready in self._ready):
            self._ready = [ready for ready in self._ready if ready is not row]
            self._give_back([row])
            self._free_slot()  # the claim loop may wait for room: it writes the release
            return
        running = self.running.get(row.id)
        if running is not None and running.row is row:
            running.lease_lost = True
            self.cancel_local(row.id, row.attempts)

    def _report_overruns(self) -> float:
        """Report, once each, the attempts stopped for their lease (``_lose``) that still
        run as it ends unrenewed (their code caught the cancellation and went on, or
        their cleanup takes that long): another worker may run the job at the same time
        from then on. Nothing more stops them (shutdown reports such a job too). Return
        when the next such lease ends."""
        now = self.clock.now()
        due = math.inf
        for running in [*self.running.values(), *self._stopping]:
            task, row = running.task, running.row
            if not running.lease_lost or running.overran or task is None or task.done():
                continue
            end = self._lease_end(row)
            if end is None:
                continue
            if end > now:
                due = min(due, end)
                continue
            running.overran = True
            logger.error(
                "job %s (%s): attempt %d, stopped as its lease could not be renewed, "
                "still runs as the lease ends (it caught its cancellation, or its cleanup "
                "takes that long): another worker may run the job at the same time",
                row.id, row.task, row.attempts,
                extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
            )  # fmt: skip
        return due

    async def _watch_leases(self) -> None:
        """The heartbeat loop's watch: stops each attempt whose lease is about to end
        unrenewed (``_lapsing``). A task of its own, on a timer of its own: a heartbeat
        or a worker record may wait on an unreachable store for longer than a lease.

        A failure of its own (a bug) is logged, and it watches on at the next interval:
        raised, it would end the heartbeat loop, whose task group it shares, and with it
        the workers."""
        interval = self.settings.heartbeat_interval
        wake_at = self.clock.now()
        while True:
            try:
                due = await self._watch_once(stalled=self.clock.now() - wake_at > interval / 4)
            except Exception:
                logger.exception("watching the leases of running jobs failed")
                due = math.inf
            wake_at = min(due, self.clock.now() + interval)
            await self.clock.sleep(wake_at - self.clock.now())

    async def _watch_once(self, *, stalled: bool) -> float:
        """Stop the attempts whose leases are about to end unrenewed, report those still
        running past it; return when to look again. ``stalled``: this loop woke late."""
        now = self.clock.now()
        lapsing, _ = self._lapsing(now)
        # Woken late, or a lease over already, not about to be: this loop did not run for
        # a while (the event loop stalled: a blocking call, a suspended machine), nor did
        # the heartbeats, which may not have failed at all. Ask the store (for half an
        # interval at most) before stopping the job: if nobody took it over, the lease
        # is renewed.
        if lapsing and (stalled or any((self._lease_end(r) or now) <= now for r in lapsing)):
            with self.clock.move_on_after(self.settings.heartbeat_interval / 2):
                await self._beat()
        return min(self._stop_lapsing(), self._report_overruns())

    async def _beat(self) -> None:
        try:
            await self.heartbeat_once()
        except Exception:
            logger.exception("heartbeat failed; leases may expire")

    def _holds(self, job_id: str, attempt: int) -> bool:
        """Is attempt ``attempt`` at ``job_id`` running here, or claimed ahead?"""
        running = self.running.get(job_id)
        if running is not None and running.row.attempts == attempt:
            return True
        return any(row.id == job_id and row.attempts == attempt for row in self._ready)

    async def heartbeat_loop(self, *, task_status: TaskStatus[None]) -> None:
        self.started_at = self.clock.now()
        recorded_first = False
        with within(self.clock, FIRST_RECORD_TIME):
            await self.record_beat()
            recorded_first = True
        if not recorded_first:
            logger.warning(
                "recording this worker's heartbeat took over %.1fs as the workers started; "
                "cut off, tried again at the next heartbeat", FIRST_RECORD_TIME,
            )  # fmt: skip
        task_status.started()
        interval = self.settings.heartbeat_interval
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._watch_leases)
                recorded = anyio.Event()
                recorded.set()
                # Every interval from the last beat's start, not its end: a beat that
                # fails slowly does not push back the next, the last chance (_lapsing).
                beat_at = self.clock.now()
                while True:
                    beat_at = max(beat_at + interval, self.clock.now())
                    await self.clock.sleep(beat_at - self.clock.now())
                    await self._beat()
                    # The worker record (stats, the dashboard) in a task of its own: a
                    # write of it that hangs (a locked table, a stuck connection) must
                    # not push back the next beat, which renews the leases. One at a
                    # time: while the last is still under way, this beat records none.
                    if recorded.is_set():
                        recorded = anyio.Event()
                        tasks.start_soon(self._record_apart, recorded)
        finally:
            with anyio.CancelScope(shield=True), within(self.clock, FINAL_RECORD_TIME):
                await self.record_beat(stopped=True)

    async def _record_apart(self, recorded: anyio.Event) -> None:
        """The heartbeat loop's worker record, cut off after a heartbeat interval: one
        that hangs for good (a stuck connection) does not keep the next from trying."""
        interval = self.settings.heartbeat_interval
        try:
            with self.clock.move_on_after(interval) as scope:
                await self.record_beat()
            if scope.cancelled_caught:
                logger.warning(
                    "recording this worker's heartbeat took over %.1fs; cut off, tried "
                    "again at the next heartbeat (the leases are renewed apart)", interval,
                )  # fmt: skip
        finally:
            recorded.set()

    async def record_beat(self, *, stopped: bool = False) -> None:
        """Upsert this process in the store's workers table (``jobs.stats()["workers"]``)."""
        beat = WorkerBeat(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            running=0 if stopped else len(self.running),
            concurrency=self.settings.concurrency,
            queues=self.settings.queues,
            stopped=stopped,
            visibility_timeout=self.settings.visibility_timeout,
        )
        try:
            await self.jobs.store.record_worker(beat, now=self.clock.now())
        except Exception:
            logger.exception("recording this worker's heartbeat failed")

    async def recover(self) -> None:
        """Requeue jobs whose lease expired (their worker died)."""
        # This process's own leases first. After the event loop stalled past them (a
        # blocking call, a suspended machine), this loop may wake before the heartbeat
        # loop does: it would requeue jobs still running here, which would be stopped
        # and run again, an attempt spent, though nothing crashed. Failing, it stops the
        # attempts whose leases end: they would be requeued while they still run here.
        try:
            await self.heartbeat_once()
        except Exception:
            logger.exception("heartbeat failed; leases may expire")
            self._stop_lapsing()
        await self._let_stopped_attempts_end()
        for job in await self.jobs.store.recover(now=self.clock.now()):
            extra = {"job_id": job.id, "task": job.task, "attempt": job.attempts}
            if job.status == "dead":
                logger.error(
                    "job %s (%s) is dead: its lease expired on its last attempt (%d)",
                    job.id, job.task, job.attempts, extra=extra,
                )  # fmt: skip
            elif job.status == "cancelled":
                logger.info(
                    "job %s (%s) is cancelled: its worker stopped heartbeating before it "
                    "stopped the job", job.id, job.task, extra=extra,
                )  # fmt: skip
            else:
                logger.warning(
                    "job %s (%s) requeued: its lease expired during attempt %d",
                    job.id, job.task, job.attempts, extra=extra,
                )  # fmt: skip
            # Our own write wakes nobody at once (no NOTIFY; SQLite's data_version is
            # read at the next poll): claim now, not then, the job requeued, or what its
            # end freed (the next job of its group, its concurrency slot).
            self.wake()

    async def _let_stopped_attempts_end(self) -> None:
        """Before this process requeues the jobs whose leases are over: wait for those of
        its own attempts stopped for their lease (``_lose``) to end, their cleanup (their
        ``finally`` blocks) included. The stop only asked for it: requeued at once, the
        job could start on another worker while this attempt still cleans up.

        Half a heartbeat interval at most, the time a stop leaves a job's cleanup before
        its lease ends: a job that ignores its stop (reported, ``_report_overruns``) does
        not hold up the recovery of other workers' jobs for good. Of the clock's time and
        of real time: under a fake clock nobody advances, an attempt that outlived
        shutdown would hold the next start() or drain(), which recover first, for good."""
        now = self.clock.now()
        tasks = [
            running.task
            for running in [*self.running.values(), *self._stopping]
            if running.lease_lost
            and running.task is not None
            and not running.task.done()
            and (self._lease_end(running.row) or now) <= now  # requeued now, else not
        ]
        if tasks:
            with within(self.clock, self.settings.heartbeat_interval / 2):
                await asyncio.wait(tasks)

    async def maintenance_loop(self, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        interval = min(self.settings.visibility_timeout / 2, 30.0)
        pruner = Pruner(self.jobs)
        while True:
            try:
                await self.recover()
            except Exception:
                logger.exception("recovering expired leases failed")
            await pruner.maybe_prune()
            await self.clock.sleep(interval)
