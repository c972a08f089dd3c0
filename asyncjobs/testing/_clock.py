"""``FakeClock``: time that moves only when a test says so."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

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
        if start is not None and not _is_time(float(start)):
            raise ValueError(f"FakeClock(start=...) must be a time a datetime can show: {start!r}")
        real: Clock = SystemClock()
        # The real time, up to a multiple of 1/64 s: a float that is a whole number of
        # microseconds, exactly. datetime() then shows the clock's time as it is, not
        # rounded up to the next microsecond, and a run_at of datetime() + 5 s is due
        # once advance(5) has run (as it is after advances by whole seconds). Up, not
        # down: what a real clock stored just before is not in this clock's future.
        self._now = float(start) if start is not None else math.ceil(real.now() * 64) / 64
        self._seq = itertools.count()
        # Loops in other threads (a TestClient's) wait on this clock too: the lock keeps
        # their changes to the heaps from losing one another's.
        self._lock = threading.Lock()
        # Each waiter with its deadline, a tie-breaker, and the loop it waits in.
        self._sleepers: list[tuple[float, int, anyio.Event, asyncio.AbstractEventLoop]] = []
        self._scopes: list[tuple[float, int, anyio.CancelScope, asyncio.AbstractEventLoop]] = []

    def now(self) -> float:
        return self._now

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self._now, UTC)

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward and wake whoever's deadline passed."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if not seconds >= 0:  # negative, or NaN (which would stop the clock for good)
            raise ValueError(f"FakeClock only moves forward, by a number of seconds: {seconds!r}")
        due: dict[asyncio.AbstractEventLoop, list[Callable[[], object]]] = {}
        with self._lock:
            if not _is_time(self._now + seconds):  # inf, or past the year 9999
                raise ValueError(
                    "FakeClock only moves forward, to a time a datetime can show: "
                    f"{seconds!r} seconds from {self._now!r} is none"
                )
            self._now += seconds
            # In the order of their deadlines, sleepers and scopes together: a deadline
            # that comes before a sleep's end cancels it, as it would in real time.
            while True:
                sleeper = self._sleepers[0] if self._sleepers else None
                scope = self._scopes[0] if self._scopes else None
                if sleeper is not None and sleeper[0] > self._now:
                    sleeper = None
                if scope is not None and scope[0] > self._now:
                    scope = None
                if scope is not None and (sleeper is None or scope[:2] < sleeper[:2]):
                    heapq.heappop(self._scopes)
                    due.setdefault(scope[3], []).append(scope[2].cancel)
                elif sleeper is not None:
                    heapq.heappop(self._sleepers)
                    due.setdefault(sleeper[3], []).append(sleeper[2].set)
                else:
                    break
        # Each waiter is woken in its own loop: a sync test may advance the clock from
        # its thread while a TestClient's app waits on it in a loop of its own.
        here = _running_loop()
        handed: list[tuple[asyncio.AbstractEventLoop, concurrent.futures.Future[None]]] = []
        for loop, wakes in due.items():
            if loop is here or not loop.is_running():
                _wake(wakes)
                continue
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            try:
                loop.call_soon_threadsafe(_wake, wakes, done)
            except RuntimeError:  # closed meanwhile: nobody waits there any more
                continue
            handed.append((loop, done))
        for loop, done in handed:
            # A loop that stops before it runs the wake-up drops it: stop waiting then.
            while loop.is_running():
                try:
                    done.result(timeout=0.05)
                    break
                except concurrent.futures.TimeoutError:
                    continue

    async def sleep(self, seconds: float) -> None:
        _check_wait(seconds, "sleep")
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        with self._lock:
            entry = (self._now + seconds, next(self._seq), event, asyncio.get_running_loop())
            heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: its entry goes, not kept until its time
                with self._lock:
                    self._sleepers = [e for e in self._sleepers if e[2] is not event]
                    heapq.heapify(self._sleepers)

    @contextmanager
    def move_on_after(self, seconds: float | None) -> Iterator[anyio.CancelScope]:
        scope = anyio.CancelScope()
        if seconds is not None:
            _check_wait(seconds, "move_on_after")
            if seconds <= 0:
                scope.cancel()
            else:
                loop = asyncio.get_running_loop()
                with self._lock:
                    entry = (self._now + seconds, next(self._seq), scope, loop)
                    heapq.heappush(self._scopes, entry)
        try:
            with scope:
                yield scope
        finally:  # however the body ends (an error goes through the scope)
            if seconds is not None and seconds > 0:
                with self._lock:
                    self._scopes = [entry for entry in self._scopes if entry[2] is not scope]
                    heapq.heapify(self._scopes)


def _check_wait(seconds: float, call: str) -> None:
    """Refuse a NaN wait: its deadline compares with none, so it counted as due at the
    next ``advance`` of any length, and the wait ended at once. (A negative wait is
    none, an infinite one never ends, as in real time.)"""
    if math.isnan(seconds):
        raise ValueError(f"FakeClock.{call}() takes a number of seconds, not {seconds!r}")


def _is_time(value: float) -> bool:
    """Whether ``value`` (epoch seconds) is a time ``datetime`` shows: not NaN, not
    infinite, not past the year 9999. Past that ``datetime()`` and every ``JobInfo``
    read at that time would raise."""
    try:
        datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _wake(
    wakes: list[Callable[[], object]], done: concurrent.futures.Future[None] | None = None
) -> None:
    """Set the events and cancel the scopes of the waiters whose time has come."""
    try:
        for wake in wakes:
            with contextlib.suppress(RuntimeError):  # its loop is gone: nobody waits
                wake()
    finally:
        if done is not None:
            done.set_result(None)
