"""Group commit: concurrent writers share one transaction instead of one each.

Callers ``submit`` items. When no flush is under way the caller flushes at once
(no extra task switch for a lone producer); callers that arrive meanwhile queue
up, and when the flush ends the first of them leads the next flush with
everything that queued. Each submission's items always land in one flush, so
``submit_many`` is one transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")


class _Waiter(Generic[T, R]):
    __slots__ = ("done", "error", "event", "items", "lead", "results")

    def __init__(self, items: Sequence[T]) -> None:
        self.items = items
        self.event = anyio.Event()
        self.results: list[R] = []
        self.error: BaseException | None = None
        self.done = False
        self.lead = False


class GroupCommit(Generic[T, R]):
    """Coalesce concurrent ``submit`` calls into calls of ``flush(items) -> results``."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._flush = flush
        self._queue: list[_Waiter[T, R]] = []
        self._busy = False

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    async def submit(self, item: T) -> R:
        return (await self.submit_many((item,)))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        waiter: _Waiter[T, R] = _Waiter(items)
        self._queue.append(waiter)
        # Shielded: once submitted, the write completes (or fails) whatever happens to
        # the caller, and leadership can never be dropped by a cancelled waiter.
        with anyio.CancelScope(shield=True):
            if self._busy:
                await waiter.event.wait()
            if not waiter.done:
                self._busy = True
                # Let submitters woken in this same loop iteration join the batch.
                await anyio.lowlevel.checkpoint()
                await self._lead()
        if waiter.error is not None:
            raise waiter.error
        return waiter.results

    async def _lead(self) -> None:
        batch, self._queue = self._queue, []
        items = [item for waiter in batch for item in waiter.items]
        try:
            results = list(await self._flush(items))
            start = 0
            for waiter in batch:
                waiter.results = results[start : start + len(waiter.items)]
                start += len(waiter.items)
        except BaseException as error:
            for waiter in batch:
                waiter.error = error
        finally:
            for waiter in batch:
                waiter.done = True
                waiter.event.set()
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].event.set()
            else:
                self._busy = False
