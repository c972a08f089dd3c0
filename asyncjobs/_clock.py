"""Time, injected: every loop and timeout in asyncjobs goes through a ``Clock``.

``SystemClock`` is wall time for timestamps and the event loop's clock for
waiting. ``asyncjobs.testing.FakeClock`` implements the same protocol and moves
only when told, so tests never sleep.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where asyncjobs reads the time and how it waits."""

    def now(self) -> float:
        """The current time as epoch seconds (UTC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...

    def move_on_after(self, seconds: float | None) -> AbstractContextManager[anyio.CancelScope]:
        """A cancel scope that is cancelled once ``seconds`` of this clock's time passed.

        ``None`` means no deadline. Check ``scope.cancelled_caught`` afterwards.
        """
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(seconds, 0.0))

    def move_on_after(self, seconds: float | None) -> AbstractContextManager[anyio.CancelScope]:
        return anyio.move_on_after(seconds)


@contextmanager
def within(clock: Clock, seconds: float) -> Iterator[None]:
    """At most ``seconds`` of ``clock``'s time and of real time, for waits that must end
    (shutdown): a test's fake clock that nobody advances would hold them for good."""
    with anyio.move_on_after(seconds), clock.move_on_after(seconds):
        yield


def to_datetime(epoch: float | None) -> datetime | None:
    """Epoch seconds to an aware UTC datetime (``None`` passes through)."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)
