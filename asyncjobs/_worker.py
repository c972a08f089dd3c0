"""A worker-only process: run a ``Jobs``' workers until SIGTERM/SIGINT, then drain.

``asyncjobs worker myapp:jobs`` calls ``run_worker``. The web processes can then
be enqueue-only (``Jobs(..., workers=False)``), sharing the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, NoReturn

import anyio

from asyncjobs._errors import AsyncJobsError

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

LEFTOVER_GRACE = 1.0
"""Seconds the tasks still pending once ``run_worker`` returned get after one more
cancellation, before the worker process exits without them."""


def run_worker_process(jobs: Jobs) -> None:
    """``asyncjobs worker``: ``run_worker`` in an event loop of its own, closed once it
    returns; the process exits then, also when a job swallows every cancellation.

    ``asyncio.run`` would wait for such a job's task for good after the workers went on
    without it (it keeps its lease, and runs again once that expires): the process never
    exited. Here the tasks left get one more cancellation and ``LEFTOVER_GRACE``; if
    some are still pending, they are logged and the process ends at once (``os._exit``,
    as a crash would): collected at exit, each would run its cleanup with no event loop.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run_worker(jobs))
    finally:
        try:
            stuck = _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        if stuck:
            _exit_without(stuck, failure=sys.exc_info()[1])


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> set[asyncio.Task[object]]:
    """Cancel the tasks still pending in ``loop``, as ``asyncio.run`` does, but wait
    ``LEFTOVER_GRACE`` at most for them; those still pending."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return set()
    for task in tasks:
        task.cancel()
    done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_GRACE))
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception while the worker exited",
                 "exception": task.exception(), "task": task}
            )  # fmt: skip
    return pending


def _exit_without(stuck: set[asyncio.Task[object]], failure: BaseException | None) -> NoReturn:
    """End the process now, leaving ``stuck`` behind (said in the log), with the exit
    status it would have had: 1 if the worker failed (said in the log too), else 0."""
    if failure is not None:
        logger.error("the worker failed: %s", failure, exc_info=failure)
    logger.error(
        "exiting without %d task(s) that ignored their cancellation: %s",
        len(stuck), ", ".join(sorted(task.get_name() for task in stuck)),
    )  # fmt: skip
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if failure is None else 1)


async def run_worker(jobs: Jobs, *, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
    """Start ``jobs``' workers and run until one of ``signals``; then drain and close.

    Draining stops claiming, gives running jobs ``shutdown_timeout`` and releases
    the rest (they run again later, no attempt spent). A second signal while it
    drains stops it at once (a cold shutdown): the running jobs are cancelled and
    released as when ``shutdown_timeout`` runs out, the store's waits (a claim under
    way, the releases) cut to ``STOP_AT_ONCE_GRACE`` (a release the store did not take
    by then leaves its job to its lease, as a crash would), then it raises to say so
    (exit status 1). Further signals are logged and ignored, so they cannot lose a
    release. The workers run even if ``jobs`` was built with ``workers=False`` (the
    usual setup: the web app only enqueues, this process only works). Must run in the
    main thread (signal handlers). Raises if the workers stop on their own.
    """
    with _workers_on(jobs), anyio.open_signal_receiver(*signals) as received:
        started = await _start_unless_signalled(jobs, received)
        if started == "stopped":
            # Workers the start() began are stopped, the store closed (_unstart, or the
            # failed start); this closes a store whose open the signal cancelled, and
            # waits for the enqueues in flight.
            with anyio.CancelScope(shield=True):
                try:
                    await jobs.close()
                except Exception as error:  # the start's own error is logged already
                    logger.warning("closing asyncjobs after a signal while starting: %s", error)
            return
        host = jobs._host
        if host is None:  # pragma: no cover - start() returned with workers running
            raise AsyncJobsError("the workers did not start")
        stopped_on_their_own = False
        try:
            if started == "started":  # else the first signal came as they got ready
                stopped_on_their_own = await _run_until_signalled(jobs, host, received)
        finally:
            stopped_at_once = await _close_unless_signalled_again(jobs, received)
        if stopped_on_their_own:  # close() re-raises a crash; this is a quiet stop
            raise AsyncJobsError("the asyncjobs workers stopped unexpectedly")
        if stopped_at_once:
            raise AsyncJobsError(
                "stopped at once on a second signal: the jobs still running were cancelled "
                "and given back to the queue, or left to their leases where the store did "
                "not take that in time (either way they run again later)"
            )


async def _run_until_signalled(
    jobs: Jobs, host: asyncio.Task[None], received: AsyncIterator[int]
) -> bool:
    """Let the workers run until a signal; True if they stopped on their own first."""
    logger.info("asyncjobs worker running; send SIGTERM or SIGINT to stop")
    stopped_on_their_own = False
    async with anyio.create_task_group() as tg:

        async def wait_for_signal() -> None:
            async for signum in received:
                _log_draining(jobs, signum)
                break
            tg.cancel_scope.cancel()

        async def watch_workers() -> None:
            nonlocal stopped_on_their_own
            await asyncio.wait({host})
            stopped_on_their_own = True
            tg.cancel_scope.cancel()

        tg.start_soon(wait_for_signal)
        tg.start_soon(watch_workers)
    return stopped_on_their_own


async def _close_unless_signalled_again(jobs: Jobs, received: AsyncIterator[int]) -> bool:
    """Drain and close ``jobs``; a signal meanwhile stops the workers at once (the
    running jobs cancelled and given back) instead of waiting ``shutdown_timeout`` for
    them. Whether one did. Signals after that one are logged and ignored."""
    stopped_at_once = False
    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            nonlocal stopped_at_once
            async for signum in received:
                name = signal.Signals(signum).name
                if stopped_at_once or not jobs._stop_at_once():
                    logger.warning("received %s while stopping; still stopping", name)
                    continue
                logger.warning(
                    "received %s while draining: stopping at once; running jobs are "
                    "cancelled and given back to the queue", name,
                )  # fmt: skip
                stopped_at_once = True

        tg.start_soon(listen)
        with anyio.CancelScope(shield=True):
            await jobs.close()
        tg.cancel_scope.cancel()
    return stopped_at_once


def _log_draining(jobs: Jobs, signum: int) -> None:
    logger.info(
        "received %s: draining (up to %ss)",
        signal.Signals(signum).name, jobs.settings.shutdown_timeout,
    )  # fmt: skip


async def _start_unless_signalled(
    jobs: Jobs, received: AsyncIterator[int]
) -> Literal["started", "draining", "stopped"]:
    """Start ``jobs``' workers: "started"; "stopped" if a signal came while they
    started, which stops them at once and cancels the start; "draining" if it came
    once they were ready, a moment before start() returned: they have started, and
    that first signal drains them (the caller's ``_close_unless_signalled_again``,
    where a second one stops them at once), as it would a moment later. (Taken for a
    signal while starting, it cancelled start(), which stopped them at once, their
    running jobs cancelled; or, if start() returned first, they were closed deaf to a
    second signal.)

    Opening the store may wait long (a lock held by another process): a signal does not
    wait for it (else it would be heard only once the open gave up, and the worker exit
    as failed). A start that fails once a signal came (a wait in the store's thread is
    not cut short) is logged, not raised: the worker was asked to stop, and does."""
    signalled = draining = False
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def stop_starting() -> None:
            nonlocal signalled, draining
            async for signum in received:
                # Ready, even if they crashed since: start() returns in a moment, not
                # cancelled, and close() raises the crash (exit status 1, as a moment
                # later). Taken for a signal while starting, it was only logged.
                if jobs._host is not None and jobs._workers_ready.is_set():
                    _log_draining(jobs, signum)
                    draining = True
                    return
                logger.info("received %s while starting: stopping", signal.Signals(signum).name)
                signalled = True
                # At once, even if they get ready before the cancellation reaches start().
                jobs._stop_at_once()
                tg.cancel_scope.cancel()
                return

        tg.start_soon(stop_starting)
        try:
            await jobs.start()
        except Exception as failed:  # raised as it is, not in an exception group
            error = failed
        tg.cancel_scope.cancel()
    if error is not None and not signalled:
        raise error
    if error is not None:
        logger.warning("asyncjobs could not start: %s", error)
    return "stopped" if signalled else "draining" if draining else "started"


@contextlib.contextmanager
def _workers_on(jobs: Jobs) -> Iterator[None]:
    """Run ``jobs``' workers even if it was built with ``workers=False``; as it was
    built again afterwards (enqueue-only, if it is used on after this)."""
    built = jobs.settings
    jobs.settings = dataclasses.replace(built, workers=True)
    try:
        yield
    finally:
        jobs.settings = built
