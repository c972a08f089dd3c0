"""Opening a store, which ``close()`` waits for within a bound, then cancels
(``Opening``).

Opening is not bounded: a migration takes what it takes (an index built over a large
table, another process's migration holding the lock). ``close()`` (the app's shutdown,
SIGTERM) must not wait for it as long, for ever behind another process's migration
lock. So the open runs in a task of its own; close() waits ``OPEN_CLOSE_TIME`` for it,
so that a first use's open (a connect, a look at the schema) ends and that use goes
through, then cancels it. An open writes no job, so nothing is lost: a migration under
way rolls back, whole, and runs again at the next start, and the store would have been
closed right after it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio

from asyncjobs._errors import StoreError

logger = logging.getLogger(__name__)

OPEN_CLOSE_TIME = 5.0
"""Seconds of real time ``close()`` waits for an open in progress before it cancels it
(as the stores' own waits, real time: the store reads no clock). A first use's open
ends well within it. One still under way waits on another process (its migration, a
lock on the file) or migrates a large table, which a shutdown does not wait for."""


class Opening:
    """A store's open in progress: the lock under which the first uses at once open it
    once, and the task that runs it, which ``closing()`` cancels."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = 0  # close() calls under way (waiting for the open, or closing)

    def locked(self) -> bool:
        return self.lock.locked()

    async def run(self, store: object, connect: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``connect()`` (the caller holds the lock) in a task of its own; fail with
        ``StoreError`` if ``close()`` cancels it, or is still under way once this has the
        lock (this waited behind it): the store stays closed, not opened again behind the
        close. A cancelled caller cancels the open too, and waits for it to clean up."""
        if self._closing:
            raise StoreError(f"{store} was closed while this waited to open it")
        task = asyncio.get_running_loop().create_task(connect(), name=f"asyncjobs: open {store}")
        self._task = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # this caller was cancelled: the open goes with it, once
                task.cancel()
                with anyio.CancelScope(shield=True):  # a cleanup bounded by the store's
                    await asyncio.wait({task})
                raise
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise
            raise StoreError(
                f"{store} was closed while it opened: close() cancelled the open (a "
                "migration under way was rolled back; it runs again at the next start)"
            ) from None
        finally:
            self._task = None

    @contextlib.asynccontextmanager
    async def closing(self, store: object) -> AsyncIterator[None]:
        """For ``close()``: wait ``OPEN_CLOSE_TIME`` for the open in progress, if any,
        then cancel it; hold the lock once it has ended (cleaned up what it opened).
        The uses that waited behind a cancelled open fail (``run``)."""
        self._closing += 1
        try:
            task = self._task
            if task is not None and not task.done():
                with anyio.move_on_after(OPEN_CLOSE_TIME):
                    await asyncio.wait({task})
                if not task.done():
                    logger.warning(
                        "%s: closing: gave up after %ss on the open under way (waiting on "
                        "another process's migration or lock, or migrating a large table): "
                        "cancelled it; a migration of its own rolls back, and the next "
                        "start opens the store again", store, OPEN_CLOSE_TIME,
                    )  # fmt: skip
                    task.cancel()
            async with self.lock:
                yield
        finally:
            self._closing -= 1
