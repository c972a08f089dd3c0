"""``Jobs``' worker lifecycle: ``start`` opens the store and starts the workers in a
task of their own (``_main``, which owns every long-lived loop and running job);
``stop`` lets running jobs finish within ``shutdown_timeout`` and gives the rest
back; ``close`` also closes the store.

``async with jobs:``, ``jobs.lifespan`` and ``JobsMiddleware``'s lifespan are counted
entries (``_enter``/``_leave``): the first starts the workers, and only the last exit
stops them and closes the store. Two apps sharing one ``Jobs`` (mounted sub-apps whose
lifespans the parent's runs, a test fixture's ``async with jobs:`` around an app's
lifespan) each keep it running for as long as they need it. ``start``, ``stop`` and
``close`` called by hand act at once, counted or not.

``_Lifecycle`` holds these methods of ``Jobs``, which inherits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio

from asyncjobs import _outbox
from asyncjobs._clock import within
from asyncjobs._errors import AsyncJobsError, StoreError

if TYPE_CHECKING:
    from asyncjobs._batching import GroupCommit, InFlight
    from asyncjobs._clock import Clock
    from asyncjobs._runner import Runner
    from asyncjobs._scheduler import Scheduler
    from asyncjobs._settings import Settings
    from asyncjobs._tasks import Task
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

START_TIME = 60.0
"""Seconds ``start()`` gives the workers' first lease recovery (run before they start):
the store's deadline (``Store.set_deadline``), set meanwhile, ends its waits then, and
start() fails naming what it waited on (the app's startup is refused). As long as the
longest of the stores' own default waits (PostgreSQL's ``command_timeout``; its
``lock_timeout`` and SQLite's five busy timeouts are shorter), which end a wait for
another process's lock as before: what it ends is a wait with no end of its own (a
store that hangs). Opening the store is left to the store's own waits: a migration,
its own or another process's, takes however long it takes (an index built over a
large table), and cut short it would roll back at every start (only a ``close()``
meanwhile cuts it short: ``stores._opening``). A stop meanwhile (the app told to shut
down as it starts) does not wait for the recovery: it gets ``STOP_AT_ONCE_GRACE``
(``_recover_first``)."""

PAST_START_TIME = 5.0
"""Seconds past ``START_TIME`` that ``start()`` still waits for a store that did not end
its wait at its deadline (a stuck connection, a store that takes no deadline): past a
deadline, each wait is still tried once with next to no wait (SQLite a quarter of a
second, PostgreSQL a second)."""

CLOSE_TIME = 5.0
"""Seconds ``close()`` gives the enqueues still in flight (their writes would open the
store again behind its close): the store's deadline ends their waits then, and one
still under way ``PAST_DEADLINE_TIME`` later (a store that hangs) is given up on, its
caller told with ``StoreError`` and its job named in the log. Given up on, its write
may or may not have been committed."""

_NOT_STARTED = "the workers did not start; the jobs stay in the store for the next start"
"""How every failed or cut-short ``start()`` ends its message."""

_KEPT = (
    "; another process may hold the store (a lock on its jobs, a transaction left "
    f"open), or it does not answer. {_NOT_STARTED.capitalize()}"
)

_CUT_SHORT = (
    "start() was cut short by stop() or close(), called while it opened the store or during "
    f"the workers' first lease recovery: {_NOT_STARTED}"
)


@contextlib.contextmanager
def _starting(clock: Clock, what: str, gives_up_at: float) -> Iterator[None]:
    """A step of ``start()`` (the first lease recovery), which the store's deadline, set
    by start() for ``gives_up_at`` (the loop's time), ends: failing, a ``StoreError``
    naming ``what`` (and, past the deadline, the time it had). A step still under
    way ``PAST_START_TIME`` later (the store's wait did not end) is given up on, of the
    clock's time and of real time (a fake clock nobody advances)."""
    left = gives_up_at - anyio.current_time() + PAST_START_TIME
    ended = False
    with anyio.move_on_after(left), clock.move_on_after(left):
        try:
            yield
        except StoreError as error:
            if anyio.current_time() >= gives_up_at:
                raise StoreError(
                    f"{what} did not get through within {START_TIME:g}s: {error}{_KEPT}"
                ) from error
            raise StoreError(f"{what} failed: {error}") from error
        ended = True
    if not ended:
        raise StoreError(
            f"{what} did not end within {START_TIME:g}s (the store did not end its wait "
            f"at its deadline){_KEPT}"
        )


class _Lifecycle:
    """``Jobs``' start, workers' main task, stop and close."""

    if TYPE_CHECKING:
        settings: Settings
        store: Store
        registry: dict[str, Task[..., Any]]
        runner: Runner
        scheduler: Scheduler
        _host: asyncio.Task[None] | None
        _stop_requested: anyio.Event
        _stop_now: anyio.Event
        _entries: int
        _stops: int
        _inserts: GroupCommit[NewJob, str]
        _keyed_inserts: InFlight[NewJob]

        @property
        def clock(self) -> Clock: ...

    @property
    def started(self) -> bool:
        """Are the workers running (started, and not stopped since, nor ended with the
        event loop they ran in)?"""
        return self._host is not None and not self._host.done()

    async def _enter(self) -> None:
        """Enter one of the workers' lifetimes: start them unless they run already."""
        await self.start()
        self._entries += 1

    def _leave(self) -> bool:
        """Leave one of the workers' lifetimes; whether it was the last one, whose
        caller stops the workers and closes the store."""
        self._entries = max(self._entries - 1, 0)
        return self._entries == 0

    @property
    def _in_use(self) -> bool:
        """Is a lifetime entered and not left (``_enter``)? Then none other closes."""
        return self._entries > 0

    async def start(self) -> None:
        """Open the store and, unless ``workers=False``, start the workers.

        The first lease recovery gets ``START_TIME``: ``StoreError`` past it, naming
        what it waited on (another process holding the store, a store that hangs). A
        ``stop()`` or ``close()`` meanwhile makes it fail (``_CUT_SHORT``, or a close's
        ``StoreError`` for the open it cancelled); cancelled, it stops its workers."""
        self._forget_stopped_workers()
        stops = self._stops
        await self.store.open()  # its own waits: a migration takes what it takes
        # A stop() or close() while the store opened found no workers to stop: none
        # start (with workers=False too). The store is closed as a failing start closes
        # it (after a close(), once more), unless workers another start() began use it.
        if self._stops != stops:
            if self._host is None:
                await self.store.close()
            raise AsyncJobsError(_CUT_SHORT)
        if not self.settings.workers:
            return
        # Another start() may have started the workers while this one opened the store.
        if self._host is not None:
            return
        gives_up_at = anyio.current_time() + START_TIME
        self.store.set_deadline(START_TIME)
        try:
            await self._start(gives_up_at)
        finally:
            if self._host is None:  # else the workers lift it once they recovered
                self.store.set_deadline(None)

    async def _start(self, gives_up_at: float) -> None:
        if self.runner.draining:  # its claim loop and the workers' would share the runner
            raise AsyncJobsError("start() while drain() runs for this Jobs: await the drain first")
        if not self.registry:
            logger.warning("starting workers with no task registered; nothing will run")
        self.runner.starting()
        self._stop_requested = anyio.Event()
        self._stop_now = anyio.Event()
        ready = anyio.Event()
        host = self._host = asyncio.get_running_loop().create_task(
            self._main(ready, gives_up_at), name="asyncjobs"
        )
        waiter = asyncio.ensure_future(ready.wait())
        try:
            done, _ = await asyncio.wait({host, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this call cancelled (a startup cancelled, a wait_for)
            await self._unstart(host)
            raise
        finally:  # also when this call is cancelled: a start that fails never sets ready
            waiter.cancel()
        if host in done:
            self._host = None
            try:
                host.result()  # raises why it stopped
                if self._stop_requested.is_set():
                    raise AsyncJobsError(_CUT_SHORT)
                # Not expected: before ready, _main returns only once a stop was asked.
                raise AsyncJobsError("the workers stopped while starting")
            finally:  # an open store's thread would keep the process from exiting
                await self.store.close()

    async def _unstart(self, host: asyncio.Task[None]) -> None:
        """A cancelled ``start()``: stop the workers it started, at once, and close the
        store, as a start that fails does; else they would run on, unseen, until a
        stop()."""
        with anyio.CancelScope(shield=True):  # bounded: STOP_AT_ONCE_GRACE and past it
            self._stop_at_once()
            await asyncio.wait({host})
            if self._host is host:
                self._host = None
            await self.store.close()
        if not host.cancelled() and (error := host.exception()) is not None:
            logger.warning("asyncjobs workers stopped, start() cancelled: %s", error)

    async def _main(self, ready: anyio.Event, gives_up_at: float) -> None:
        """Own every long-lived task of this ``Jobs``: loops and running jobs."""
        try:
            await self._run_workers(ready, gives_up_at)
        except Exception:
            if ready.is_set():  # else start() raises it
                # Said now: the app serves on, and stop() raises it only at its shutdown.
                logger.exception(
                    "the asyncjobs workers crashed: no job runs in this process until "
                    "they are started again (restart it)"
                )
            raise
        finally:  # enqueues go on after the workers stop (the app's own shutdown)
            self.runner.set_store_deadline(None)
        logger.info("asyncjobs workers stopped")

    async def _run_workers(self, ready: anyio.Event, gives_up_at: float) -> None:
        runner = self.runner
        if not await self._recover_first(gives_up_at):  # False once a stop was asked
            return
        self.store.set_deadline(None)  # start()'s: recovered, with no stop asked meanwhile
        async with anyio.create_task_group() as loops:
            claim_scope = anyio.CancelScope()
            claiming_stopped = anyio.Event()

            async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                try:
                    with claim_scope:
                        await runner.serve(task_status=task_status)
                finally:
                    claiming_stopped.set()

            try:
                await loops.start(runner.heartbeat_loop)
                await loops.start(runner.maintenance_loop)
                await loops.start(self.scheduler.run)
                await loops.start(serve)
                logger.info(
                    "asyncjobs workers started (%s, concurrency %d, worker %s)",
                    self.store, self.settings.concurrency, runner.worker_id,
                )  # fmt: skip
                ready.set()
                await self._stop_requested.wait()
                # One deadline for the jobs and the store's waits (another process may
                # hold the database): stop() must end in time. (Told to stop at once,
                # the store has a shorter one already.)
                timeout = self.settings.shutdown_timeout
                stop_by = self.clock.now() + timeout
                if not self._stop_now.is_set():
                    self.runner.set_store_deadline(timeout)
                claim_scope.cancel()
                # A claim in flight is shielded: let it land, so the jobs it took are
                # given back (serve's last step) before the final flush below.
                await claiming_stopped.wait()
                with within(self.clock, stop_by - self.clock.now()):
                    await self._wait_idle_unless_stopped_now()
                if runner.running and self._stop_now.is_set():
                    logger.warning(
                        "shutdown: stopping at once: cancelling %d job(s) still running; "
                        "they will run again", len(runner.running),
                    )  # fmt: skip
                elif runner.running:
                    logger.warning(
                        "shutdown: cancelling %d job(s) still running after %ss; "
                        "they will run again",
                        len(runner.running), self.settings.shutdown_timeout,
                    )  # fmt: skip
            finally:  # also when a loop crashed: no job outlives the workers
                with anyio.CancelScope(shield=True):
                    await runner.cancel_running()
                    # Outcomes of the last jobs, released ones too; also when this task
                    # is cancelled (a server's forced exit skips the lifespan shutdown,
                    # and the event loop cancels every task as it closes).
                    await self._write_last_outcomes()
            loops.cancel_scope.cancel()  # the heartbeats too, once those are written

    async def _recover_first(self, gives_up_at: float) -> bool:
        """The workers' first lease recovery, within start()'s bound (``_starting``).
        A stop meanwhile (the app told to shut down as it starts) cuts it short instead
        of waiting for it: the store's waits get ``STOP_AT_ONCE_GRACE``, and one still
        under way ``PAST_START_TIME`` later (a store that hangs) is given up on. Then the
        workers do not start (False), and nothing is lost: the recovery only requeues,
        and the next start does it again."""
        what = "the first lease recovery (requeueing the jobs of workers that stopped)"
        failed: Exception | None = None
        with anyio.CancelScope() as recovery:
            async with anyio.create_task_group() as race:

                async def cut_short() -> None:
                    await self._stop_requested.wait()
                    if not self._stop_now.is_set():  # else _stop_at_once cut it already
                        self.runner.set_store_deadline(STOP_AT_ONCE_GRACE)
                    with within(self.clock, STOP_AT_ONCE_GRACE + PAST_START_TIME):
                        await anyio.sleep_forever()
                    recovery.cancel()

                race.start_soon(cut_short)
                try:
                    with _starting(self.clock, what, gives_up_at):
                        await self.runner.recover()
                except Exception as error:  # raised as it is, not in an exception group
                    failed = error
                race.cancel_scope.cancel()
        if not self._stop_requested.is_set():
            if failed is not None:
                raise failed
            return True
        logger.log(
            logging.WARNING if failed else logging.INFO,
            "asyncjobs workers stopped while starting, during %s%s: %s", what,
            f" (cut short: {failed})" if failed else "", _NOT_STARTED,
        )  # fmt: skip
        return False

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
        a ``start()`` starts new ones. (Workers that crashed in this loop are kept, for
        ``stop()`` to raise why.)"""
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
        once the running jobs end, the calling job among them."""
        self._stops += 1  # a start() under way, opening the store, does not start them
        ended = self._forget_stopped_workers()
        if ended is not None and not ended.cancelled():
            ended.result()  # raises why they stopped
        host = self._host
        if host is None:
            return
        self._stop_requested.set()
        # Nothing new starts from here on, not even a job enqueued (and dispatched to a
        # free slot) before the workers' task has woken up to the request.
        self.runner.stop_accepting()
        if self.runner.called_by_a_job():
            return
        try:
            await asyncio.shield(host)
        finally:
            if host.done() and self._host is host:  # not workers started since
                self._host = None

    async def close(self) -> None:
        """Stop the workers if they run, let enqueues in flight be written, then close
        the store (also when the workers crashed: ``stop`` raises why). An open of the
        store under way (a ``start()`` waiting on another process's migration) is
        cancelled after ``OPEN_CLOSE_TIME`` (``stores._opening``).

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
            await self._wait_for_enqueues()  # else their write would open it again
            await self.store.close()

    async def _wait_for_enqueues(self) -> None:
        """``close()``: wait for the enqueues in flight, within ``CLOSE_TIME`` (the
        store's deadline) and ``PAST_DEADLINE_TIME`` past it; give up on those left."""
        if self._inserts.idle and self._keyed_inserts.idle:
            return
        deadline = not self.started  # else the workers' (a stop() cancelled meanwhile)
        if deadline:
            self.store.set_deadline(CLOSE_TIME)
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
            if deadline:
                self.store.set_deadline(None)
