"""Group commit: concurrent writers share one transaction instead of one each.

Callers ``submit`` items. When no flush is under way the caller flushes at once
(no extra task switch for a lone producer); callers that arrive meanwhile queue
up, and when the flush ends the first of them leads the next flush with
everything that queued. Each submission's items always land in one flush, so
``submit_many`` is one transaction.

Cancellation: a flush, once started, always completes, so a submission that
returned is written. It runs in a task of its own, which the leader waits on: a
plain asyncio cancellation of the leader (``task.cancel()``, ``asyncio.timeout``),
which an anyio shield does not stop, cannot cut a flush short, and the other
callers of its batch hear how it went, not of a cancellation that was not theirs.
A caller cancelled while its items still wait in the queue is taken out (nothing of
it is written); one cancelled after its batch started may still be written. A
waiter elected to lead the next flush leads it even if it is cancelled meanwhile,
without its own items, so leadership is never lost.

Closing waits for the submissions made (``wait_idle``), and gives up on those whose
write does not come back (``give_up``: a store that hangs): each of their callers
hears of it, with the error given, instead of waiting for good.

Waiters use plain asyncio futures (asyncjobs runs on asyncio only): this is the
enqueue hot path, and they cost a fraction of an ``anyio.Event`` plus a scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")

_GATHER_PASSES = 4
"""Loop iterations a leader waits for more submitters before it flushes, at most."""
_QUIET_PASSES = 2
"""...and it flushes after this many iterations in a row without a new submitter."""


class _Waiter(Generic[T, R]):
    __slots__ = ("done", "error", "future", "items", "results")

    def __init__(self, items: Sequence[T], future: asyncio.Future[bool]) -> None:
        self.items = items
        self.future = future  # result True: flushed; False: elected to lead the next flush
        self.results: list[R] = []
        self.error: BaseException | None = None
        self.done = False


class GroupCommit(Generic[T, R]):
    """Coalesce concurrent ``submit`` calls into calls of ``flush(items) -> results``."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        apart: Callable[[BaseException], bool] | None = None,
    ) -> None:
        """``apart``: a flush of several submissions failing with an error it accepts
        (one item refused as data) is tried again one submission at a time, so that only
        the submissions that fail alone hear of it."""
        self._flush = flush
        self._apart = apart
        self._queue: list[_Waiter[T, R]] = []
        self._busy = False
        # Did the last flush have company? Then leaders wait for submitters woken in the
        # same loop iteration; a lone producer flushes at once (one loop turn sooner).
        self._gather = False
        self._idle = _IdleWaiters()
        self._flushing: tuple[asyncio.Task[None], list[_Waiter[T, R]]] | None = None
        self._given_up: BaseException | None = None  # the error of a flush given up on

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    def give_up(self, error: BaseException) -> list[T]:
        """Give up on every submission not flushed yet, the flush under way's too (it is
        cancelled: its write may or may not have been committed): their callers get
        ``error``. Returns their items."""
        left: list[T] = []
        # One elected to lead the next flush keeps its place: it leads (see above).
        queued = self._queue
        self._queue = [waiter for waiter in queued if waiter.future.done()]
        for waiter in queued:
            if not waiter.future.done():
                left.extend(waiter.items)
                waiter.error, waiter.done = error, True
                waiter.future.set_result(True)
        if self._flushing is not None and not self._flushing[0].done():
            flush, batch = self._flushing
            left.extend(item for waiter in batch for item in waiter.items)
            self._given_up = error
            flush.cancel()
        return left

    async def wait_idle(self) -> None:
        """Wait until every submission made so far has been flushed."""
        await self._idle.wait(lambda: not self.idle)

    async def submit(self, item: T) -> R:
        return (await self.submit_many((item,)))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        waiter: _Waiter[T, R] = _Waiter(items, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if self._busy:
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter.done:
                    raise  # written; the caller just does not hear about it
                if waiter in self._queue:
                    self._queue.remove(waiter)  # never flushed: nothing written
                if waiter.future.done() and not waiter.future.cancelled():
                    await self._lead_shielded(None)  # elected: lead the others, give up
                raise
        if not waiter.done:
            await self._lead_shielded(waiter)
        if waiter.error is not None:
            raise waiter.error
        return waiter.results

    async def _lead_shielded(self, own: _Waiter[T, R] | None) -> None:
        """Gather, then flush the queue in a task of its own and wait for it to end.

        A cancellation of the leader (asyncio's own, which the anyio shield lets
        through) ends the gathering and takes the leader's ``own`` items out, but
        never stops the flush of the others; it is raised once that flush has ended
        and every caller of the batch has its outcome.
        """
        self._busy = True
        cancelled = False
        with anyio.CancelScope(shield=True):
            # Let submitters woken in the next few loop iterations join the batch, until
            # two in a row bring nobody new: the loop polls its sockets in between, and
            # a request read in one iteration enqueues in the next. Under HTTP load the
            # wave of requests that the last flush's responses set off then goes in
            # one flush, not the first request alone and the rest in another.
            waiting, quiet = len(self._queue), 0
            for _ in range(_GATHER_PASSES if self._gather else 0):
                try:
                    await anyio.lowlevel.checkpoint()
                except asyncio.CancelledError:
                    cancelled = True
                    if own in self._queue:
                        self._queue.remove(own)  # not flushed yet: nothing of it written
                    break
                quiet = quiet + 1 if len(self._queue) == waiting else 0
                if quiet == _QUIET_PASSES:
                    break
                waiting = len(self._queue)
            batch = self._take_batch()
            flush = asyncio.get_running_loop().create_task(self._lead(batch))
            self._flushing = flush, batch
            if own in batch and not cancelled:
                try:
                    await own.future  # set as the flush ends: no wait on the task's end
                except asyncio.CancelledError:
                    cancelled = True
            while not flush.done():
                try:
                    await asyncio.shield(flush)
                except asyncio.CancelledError:
                    cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        flush.result()  # an error of _lead's own surfaces here, not as a lost task's

    def _take_batch(self) -> list[_Waiter[T, R]]:
        batch = [w for w in self._queue if not w.future.cancelled()]
        self._queue = []
        self._gather = len(batch) > 1
        return batch

    async def _lead(self, batch: list[_Waiter[T, R]]) -> None:
        items = [item for waiter in batch for item in waiter.items]
        try:
            try:
                results = list(await self._flush(items)) if items else []
            except Exception as error:
                if self._apart is None or not self._apart(error) or len(batch) < 2:
                    raise
                for waiter in batch:  # each alone: only those refused fail
                    try:
                        waiter.results = list(await self._flush(list(waiter.items)))
                    except Exception as alone:
                        waiter.error = alone
                return
            start = 0
            for waiter in batch:
                waiter.results = results[start : start + len(waiter.items)]
                start += len(waiter.items)
        except BaseException as error:
            for waiter in batch:
                if not waiter.results and waiter.error is None:
                    waiter.error = self._given_up or error
        finally:
            self._given_up = self._flushing = None
            for waiter in batch:
                waiter.done = True
                if not waiter.future.done():
                    waiter.future.set_result(True)
            self._elect()

    def _elect(self) -> None:
        """Hand the next flush to the first live waiter, or go idle."""
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.set_result(False)
                return
        self._busy = False
        self._idle.wake()


class _Call(Generic[T]):
    __slots__ = ("error", "items", "scope")

    def __init__(self, items: Sequence[T]) -> None:
        self.items = items
        self.scope = anyio.CancelScope()
        self.error: BaseException | None = None  # given up on: what its caller gets


class InFlight(Generic[T]):
    """Counts calls under way, so that closing can wait for them (writes that bypass
    the group commit), or give up on them (``give_up``)."""

    def __init__(self) -> None:
        self._calls: list[_Call[T]] = []
        self._idle = _IdleWaiters()

    @property
    def idle(self) -> bool:
        return not self._calls

    async def run(self, call: Awaitable[R], items: Sequence[T] = ()) -> R:
        """Await ``call``, which writes ``items``."""
        under_way = _Call(items)
        self._calls.append(under_way)
        try:
            with under_way.scope:
                return await call
            if under_way.error is not None:  # given up on
                raise under_way.error
            raise asyncio.CancelledError  # pragma: no cover - only give_up cancels it
        finally:
            self._calls.remove(under_way)
            if not self._calls:
                self._idle.wake()

    def give_up(self, error: BaseException) -> list[T]:
        """Give up on the calls under way (cancelled: their writes may or may not have
        been committed): their callers get ``error``. Returns their items."""
        left: list[T] = []
        for under_way in self._calls:
            if under_way.error is None:
                under_way.error = error
                under_way.scope.cancel()
                left.extend(under_way.items)
        return left

    async def wait_idle(self) -> None:
        await self._idle.wait(lambda: not self.idle)


class _IdleWaiters:
    """Tasks waiting for something to go idle; ``wake`` them when it may have."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self, busy: Callable[[], bool]) -> None:
        while busy():
            idle = asyncio.get_running_loop().create_future()
            self._waiters.append(idle)
            await idle

    def wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for idle in waiters:
                if not idle.done():
                    idle.set_result(None)
