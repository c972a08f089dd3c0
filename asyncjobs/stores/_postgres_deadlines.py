"""The deadline of ``PostgresStore``'s waits: every wait for a reply or a connection
ends at its own timeout (a reply within ``command_timeout``: ``_bounded``) or at the
store's deadline (``set_deadline``, as a runner stops), whichever comes first, also a
deadline set while it waits.

``_Deadlines`` holds these methods of ``PostgresStore``, which inherits them through
``_postgres_connections._Connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from asyncjobs._errors import StoreError

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection

T = TypeVar("T")

PAST_DEADLINE_WAIT = 1.0
"""Seconds a statement sent past the store's deadline (``set_deadline``) waits for its
reply: a healthy server answers in milliseconds, so a stopping worker's last records
(its stop, the jobs it gives back) and an enqueue from a job's cleanup still get
through; a server that holds the statement (a lock, a silent network) does not hold
``stop()``."""


class _Deadlines:
    """``PostgresStore``'s waits, bounded by their timeouts and the store's deadline."""

    if TYPE_CHECKING:
        command_timeout: float
        _give_up_at: float | None
        _waiting: dict[asyncio.Timeout, float | None]

    def set_deadline(self, seconds: float | None) -> None:
        # On the loop's clock, as the waits' timeouts are.
        loop_now = asyncio.get_running_loop().time()
        self._give_up_at = give_up_at = None if seconds is None else loop_now + seconds
        for timeout, ends_at in self._waiting.items():  # waits under way
            if not timeout.expired():  # (one that expired is ending its wait)
                # A deadline lifted (the workers stopped in time) gives them back their own.
                end = ends_at if give_up_at is None else min(ends_at or math.inf, give_up_at)
                timeout.reschedule(end)

    @contextlib.asynccontextmanager
    async def _until(self, ends_at: float | None) -> AsyncIterator[asyncio.Timeout]:
        """A wait (for a reply, a connection) that ends at ``ends_at`` (None: at none
        of its own), or at the deadline (``set_deadline``) when that comes first, also
        one set while it waits; one that begins past the deadline gets
        ``PAST_DEADLINE_WAIT``. The timeout says whether it ended the wait."""
        end = ends_at
        if self._give_up_at is not None:
            now = asyncio.get_running_loop().time()
            end = min(ends_at or math.inf, max(self._give_up_at, now + PAST_DEADLINE_WAIT))
        timeout = asyncio.timeout_at(end)
        async with timeout:
            self._waiting[timeout] = ends_at
            try:
                yield timeout
            finally:
                del self._waiting[timeout]

    @contextlib.asynccontextmanager
    async def _by_deadline(self, what: str) -> AsyncIterator[None]:
        """A wait outside a statement (for a free or a new connection) that the
        deadline ends too, as a ``StoreError``."""
        try:
            async with self._until(None) as timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise StoreError(f"PostgreSQL store {self!r}: no {what} before its deadline") from None

    async def _bounded(self, conn: Connection, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """``fn(conn)`` within ``command_timeout``. A network that goes silent (a host
        gone, a firewall dropping packets) sends no reset: a statement would wait for
        TCP to give up, a quarter of an hour, and a runner's claim, which shutdown lets
        finish, would hold ``stop()`` as long. Past the timeout the connection is
        dropped (its state is unknown), and the operation fails as unreachable.

        The store's deadline (``set_deadline``) can cut the wait shorter, also for a
        statement already waiting: then it fails as past the deadline, which says
        nothing of the server's reachability (no reconnect backoff)."""
        reply_by = asyncio.get_running_loop().time() + self.command_timeout
        try:
            async with self._until(reply_by) as timeout:
                return await fn(conn)
        except TimeoutError:
            if not timeout.expired():
                raise  # fn's own
            conn.terminate()  # closed without a word to the server: nothing to wait on
            if (timeout.when() or reply_by) < reply_by:
                raise StoreError(
                    f"PostgreSQL store {self!r}: no reply before its deadline"
                ) from None
            # The statement was sent: it may have taken effect, its reply lost.
            raise TimeoutError(
                f"no reply within command_timeout={self.command_timeout:g}s "
                "(what was sent may have taken effect all the same)"
            ) from None
