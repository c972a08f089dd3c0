"""``Jobs``' workers stopping: ``stop`` lets running jobs finish within
``shutdown_timeout`` and gives the rest back, or, told to stop at once (``asyncjobs
worker``'s second signal, a cancelled ``start()``), cancels them and gives them back
with the store's waits cut to ``STOP_AT_ONCE_GRACE``; ``close`` also lets the enqueues
in flight be written, then closes the store.

``_Shutdown`` holds these methods of ``Jobs``, which inherits them through
``_Lifecycle`` (the start side, ``_lifecycle.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import anyio

from asyncjobs import _outbox
from asyncjobs._clock import within
from asyncjobs._errors import AsyncJobsError, StoreError

if TYPE_CHECKING:
    from asyncjobs._batching import GroupCommit, InFlight
    from asyncjobs._clock import Clock
    from asyncjobs._runner import Runner
    from asyncjobs._settings import Settings
    from asyncjobs.stores import Store
    from asyncjobs.stores._job_rows import NewJob

logger = logging.getLogger("asyncjobs")

STOP_AT_ONCE_GRACE = 1.0
"""Seconds the store's waits get once the workers are told to stop at once
(``_stop_at_once``: ``asyncjobs worker``'s second signal, a cancelled ``start()``), or
stopped during their first lease recovery (``_recover_first``), instead of what is left
of ``shutdown_timeout`` and ``FINAL_WRITE_TIME``: a free store takes the releases of the
jobs cancelled, while one that another process holds does not hold the stop. Past it a
write is still tried once (as past any deadline: ``Store.set_deadline``); a release
that could not be written leaves its job running with its lease, to run again once that
expires, as after a crash."""

CLOSE_TIME = 5.0
"""Seconds ``close()`` gives the enqueues still in flight (their writes would open the
store again behind its close): the store's deadline ends their waits then, and one
still under way ``PAST_DEADLINE_TIME`` later (a store that hangs) is given up on, its
caller told with ``StoreError`` and its job named in the log. Given up on, its write
may or may not have been committed."""


async def to_its_end(step: Coroutine[Any, Any, None], name: str) -> None:
    """Run ``step`` (closing the store) to its end, whatever cancels the caller, then
    raise the caller's cancellation, if any. In a task of its own, which the caller
    waits on shielded: an anyio shield stops cancel scopes (``anyio.fail_after``), not
    asyncio's own cancellation (``task.cancel()``, ``asyncio.timeout``, the tasks
    cancelled as ``asyncio.run`` ends), which would cut it short, the store left open.
    Bounded by ``step``'s own bounds (``CLOSE_TIME``, the stores' closes)."""
    task = asyncio.get_running_loop().create_task(step, name=name)
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


def _raise_why_stopped(host: asyncio.Task[None]) -> None:
    """``stop()``, once the workers have ended: raise why, if not for a stop. Their task
    cancelled in this event loop (by something else than stop(): its own cancellation
    only leaves them draining) raised its ``CancelledError`` to a caller nobody
    cancelled, which anyio and asyncio take for the caller's own cancellation (a
    lifespan's shutdown aborted). It is an ``AsyncJobsError`` now, as for a crash: the
    app ran with no workers since, unseen (``start()`` refuses them, for stop() to say
    so: ``_refuse_crashed_workers``). Their running jobs were given back, as at any
    stop (``_run_workers``), so only the caller hears of it."""
    if host.cancelled():
        raise AsyncJobsError(
            "the asyncjobs workers were cancelled (their task was cancelled, not by stop()): "
            "no job ran in this process since; the jobs they ran were given back to the "
            "queue (or left to their leases), and start() starts new workers"
        )
    host.result()  # raises why they crashed


class _Shutdown:
    """``Jobs``' stop and close, and the workers' last steps."""

    if TYPE_CHECKING:
        settings: Settings
        store: Store
        runner: Runner
        _host: asyncio.Task[None] | None
        _stop_requested: anyio.Event
        _stop_now: anyio.Event
        _stops: int
        _close_owed: bool
        _inserts: GroupCommit[NewJob, str]
        _keyed_inserts: InFlight[NewJob]

        @property
        def clock(self) -> Clock: ...

        @property
        def started(self) -> bool: ...

    async def _wait_idle_unless_stopped_now(self) -> None:
        """Shutdown: wait for the running jobs to end, or until ``_stop_at_once``."""
        async with anyio.create_task_group() as race:

            async def cut_short() -> None:
                await self._stop_now.wait()
                race.cancel_scope.cancel()

            race.start_soon(cut_short)
            await self.runner.wait_idle()
            race.cancel_scope.cancel()

    async def _write_last_outcomes(self) -> None:
        """Shutdown's last write (``Runner.flush_last``, tried for ``FINAL_WRITE_TIME``),
        or, once told to stop at once (before it or while it is tried), tried within
        ``STOP_AT_ONCE_GRACE``: the store's deadline, set then, bounds each try, and the
        jobs whose outcomes are left are named, to run again once their leases expire."""
        if self._stop_now.is_set():
            await self.runner.flush_outbox()  # once: the store's waits end with the grace
        else:
            with anyio.CancelScope() as retries:
                async with anyio.create_task_group() as race:

                    async def cut_short() -> None:
                        await self._stop_now.wait()
                        with within(self.clock, STOP_AT_ONCE_GRACE):
                            await anyio.sleep_forever()
                        retries.cancel()

                    race.start_soon(cut_short)
                    await self.runner.flush_last()  # names the jobs left, if it ends
                    race.cancel_scope.cancel()
            if not retries.cancelled_caught:
                return
        for row, outcome in self.runner.unwritten():
            logger.error(
                "shutdown: stopping at once: could not record the outcome (%s) of job %s "
                "(%s); it will run again once its lease expires", outcome.kind, row.id,
                row.task, extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
            )  # fmt: skip

    def _ask_to_drain(self) -> None:
        """Ask the workers to stop as ``stop()`` does: no claim from now on, the running
        jobs get ``shutdown_timeout``."""
        self._stop_requested.set()
        # Nothing new starts from here on, not even a job enqueued (and dispatched to a
        # free slot) before the workers' task has woken up to the request.
        self.runner.stop_accepting()

    def _stop_at_once(self) -> bool:
        """Ask the workers to stop, and not to wait for the running jobs: they are
        cancelled and given back, as when ``shutdown_timeout`` runs out (``asyncjobs
        worker``'s second signal). The store's waits, a claim under way and the last
        outcomes, get ``STOP_AT_ONCE_GRACE`` from now. ``stop()`` or ``close()`` still
        waits for that. Whether there were workers still running to ask."""
        if self._host is None or self._host.done():
            return False
        self.runner.set_store_deadline(STOP_AT_ONCE_GRACE)
        self._stop_requested.set()
        self._stop_now.set()
        self.runner.stop_accepting()
        return True

    def _forget_stopped_workers(self) -> asyncio.Task[None] | None:
        """Forget, and return, workers that have stopped with no ``stop()`` call left to
        see it: in an event loop which has ended (a script's ``asyncio.run()`` returned, a
        test's loop closed: closing it cancelled them, and they gave their jobs back), or
        after the only ``stop()`` was cancelled while they drained. They are not running:
        a ``start()`` starts new ones. (Workers that crashed, or were cancelled, in this
        loop are kept, for ``stop()`` to raise why: ``_raise_why_stopped``.)"""
        host = self._host
        if host is None or not host.done():
            return None
        if host.get_loop() is asyncio.get_running_loop() and (
            host.cancelled() or host.exception() is not None
        ):
            return None
        self._host = None
        return host

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within ``shutdown_timeout``, then
        cancel the rest and give them back without spending an attempt.

        Called by a job of these workers, it asks them to stop and returns at once:
        waiting for them would wait for that job, which waits here. They stop as above,
        once the running jobs end, the calling job among them.

        Workers that crashed: it raises why (``AsyncJobsError`` if their task was
        cancelled: ``_raise_why_stopped``), once, and start() starts new ones after."""
        self._stops += 1  # a start() under way, opening the store, does not start them
        ended = self._forget_stopped_workers()
        if ended is not None and not ended.cancelled():
            ended.result()  # raises why they stopped
        host = self._host
        if host is None:
            return
        self._ask_to_drain()
        if self.runner.called_by_a_job():
            return
        try:
            await asyncio.wait({host})  # cancelled, this call leaves them draining
        finally:
            if host.done() and self._host is host:  # not workers started since
                self._host = None
        _raise_why_stopped(host)

    async def close(self) -> None:
        """Stop the workers if they run, let enqueues in flight be written, then close
        the store (also when the workers crashed: ``stop`` raises why). An open of the
        store under way (a ``start()`` waiting on another process's migration) is
        cancelled after ``OPEN_CLOSE_TIME`` (``stores._opening``).

        Cancelled (a bound on the app's shutdown, a server's forced exit), it still
        closes the store: left open, its connections (SQLite's threads) keep the process
        from exiting. But not under the workers: cancelled while they drain (a cancelled
        ``stop()`` leaves them draining), the store is theirs until they end; closed now,
        their last writes would open it again behind the close (or, cut short, leave it
        open). So the close is owed (``_close_owed``), and their task closes the store
        as it ends, after their last outcomes (``_main``). With no workers running,
        the close runs to its end (``_close_store``), bounded as it is uncancelled:
        ``CLOSE_TIME`` for the enqueues in flight, the stores' own bounds for the close.
        A ``start()`` meanwhile waits for that drain (and close), then opens the store
        again; one that opened it since takes it back: nothing is owed then.

        A running job of these workers may not call it: the store would be closed under
        the workers still running it, and its own outcome would open it again."""
        if self.runner.called_by_a_job():
            raise AsyncJobsError(
                "close() from inside a running job would close the store under the "
                "workers running it; call `await jobs.stop()` there, and close where "
                "the workers were started (`async with jobs:`, the app's shutdown)"
            )
        try:
            await self.stop()
        finally:
            await self._close_once_stopped()

    async def _close_once_stopped(self) -> None:
        """Close the store now if no workers run (``_close_store``), else (a stop
        cancelled while they drain) leave it to their task, as they end: owed."""
        host = self._host
        if host is not None and not host.done():
            self._close_owed = True
        else:
            await self._close_store()

    async def _close_store(self) -> None:
        """``close()``'s last steps, run to their end (``to_its_end``): wait for the
        enqueues in flight (else their write would open the store again), then close
        the store."""
        self._close_owed = False

        async def close() -> None:
            await self._wait_for_enqueues()
            await self.store.close()

        await to_its_end(close(), f"asyncjobs: close {self.store}")

    async def _wait_for_enqueues(self) -> None:
        """``close()``: wait for the enqueues in flight, within ``CLOSE_TIME`` (the
        store's deadline) and ``PAST_DEADLINE_TIME`` past it; give up on those left."""
        if self._inserts.idle and self._keyed_inserts.idle:
            return
        self.store.set_deadline(CLOSE_TIME)  # the workers', if any, have ended
        try:
            with within(self.clock, CLOSE_TIME + _outbox.PAST_DEADLINE_TIME):
                await self._inserts.wait_idle()
                await self._keyed_inserts.wait_idle()
            error = StoreError(
                f"close() waited {CLOSE_TIME:g}s for this enqueue's write, and gave up on "
                "it: the store did not answer (a stuck connection?); the job may or may "
                "not have been written"
            )
            for job in self._inserts.give_up(error) + self._keyed_inserts.give_up(error):
                logger.error(
                    "close: gave up on the enqueue of job %s (%s) after %ss: the store did "
                    "not answer; it may or may not have been written", job.id, job.task,
                    CLOSE_TIME, extra={"job_id": job.id, "task": job.task},
                )  # fmt: skip
            with within(self.clock, _outbox.PAST_DEADLINE_TIME):  # their ends, cancelled
                await self._inserts.wait_idle()
                await self._keyed_inserts.wait_idle()
        finally:
            self.store.set_deadline(None)
