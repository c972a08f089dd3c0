"""A worker-only process: run a ``Jobs``' workers until SIGTERM/SIGINT, then drain.

``asyncjobs worker myapp:jobs`` calls ``run_worker``. The web processes can then
be enqueue-only (``Jobs(..., workers=False)``), sharing the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import anyio

from asyncjobs._errors import AsyncJobsError

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_worker(jobs: Jobs, *, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
    """Start ``jobs``' workers and run until one of ``signals``; then drain and close.

    Draining stops claiming, gives running jobs ``shutdown_timeout`` and releases
    the rest (they run again later, no attempt spent). Further signals while
    draining are logged and ignored, so a second Ctrl-C cannot lose a release.
    The workers run even if ``jobs`` was built with ``workers=False`` (the usual
    setup: the web app only enqueues, this process only works). Must run in the
    main thread (signal handlers). Raises if the workers stop on their own.
    """
    with _workers_on(jobs), anyio.open_signal_receiver(*signals) as received:
        await jobs.start()
        host = jobs._host
        if host is None:  # pragma: no cover - start() returned with workers running
            raise AsyncJobsError("the workers did not start")
        logger.info("asyncjobs worker running; send SIGTERM or SIGINT to stop")
        stopped_on_their_own = False
        try:
            async with anyio.create_task_group() as tg:

                async def wait_for_signal() -> None:
                    async for signum in received:
                        logger.info(
                            "received %s: draining (up to %ss)",
                            signal.Signals(signum).name,
                            jobs.settings.shutdown_timeout,
                        )
                        break
                    tg.cancel_scope.cancel()

                async def watch_workers() -> None:
                    nonlocal stopped_on_their_own
                    await asyncio.wait({host})
                    stopped_on_their_own = True
                    tg.cancel_scope.cancel()

                tg.start_soon(wait_for_signal)
                tg.start_soon(watch_workers)
        finally:
            async with anyio.create_task_group() as tg:

                async def ignore_signals() -> None:
                    async for signum in received:
                        logger.warning(
                            "received %s while draining; still finishing running jobs",
                            signal.Signals(signum).name,
                        )

                tg.start_soon(ignore_signals)
                with anyio.CancelScope(shield=True):
                    await jobs.close()
                tg.cancel_scope.cancel()
        if stopped_on_their_own:  # close() re-raises a crash; this is a quiet stop
            raise AsyncJobsError("the asyncjobs workers stopped unexpectedly")


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
