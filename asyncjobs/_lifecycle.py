"""``Jobs``' worker lifecycle: ``start`` opens the store and starts the workers in a
task of their own (``_main``, which owns every long-lived loop and running job);
``stop`` lets running jobs finish within ``shutdown_timeout`` and gives the rest
back; ``close`` also closes the store (both in ``_shutdown.py``).

``async with jobs:``, ``jobs.lifespan`` and ``JobsMiddleware``'s lifespan are counted
entries (``_enter``/``_leave``): the first starts the workers, and only the last exit
stops them and closes the store. Two apps sharing one ``Jobs`` (mounted sub-apps whose
lifespans the parent's runs, a test fixture's ``async with jobs:`` around an app's
lifespan) each keep it running for as long as they need it. ``start``, ``stop`` and
``close`` called by hand act at once, counted or not.

``_Lifecycle`` holds these methods of ``Jobs``, which inherits them (and, through it,
``_Shutdown``'s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio

from asyncjobs import _shutdown
from asyncjobs._clock import within
from asyncjobs._errors import AsyncJobsError, StoreError
from asyncjobs._shutdown import _Shutdown

if TYPE_CHECKING:
    from asyncjobs._clock import Clock
    from asyncjobs._scheduler import Scheduler
    from asyncjobs._tasks import Task

logger = logging.getLogger("asyncjobs")

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


def _described(error: BaseException) -> str:
    """``error`` as ``Type: message``, or its leaves' for a group (a task group's own
    message names none)."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_described(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


class _Lifecycle(_Shutdown):
    """``Jobs``' start and workers' main task."""

    if TYPE_CHECKING:  # and _Shutdown's
        registry: dict[str, Task[..., Any]]
        scheduler: Scheduler
        _entries: int
        _joined: int
        _left_by: asyncio.Task[None] | None
        _workers_ready: anyio.Event

    @property
    def started(self) -> bool:
        """Are the workers running (started, and not stopped since, nor ended with the
        event loop they ran in)?"""
        return self._host is not None and not self._host.done()

    @property
    def _ready(self) -> bool:
        """Are the workers ready (their first lease recovery done, their loops started:
        what ``start()`` waits for), and running? From then on they have started, even
        before start() has returned: a stop drains them, as any stop does."""
        return self.started and self._workers_ready.is_set()

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

        - The first lease recovery gets ``START_TIME``: ``StoreError`` past it, naming
          what it waited on (another process holding the store, a store that hangs).
        - A ``stop()`` or ``close()`` before the workers are ready makes it fail
          (``_CUT_SHORT``, or a close's ``StoreError`` for the open it cancelled), and
          they stop at once (``_recover_first``); cancelled then, it stops them at once.
        - Once they are ready it has succeeded, even if it has not returned yet: a stop
          from then on drains them as any stop does (``shutdown_timeout``), and so does
          its cancellation, which then waits for that drain and closes the store.
        - Called while another start() starts them, it returns once they are ready, or
          fails as that one does (``_join_start``). Those start() calls share the
          workers: one cancelled leaves them to the others, waiting on them or returned
          (two lifespans entering at once, one startup cancelled); the last one
          cancelled stops them (``_unstart``).
        - Called while a stop drains them, it waits for that drain, then starts new ones
          (``_wait_for_drain``).
        - Workers that crashed are kept until ``stop()`` raises why: until then it
          refuses (``AsyncJobsError`` naming the crash) rather than start new ones over
          a crash nobody has seen, as arq's and SAQ's workers end with theirs."""
        await self._wait_for_drain()
        self._forget_stopped_workers()
        self._refuse_crashed_workers("start()")
        stops = self._stops
        await self.store.open()  # its own waits: a migration takes what it takes
        # A stop() or close() while the store opened found no workers to stop: none
        # start (with workers=False too). The store is closed as a failing start closes
        # it (after a close(), once more), unless workers another start() began use it.
        if self._stops != stops:
            if self._host is None:
                await self._close_store_unstarted()
            raise AsyncJobsError(_CUT_SHORT)
        # Workers that crashed while it opened: joined, they were taken for running.
        self._refuse_crashed_workers("start()")
        self._close_owed = False  # the store is this start's now, not a drain's to close
        if not self.settings.workers:
            return
        # Another start() may have started the workers while this one opened the store.
        if self._host is not None:
            await self._join_start(self._host)
            return
        gives_up_at = anyio.current_time() + START_TIME
        self.store.set_deadline(START_TIME)
        try:
            await self._start(gives_up_at)
        finally:
            if self._host is None:  # else the workers lift it once they recovered
                self.store.set_deadline(None)

    async def _wait_for_drain(self) -> None:
        """``start()`` while a stop drains the workers (``stop()`` waiting, or cancelled
        since, or called by a job): wait until they have ended. It joined them instead,
        returning success for workers about to end, and no job ran from then on. New
        workers cannot start beside them either: they share the runner. Called by a
        job of theirs, it would wait for itself: it fails instead."""
        while (host := self._host) is not None and not host.done():
            if not self._stop_requested.is_set():
                return  # running, or starting: start() joins them
            if self.runner.called_by_a_job():
                raise AsyncJobsError(
                    "start() from inside a running job while its workers stop: they stop "
                    "once this job ends; start them again where they were stopped"
                )
            await asyncio.wait({host})

    def _refuse_crashed_workers(self, call: str) -> None:
        """``start()`` (``call``) while the workers that crashed (or were cancelled) in
        this event loop are kept for ``stop()`` to raise why (``_forget_stopped_workers``):
        it returned success and started none, so no job ran from then on. ``drain()``
        then said the workers were started: they had crashed."""
        host = self._host
        if host is None or not host.done():
            return
        error = None if host.cancelled() else host.exception()
        if error is None and not host.cancelled():
            return  # ended on a stop (one ending as start() opened the store): not refused
        why = "were cancelled" if error is None else f"crashed ({_described(error)})"
        raise AsyncJobsError(
            f"{call}: the asyncjobs workers {why} and no stop() has seen it since; no "
            "job runs in this process until they are started again: call `await "
            f"jobs.stop()` first (it raises why they stopped), then {call}"
        ) from error

    async def _start(self, gives_up_at: float) -> None:
        if self.runner.draining:  # its claim loop and the workers' would share the runner
            raise AsyncJobsError("start() while drain() runs for this Jobs: await the drain first")
        if not self.registry:
            logger.warning("starting workers with no task registered; nothing will run")
        self.runner.starting()
        stop_requested = self._stop_requested = anyio.Event()
        self._stop_now = anyio.Event()
        ready = self._workers_ready = anyio.Event()
        host = self._host = asyncio.get_running_loop().create_task(
            self._main(ready, gives_up_at), name="asyncjobs"
        )
        self._joined, self._left_by = 0, None  # start() calls sharing them (_join_start)
        waiter = asyncio.ensure_future(ready.wait())
        try:
            done, _ = await asyncio.wait({host, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this call cancelled (a startup cancelled, a wait_for)
            await self._unstart(host, joined=False)
            raise
        finally:  # also when this call is cancelled: a start that fails never sets ready
            waiter.cancel()
        if ready.is_set():
            # They started: a stop asked since, before this call went on, is a stop like
            # any other (it drains them), not a start cut short; a crash since was
            # logged, and stop() raises it.
            return
        if host in done:
            self._host = None
            try:
                self._raise_why_not_started(host, stop_requested)
            finally:
                await self._close_store_unstarted()

    async def _join_start(self, host: asyncio.Task[None]) -> None:
        """``start()`` while another start() has begun the workers: return once they
        are ready, or fail as that start() does if they do not start (their first lease
        recovery failed, a stop cut it short). Returning at once, it let a second app's
        startup go on as if they were running (the store's deadline still set, the
        recovery under way), or report success for workers that never started.

        Counted (``_joined``, reset as ``_start`` begins new workers): the workers are
        this call's too, waiting on them or returned, and a cancelled start() leaves
        them running (``_unstart``). The one that began them cancelled (and gone), if
        they do not start, the first joiner to see it closes the store, which nobody
        else would."""
        ready, stop_requested = self._workers_ready, self._stop_requested  # host's
        self._joined += 1
        if not ready.is_set():
            waiter = asyncio.ensure_future(ready.wait())
            try:
                await asyncio.wait({host, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # this call cancelled
                await self._unstart(host, joined=True)
                raise
            finally:
                waiter.cancel()
        if ready.is_set():
            return
        # Left to this call (the start() that began them cancelled), and to no other.
        closes = self._left_by is host
        if closes:
            self._left_by = None
            if self._host is host:
                self._host = None
        try:
            self._raise_why_not_started(host, stop_requested)
        finally:
            if closes:
                await self._close_store_unstarted()

    def _raise_why_not_started(self, host: asyncio.Task[None], stop_requested: anyio.Event) -> None:
        """Workers that ended before they were ready: why, as start() raises it. A stop
        asked of them is read from ``stop_requested``, their own event: a start() since
        has replaced ``_stop_requested`` (a joiner read the new one, not set, and did not
        say it was cut short). Their task cancelled (not by a stop, nor by cancelling
        start(), which ``_unstart`` handles) raised its ``CancelledError`` to callers
        nobody cancelled (an app's startup taken for cancelled): an ``AsyncJobsError``,
        as stop() raises it."""
        if host.cancelled():
            raise AsyncJobsError(
                "start(): the asyncjobs workers were cancelled while they started (their "
                f"task was cancelled, not by stop() nor by cancelling start()): {_NOT_STARTED}"
            )
        host.result()  # raises why it stopped
        if stop_requested.is_set():
            raise AsyncJobsError(_CUT_SHORT)
        # Not expected: before ready, _main returns only once a stop was asked.
        raise AsyncJobsError("the workers stopped while starting")

    async def _unstart(self, host: asyncio.Task[None], *, joined: bool) -> None:
        """A cancelled ``start()`` (``joined`` another's, or began them): stop the
        workers and close the store, as a start that fails does; else they would run
        on, unseen, until a stop(). At once while they start; once they are ready (the
        call was cancelled just before it returned), they have started, and drain as
        they would on a stop() then: their running jobs get ``shutdown_timeout``, not
        cancelled for a stop at once. But not under another start() sharing them,
        waiting on them or returned (``_left_to_others``): stopped, it failed saying a
        stop() cut it short, or its app served with no workers and the store closed.
        The cancellation goes on, the workers left to it."""
        if self._left_to_others(host, joined=joined):
            return
        # Bounded: STOP_AT_ONCE_GRACE and past it, or a drain's shutdown_timeout and
        # FINAL_WRITE_TIME.
        with anyio.CancelScope(shield=True):
            if self._ready and not self._stop_now.is_set():
                self._ask_to_drain()
            else:
                self._stop_at_once()
            await asyncio.wait({host})
            if self._host is host:
                self._host = None
        await self._close_store_unstarted()
        if not host.cancelled() and (error := host.exception()) is not None:
            logger.warning("asyncjobs workers stopped, start() cancelled: %s", error)

    def _left_to_others(self, host: asyncio.Task[None], *, joined: bool) -> bool:
        """A cancelled ``start()`` (``joined`` another's, or began them): are the
        workers left to the other start() calls that share them, waiting on them or
        returned? The last one to leave stops them (``_unstart``)."""
        if self._host is not host:  # ended, forgotten: nobody shares them
            return False
        if joined:
            self._joined -= 1
        if self._joined > 0:
            if not joined:
                self._left_by = host  # a joiner closes the store if they do not start
            return True
        # A joiner cancelled: the start() that began them still waits, unless it left.
        return joined and self._left_by is not host

    async def _close_store_unstarted(self) -> None:
        """Close the store after a start() that failed, was cut short or cancelled: an
        open store's connections (SQLite's threads) would keep the process from exiting.
        Shielded: its caller cancelled meanwhile (a bound on the app's startup) cut the
        close short, and left them open; also asyncio's own cancellation, which an anyio
        shield lets through (``_shutdown.to_its_end``). Bounded by the stores' own closes
        (a thread stuck in a call, a pool's connections, an open under way:
        ``OPEN_CLOSE_TIME``)."""
        await _shutdown.to_its_end(self.store.close(), f"asyncjobs: close {self.store}")

    async def _main(self, ready: anyio.Event, gives_up_at: float) -> None:
        """Own every long-lived task of this ``Jobs``: loops and running jobs."""
        try:
            await self._run_workers(ready, gives_up_at)
        except Exception:
            if ready.is_set():  # else start() raises it
                # Said now: the app serves on, and stop() raises it only at its shutdown.
                logger.exception(
                    "the asyncjobs workers crashed: no job runs in this process until "
                    "they are started again (restart it, or stop() then start())"
                )
            raise
        finally:  # enqueues go on after the workers stop (the app's own shutdown)
            self.runner.set_store_deadline(None)
            if self._close_owed:  # by a close() cancelled as they drained
                await self._close_store()
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
                        self.runner.set_store_deadline(_shutdown.STOP_AT_ONCE_GRACE)
                    with within(self.clock, _shutdown.STOP_AT_ONCE_GRACE + PAST_START_TIME):
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
