"""``SQLiteStore``'s hot path: enqueue, claim, finish and heartbeat, lease recovery,
and an idle runner's reads (when a job is next due, whether another process
committed).

Its short writes (an enqueue, a runner's claim and finish of at most ``INLINE_ROWS``
jobs) run on the event loop thread when the file is free, through ``InlineWriter``
(``_sqlite_side``, synchronous=NORMAL only): ``_on_loop``. Longer ones, and those that
find the file locked for long, go through the connection thread
(``_sqlite_connections``).

``_HotPath`` holds these methods of ``SQLiteStore``, which inherits them. The SQL they
run lives in ``_sqlite_sql`` (enqueue, heartbeat), ``_sqlite_claim`` and
``_sqlite_finish``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import anyio
import anyio.lowlevel

from asyncjobs.stores._claims import ClaimRequest
from asyncjobs.stores._job_rows import Inserted, JobRow, NewJob, check_new_jobs
from asyncjobs.stores._outcomes import Outcome, Recovered
from asyncjobs.stores._sqlite_admin import _recover
from asyncjobs.stores._sqlite_claim import _claim, _finish_and_claim
from asyncjobs.stores._sqlite_connections import DRIVER_ERRORS, _Connections
from asyncjobs.stores._sqlite_finish import _finish
from asyncjobs.stores._sqlite_limits import has_limits
from asyncjobs.stores._sqlite_sql import _INSERT_CHUNK, _heartbeat, _next_run_at, insert_jobs
from asyncjobs.stores._sqlite_walks import Walks

P = ParamSpec("P")
T = TypeVar("T")

INLINE_ROWS = 100
"""The most rows a write may touch on the event loop thread (InlineWriter): a hundred
inserts or finishes hold the loop one to two milliseconds. A runner claims at most this
many jobs at a time, so its finish-and-claim fits."""

INLINE_BYTES = 1024 * 1024
"""The most bytes of results and errors a finish may write on the event loop thread:
a job's 42 MB result held the loop about 0.7 s there, and the connection's thread
releases the GIL while SQLite writes."""

_INLINE_SPIN = 0.002
"""For how long (seconds) a short write refused on the loop thread because another
connection holds the lock tries again at every turn of the loop. Another process's
claims and finishes hold the lock for about a millisecond each, back to back when it
catches up on a backlog: a pause of even 100 µs let it take the lock again first, and
meanwhile every request waiting on this commit waited too. A refused try costs
microseconds, and the loop serves other tasks between tries. In
``bench/bench_processes.py`` two processes went from 1.20x one process's throughput to
1.44-1.47x, with four the same, and in ``bench/bench_http.py --worker-process`` the
server's requests/s rose by 4-5%."""

_INLINE_PAUSES = (0.0001, 0.0002, 0.0005, 0.001, *(0.002,) * 10)
"""Pauses (seconds) between the later tries of such a write, about 22 ms in all, before
it goes through the connection thread. There SQLite's busy handler sleeps 1, 2, 5, 10,
15… ms between its tries, and against another process that writes every millisecond or
so it loses the lock again and again: an enqueue waited 4 ms at the median and 19 ms
at the 90th percentile. Short pauses on the loop find the lock free between that
process's transactions."""


class _HotPath(_Connections):
    """``SQLiteStore``'s enqueue, claim and finish, on the event loop thread when they
    can be."""

    if TYPE_CHECKING:
        _walks: Walks

    # -- short writes on the event loop thread ---------------------------------------

    async def _on_loop(
        self,
        transaction: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Run a write of at most ``INLINE_ROWS`` rows on the event loop thread
        (``InlineWriter``: synchronous=NORMAL, file free now or after a few short
        pauses); ``fn`` runs one statement unless ``transaction``. None: not written,
        go through the thread."""
        pauses = iter(_INLINE_PAUSES)
        spin_until: float | None = None
        while True:
            # Looked up at each try: a close (or an open that failed) during a pause
            # closed the one before; the thread then opens the store again.
            if (inline := self._inline) is None:
                return None
            write = inline.try_transaction if transaction else inline.try_write
            try:
                result = write(fn, *args, **kwargs)
            except DRIVER_ERRORS as error:
                raise self._error(error) from error
            if result is not None:
                self._committed()
                return result
            now = asyncio.get_running_loop().time()
            if spin_until is None:
                spin_until = now + _INLINE_SPIN
            if now < spin_until:
                await asyncio.sleep(0)  # noqa: TID251 - lets the loop turn once
                continue
            pause = next(pauses, None)
            if pause is None:
                return None  # still locked: the thread waits on the busy timeout
            await asyncio.sleep(pause)  # noqa: TID251 - waits on another process, not job time

    async def _short_transaction(
        self,
        rows: int,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A transaction touching about ``rows`` rows: on the loop if it is short and
        the file is free, else in the connection thread."""
        if rows <= INLINE_ROWS:
            # Let the loop run first, as the thread's round trip would: a runner that
            # claims in a loop must not starve every other task (and a cancellation
            # arriving here leaves nothing written).
            await anyio.lowlevel.checkpoint()
            result = await self._on_loop(True, fn, *args, **kwargs)
            if result is not None:
                return result
        return await self._transaction(fn, *args, **kwargs)

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float | Callable[[], float]) -> Inserted:
        check_new_jobs(jobs)
        if len(jobs) <= _INSERT_CHUNK and all(j.idempotency_key is None for j in jobs):
            # The common enqueue is one INSERT statement, atomic on its own (autocommit);
            # like BEGIN IMMEDIATE it takes the write lock up front, in two fewer steps.
            # A group commit's batch goes in on the loop when the file is free. No need
            # to let the loop run first: the group commit flushes in a task of its own,
            # so its callers (a producer enqueuing in a loop) have already let it run.
            if len(jobs) <= INLINE_ROWS:
                ids = await self._on_loop(False, insert_jobs, jobs, now)
                if ids is not None:
                    return ids
            ids = await self._call(self._statement, insert_jobs, jobs, now)
            self._committed()
            return ids
        return await self._transaction(insert_jobs, jobs, now)

    # -- claim and finish ------------------------------------------------------------

    async def claim(self, request: ClaimRequest, *, now: float) -> list[JobRow]:
        if request.limit <= 0 or not request.tasks:
            return []
        walks, version = self._walked(request)
        return await self._short_transaction(request.limit, _claim, request, now, walks, version)

    async def finish(self, outcomes: Sequence[Outcome], *, now: float) -> list[str]:
        if not outcomes:
            return []
        return await self._short_transaction(_weight(outcomes), _finish, outcomes, now)

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        if request.limit <= 0 or not request.tasks:
            return await self.finish(outcomes, now=now), []
        rows = max(_weight(outcomes), request.limit)
        walks, version = self._walked(request)
        return await self._short_transaction(
            rows, _finish_and_claim, outcomes, request, now, walks, version
        )

    def _walked(self, request: ClaimRequest) -> tuple[Walks | None, int | None]:
        """For a claim under limits (the only ones that walk past the window: ``choose``),
        the store's walks and the file's data version before it (``Walks.claiming``; None:
        unknown); for any other, (None, None): no read of the version on the hot path."""
        if not has_limits(request):
            return None, None
        return self._walks, None if self._watch is None else self._watch.version()

    async def heartbeat(
        self, job_ids: Sequence[str], *, worker: str, lease_until: float | Callable[[], float]
    ) -> set[str]:
        if not job_ids:
            return set()
        return await self._transaction(_heartbeat, job_ids, worker, lease_until)

    async def recover(self, *, now: float) -> list[Recovered]:
        return await self._transaction(_recover, now)

    async def next_run_at(self) -> float | None:
        # A runner asks each time it goes idle: an index lookup, read on the loop.
        try:
            rows = None if self._watch is None else self._watch.try_read(_next_run_at)
        except DRIVER_ERRORS as error:
            raise self._error(error) from error
        if rows is None:
            rows = await self._read_call(_next_run_at)
        value = rows[0][0]
        return None if value is None else float(value)

    def on_change(self, wake: Callable[[], None] | None) -> bool:
        return False  # another process's commit is seen by polling changed()

    async def changed(self) -> bool:
        watch = self._watch
        while watch is None:  # not open yet, or closed again meanwhile
            await self.open()
            watch = self._watch
        return watch.changed()


def _weight(outcomes: Sequence[Outcome]) -> int:
    """The rows a write of ``outcomes`` counts as against ``INLINE_ROWS``: past that
    when their results and errors come to over ``INLINE_BYTES``."""
    size = 0
    for outcome in outcomes:
        size += len(outcome.result or "") + len(outcome.error or "")
    return len(outcomes) if size <= INLINE_BYTES else INLINE_ROWS + 1
