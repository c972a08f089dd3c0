"""Leases: ``Runner``'s heartbeats, which extend the leases of the jobs it holds and
record this worker in the store, and lease recovery, which requeues the jobs of a
worker that died (``recover``, run with pruning by ``maintenance_loop``).

``_Leases`` holds these methods of ``Runner``, which inherits them.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from asyncjobs._retention import Pruner
from asyncjobs.stores._protocol import JobRow, WorkerBeat

if TYPE_CHECKING:
    from asyncjobs._clock import Clock
    from asyncjobs._execution import _Running
    from asyncjobs._jobs import Jobs
    from asyncjobs._settings import Settings
    from asyncjobs.stores._protocol import Outcome

logger = logging.getLogger("asyncjobs")


class _Leases:
    """``Runner``'s heartbeat, worker record and lease recovery loops."""

    if TYPE_CHECKING:
        jobs: Jobs
        running: dict[str, _Running]
        _ready: list[JobRow]
        _outbox: list[tuple[JobRow, Outcome, float]]
        _writing: list[list[tuple[JobRow, Outcome, float]]]
        worker_id: str
        started_at: float
        settings: Settings
        clock: Clock

        def wake(self) -> None: ...

        def cancel_local(self, job_id: str, attempt: int | None = None) -> None: ...

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
        ended = {row.id for row, _, _ in self._outbox}
        ended.update(row.id for taken in self._writing for row, _, _ in taken)
        if not held and not ended:
            return
        owned = await self.jobs.store.heartbeat(
            list(ended.union(held)), worker=self.worker_id, lease_until=self._lease_until
        )
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

    def _lease_until(self) -> float:
        """A lease from now. The store calls it once it holds the lock: counted from
        before a wait for another process's lock, the lease would be short by that wait."""
        return self.clock.now() + self.settings.visibility_timeout

    def _holds(self, job_id: str, attempt: int) -> bool:
        """Is attempt ``attempt`` at ``job_id`` running here, or claimed ahead?"""
        running = self.running.get(job_id)
        if running is not None and running.row.attempts == attempt:
            return True
        return any(row.id == job_id and row.attempts == attempt for row in self._ready)

    async def heartbeat_loop(self, *, task_status: TaskStatus[None]) -> None:
        self.started_at = self.clock.now()
        await self.record_beat()
        task_status.started()
        try:
            while True:
                await self.clock.sleep(self.settings.heartbeat_interval)
                try:
                    await self.heartbeat_once()
                except Exception:
                    logger.exception("heartbeat failed; leases may expire")
                await self.record_beat()
        finally:
            with anyio.CancelScope(shield=True), self.clock.move_on_after(5):
                await self.record_beat(stopped=True)

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
        # and run again, an attempt spent, though nothing crashed.
        try:
            await self.heartbeat_once()
        except Exception:
            logger.exception("heartbeat failed; leases may expire")
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
