"""``FakeClock``: time that moves only when a test says so."""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import anyio

from asyncjobs._clock import Clock, SystemClock


class FakeClock:
    """A ``Clock`` for tests: starts at the real time (or ``start``), moves by ``advance``.

    Sleepers and ``move_on_after`` deadlines whose time has come are woken by
    ``advance``, as trio's ``MockClock`` does.
    """

    def __init__(self, start: datetime | float | None = None) -> None:
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError("FakeClock(start=...) needs a timezone-aware datetime")
            start = start.timestamp()
        real: Clock = SystemClock()
        self._now = float(start) if start is not None else real.now()
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._scopes: list[tuple[float, int, anyio.CancelScope]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # of the last waiter

    def now(self) -> float:
        return self._now

    def datetime(self) -> datetime:
        from datetime import UTC

        return datetime.fromtimestamp(self._now, UTC)

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward and wake whoever's deadline passed."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if seconds < 0:
            raise ValueError("FakeClock only moves forward")
        loop = self._loop
        if loop is None or _running_loop() is loop or not loop.is_running():
            self._advance(seconds)
            return
        # From another thread (a sync test driving a TestClient, whose app runs in a
        # loop of its own): waking sleepers and cancelling scopes is that loop's work.
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def advance_there() -> None:
            try:
                self._advance(seconds)
            except BaseException as error:  # pragma: no cover - _advance raises nothing
                done.set_exception(error)
            else:
                done.set_result(None)

        try:
            loop.call_soon_threadsafe(advance_there)
        except RuntimeError:  # closed meanwhile: nobody waits on this clock there
            self._advance(seconds)
            return
        done.result()

    def _advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()
        while self._scopes and self._scopes[0][0] <= self._now:
            heapq.heappop(self._scopes)[2].cancel()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._loop = asyncio.get_running_loop()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), event))
        await event.wait()

    @contextmanager
    def move_on_after(self, seconds: float | None) -> Iterator[anyio.CancelScope]:
        scope = anyio.CancelScope()
        if seconds is not None:
            if seconds <= 0:
                scope.cancel()
            else:
                self._loop = asyncio.get_running_loop()
                heapq.heappush(self._scopes, (self._now + seconds, next(self._seq), scope))
        with scope:
            yield scope
        if seconds is not None and seconds > 0:
            self._scopes = [entry for entry in self._scopes if entry[2] is not scope]
            heapq.heapify(self._scopes)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
