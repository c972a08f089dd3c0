"""``SQLiteStore``: the default store, one SQLite file in WAL mode.

Every operation is one call into aiosqlite's connection thread that runs the
whole transaction there (``BEGIN IMMEDIATE`` … ``COMMIT``), so an operation costs
one thread round trip however many statements it takes. Write transactions
begin IMMEDIATE, wait on the busy timeout and are retried a bounded number of
times, so several processes can share the file without "database is locked"
reaching a user. The exceptions are the hot path's short writes (an enqueue, a
runner's claim and finish of at most ``INLINE_ROWS`` jobs) and an idle runner's
reads: with synchronous=NORMAL they run on the event loop thread when the file is
free, wait out another connection's short write there (trying again at every turn
of the loop, then in short pauses), and go
through the thread only when the file stays locked (``_sqlite_side``).

Pure reads (``get``, ``list``, the counts, the operations snapshot) go through a
second aiosqlite connection of their own, read-only. A write waits in its thread for
as long as another connection holds the file's lock, up to five busy timeouts: the
caller of ``jobs.transaction(conn)`` holds it until it commits, and a runner's claim
woken by its enqueue (or by the runner's poll) waits on it there. A read queued behind
that claim stalled the caller, who cannot commit before the read returns. In WAL mode
a reader never waits for a writer, so on its own connection the read returns at once;
and each read is a read transaction of its own, begun after the call was made, so it
sees every write committed before (on any connection).

The SQL it runs lives beside it: ``_sqlite_sql`` (enqueue, claim, finish),
``_sqlite_admin`` (operator and maintenance calls) and ``_sqlite_schema`` (WAL mode
and migrations).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import re
import sqlite3
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from asyncjobs._errors import ConfigurationError, DataRefused, StoreError
from asyncjobs.stores._protocol import (
    PREVIEWED,
    SLOT_KEY,
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    OpsSnapshot,
    Outcome,
    RateKeyed,
    Recovered,
    WorkerBeat,
    checked_preview,
    previewed,
)
from asyncjobs.stores._sqlite_admin import (
    ADMIN_BATCH,
    META_VALUE,
    _last_slot,
    _meta,
    _prune,
    _prune_buckets,
    _record_worker,
    _recover,
    _requeue_dead_batch,
    _retry,
    _snapshot,
)
from asyncjobs.stores._sqlite_limits import Walks, has_limits
from asyncjobs.stores._sqlite_schema import (
    migrate,
    opens_without_writing,
    schema_current,
    switch_to_wal,
)
from asyncjobs.stores._sqlite_side import (
    ChangeWatch,
    Checkpointer,
    InlineWriter,
    is_busy,
    read_text,
    set_log_policy,
)
from asyncjobs.stores._sqlite_sql import (
    _INSERT_CHUNK,
    _PREVIEW_SELECT,
    _SELECT,
    COLUMNS,
    _batch_counts,
    _cancel,
    _claim,
    _finish,
    _finish_and_claim,
    _heartbeat,
    _next_run_at,
    _read,
    _row,
    insert_jobs,
    pending_keys,
    set_rate_keys,
    tally_deleted,
)
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGE_FOLLOWER, PURGEABLE

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

DRIVER_ERRORS = (sqlite3.Error, UnicodeEncodeError, OverflowError)
"""What sqlite3 raises for a store call that fails: its own errors, and its refusals to
bind a value (text no UTF-8 encodes, an int past 64 bits), which asyncpg raises as a
DataError; both become ``StoreError`` at the store boundary (``error_kind``)."""


def error_kind(error: Exception) -> type[StoreError]:
    """``DataRefused`` when SQLite, or sqlite3 binding it, refused a value itself
    (``SQLITE_TOOBIG``, text no UTF-8 encodes, an int past 64 bits), which no retry will
    change; else ``StoreError``. For one of ``DRIVER_ERRORS``."""
    refused = not isinstance(error, sqlite3.Error) or isinstance(error, sqlite3.DataError)
    return DataRefused if refused else StoreError


_SYNCHRONOUS = {
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

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

_BUSY_RETRIES = 5
"""How many busy timeouts a write waits out before it gives up with StoreError."""

_BUSY_SLICE = 0.25
"""Seconds of one wait of the writing connection's busy handler (its busy timeout, set
when it connects): a write waits for a busy file in waits this long, so that a
deadline set meanwhile (``set_deadline``) ends the wait within one of them, not at the
end of a whole busy timeout."""


_WAL_PAUSE = 0.01
"""Seconds between tries to switch a file to WAL mode (``_switch_to_wal``), which SQLite
refuses at once, without its busy handler's wait, while another connection holds the
write lock: several processes opening a new file at once, each switching it."""


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
"""How a URL begins (``sqlite://``, ``postgresql://``). ``open_store`` takes no name
with ``://`` for a path either (``sqlite_path``)."""


_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
"""Every store of this process, for ``_forget_inherited`` in a forked child."""

_INHERITED: list[tuple[object, ...]] = []
"""What a forked child inherited from its parent's open stores: kept here, never used
(see ``SQLiteStore._forget_connections``)."""


def _forget_inherited() -> None:
    for store in list(_STORES):
        store._forget_connections()


os.register_at_fork(after_in_child=_forget_inherited)


def _in_memory(name: str) -> bool:
    """Whether ``name`` is how SQLite spells an in-memory database: ``:memory:``, or a
    ``file:`` URI naming one (``file::memory:``, ``file:x?mode=memory``)."""
    if name == ":memory:":
        return True
    return name.startswith("file:") and (":memory:" in name or "mode=memory" in name)


class SQLiteStore:
    """A job store in one SQLite file (WAL). Safe for several processes on one host."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        busy_timeout: float = 5.0,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if _in_memory(os.fspath(path)):
            raise ConfigurationError(
                f"SQLite in-memory databases ({os.fspath(path)!r}) cannot hold jobs: each "
                "of the store's connections would see its own empty database, and nothing "
                "would outlive the process. Use a file; in tests a temporary one "
                "(tmp_path / 'jobs.db'), or the `jobs` fixture of asyncjobs' pytest plugin"
            )
        scheme = _URL_SCHEME.match(os.fspath(path))
        if scheme is not None:  # the URL itself is left out: it may hold a password
            raise ConfigurationError(
                f"SQLiteStore takes a file path, not a URL ({scheme[0]}...): as a path it "
                "names a folder called "
                f"{scheme[0].split('/')[0]!r} in the working directory. Pass the file's "
                "path, or open the URL with asyncjobs.stores.open_store(url)"
            )
        # Absolute now: every connection, the side ones opened later too, is on the
        # same file if the working directory changes, and a name that begins "file:"
        # is a file name, not a URI for SQLite to parse.
        self.path = Path(path).absolute()
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None  # pure reads (_read_call)
        self._reader_raw: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._watch: ChangeWatch | None = None
        self._inline: InlineWriter | None = None  # synchronous=NORMAL only
        self._opening = asyncio.Lock()  # first uses at once open it once
        self._open = False  # set up: migrated, side connections made
        self._give_up_at: float | None = None  # time.monotonic(); see set_deadline
        self._walks = Walks()  # how far the claims went past their window
        self._in_flight = 0  # calls waiting on a connection's thread (_forget_connections)
        _STORES.add(self)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def _same_jobs(self, other: SQLiteStore) -> bool:
        """Whether ``other`` is on the same file, whatever path names it (``..``, a
        symbolic or hard link): compared by device and inode once the files exist."""
        try:
            return os.path.samefile(self.path, other.path)
        except OSError:  # one is not created yet: the same file only by the same path
            return self.path.resolve() == other.path.resolve()

    # -- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        async with self._opening:
            if not self._open:  # else another first use opened it meanwhile
                await self._connect()
                self._open = True

    async def open_unless_it_writes(self) -> bool:
        """Open the store if that takes no write lock (the file is in WAL mode, its
        schema current); return whether it is open. For ``jobs.transaction(conn)``,
        whose caller may hold the file's write lock, and whose connection must not read
        the file before the caller does (see ``_transaction``)."""
        if not self._open and not await anyio.to_thread.run_sync(opens_without_writing, self.path):
            return False
        await self.open()
        return True

    async def _connect(self) -> None:
        # The writer's busy handler waits a slice at a time (_while_busy); reads wait
        # the whole busy timeout, as WAL makes them wait only on rare occasions.
        self._db, self._raw = await self._thread_connection(min(self.busy_timeout, _BUSY_SLICE))
        try:
            await self._call(self._setup)
            checkpointer = self._checkpointer = Checkpointer(self.path)
            await self._call(lambda _: checkpointer.connect())
            self._watch = await self._call(lambda _: ChangeWatch(self.path))
            if self.synchronous == "NORMAL":  # FULL fsyncs each commit: not on the loop
                self._inline = await self._call(lambda _: InlineWriter(self.path))
            # Last: a read that finds it set finds the schema migrated.
            reader, reader_raw = await self._thread_connection(self.busy_timeout)
            self._reader, self._reader_raw = reader, reader_raw
            await self._read_call(_query_only)
        except BaseException:
            await self._disconnect()
            raise

    async def _thread_connection(
        self, busy_timeout: float
    ) -> tuple[aiosqlite.Connection, sqlite3.Connection]:
        """A new aiosqlite connection, and the sqlite3 one its thread runs."""
        # check_same_thread=False: a forked child closes its copy (_forget_connections).
        pending = aiosqlite.connect(
            self.path, isolation_level=None, timeout=busy_timeout, check_same_thread=False
        )
        # A script that enqueues and returns without closing the store must still exit:
        # Python waits at exit for every thread that is not a daemon. A write cut off by
        # the exit is rolled back when the file is next opened, as after a crash.
        pending._thread.daemon = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await pending
        except (OSError, sqlite3.Error) as error:
            # aiosqlite stops its thread on a failed connect but does not wait for it;
            # wait here, with the loop alive, or the thread reports to a closed loop.
            if pending._thread.is_alive():
                await anyio.to_thread.run_sync(pending._thread.join, 5.0)
            raise StoreError(
                f"cannot open the SQLite store at {self.path}: {error}{self._open_hint(error)}"
            ) from error
        # aiosqlite exposes no public way to run a function in its connection thread;
        # _execute is how its own methods do it, and it saves a round trip per statement.
        raw = db._connection
        if raw is None or not hasattr(db, "_execute"):  # pragma: no cover - aiosqlite changed
            await db.close()
            raise StoreError("this aiosqlite version is not supported; install aiosqlite<0.23")
        raw.text_factory = read_text
        return db, raw

    def _setup(self, db: sqlite3.Connection) -> None:
        mode = self._switch_to_wal(db)
        if mode.lower() != "wal":
            raise StoreError(f"could not switch {self.path} to WAL mode (got {mode!r})")
        # PRAGMAs take no parameters: a fixed statement per setting; the busy timeout
        # is set by connect(timeout=...) through sqlite3_busy_timeout.
        db.execute(_SYNCHRONOUS[self.synchronous])
        set_log_policy(db)
        if not schema_current(db):
            self._write(db, migrate)

    def _switch_to_wal(self, db: sqlite3.Connection) -> str:
        """Switch the file to WAL mode, tried again while another connection holds it
        as a write is (``_while_busy``: five busy timeouts, or until the deadline), with
        a pause between tries: against a write lock SQLite refuses at once."""
        try:
            return self._while_busy(db, lambda: switch_to_wal(db), pause=_WAL_PAUSE)
        except sqlite3.OperationalError as error:
            if not is_busy(error):
                raise
            raise StoreError(
                f"could not switch {self.path} to WAL mode: another connection held the "
                f"file ({error}; an open waits up to {_BUSY_RETRIES} busy timeouts, "
                f"busy_timeout={self.busy_timeout:g}s). A program that has it open without "
                "WAL (an sqlite3 shell, a backup) must let go of it first"
            ) from error

    async def close(self) -> None:
        # After an open in progress (first uses), which would otherwise finish behind
        # this close and leave the store open, or find its connection gone.
        async with self._opening:
            await self._disconnect()

    def _forget_connections(self) -> None:
        """In a child forked after this store opened (a script's multiprocessing pool, a
        prefork server whose app used the store on import): close the connections it
        inherited, and let the first use open the store anew. Their threads did not come
        along, so a read waited for ever. And SQLite keeps count of a process's own
        locks in memory, which the fork copied: new connections beside inherited ones
        counted those and took no lock of their own, so the parent, closing its store,
        found itself the last on the file and deleted the log with the child's later
        jobs in it. Closing them here takes none of the parent's locks (locks are per
        process), and the parent's still open file is neither checkpointed nor deleted.

        A connection that a thread may have been using at the fork (a call under way, a
        checkpoint) may be locked in the child for good: it is kept, unused, instead."""
        inherited = (
            self._db, self._raw, self._reader, self._reader_raw,
            self._checkpointer, self._watch, self._inline,
        )  # fmt: skip
        if any(connection is not None for connection in inherited):
            _INHERITED.append(inherited)  # never collected: aiosqlite's would warn
            idle = self._in_flight == 0 and not self._opening.locked()
            for side in (self._watch, self._inline):  # used on the loop's thread only
                if side is not None:
                    side.close()
            if self._checkpointer is not None:
                self._checkpointer.close_unless_running()
            for raw in (self._reader_raw, self._raw):
                if raw is not None and idle:
                    raw.close()
        self._db = self._raw = self._reader = self._reader_raw = None
        self._checkpointer = self._watch = self._inline = None
        self._open = False
        self._opening = asyncio.Lock()  # the parent may have held it, opening

    async def _disconnect(self) -> None:
        self._open = False
        checkpointer, self._checkpointer = self._checkpointer, None
        watch, self._watch = self._watch, None
        inline, self._inline = self._inline, None
        reader, self._reader, self._reader_raw = self._reader, None, None
        db, self._db, self._raw = self._db, None, None
        try:
            if inline is not None:
                inline.close()
            if watch is not None:
                watch.close()
            if checkpointer is not None:
                await checkpointer.close()
        finally:
            try:
                if reader is not None:
                    await reader.close()
            finally:
                if db is not None:  # last: the connection that may write closes the file
                    await db.close()

    def set_deadline(self, seconds: float | None) -> None:
        # Real time, as SQLite's busy waits are (read in the connection thread).
        self._give_up_at = None if seconds is None else time.monotonic() + seconds  # noqa: TID251

    def _while_busy(
        self, db: sqlite3.Connection, write: Callable[[], T], *, pause: float = 0.0
    ) -> T:
        """Run ``write`` (one statement, or a whole transaction), again while the file is
        busy, for ``_BUSY_RETRIES`` busy timeouts in all (a long writer is ridden out),
        or until the deadline (``set_deadline``); past that, it is tried once. Each try
        waits at most ``_BUSY_SLICE`` (the connection's busy timeout), then ``pause``
        seconds (for a statement SQLite refuses without waiting). Runs in the
        connection thread."""
        # The thread's own waits are real time, as SQLite's busy handler's are.
        started = time.monotonic()  # noqa: TID251
        give_up_at = started + self.busy_timeout * _BUSY_RETRIES
        warn_at = started + self.busy_timeout
        while True:
            try:
                return write()
            except sqlite3.OperationalError as error:
                if not is_busy(error) or db.in_transaction:
                    raise
                now = time.monotonic()  # noqa: TID251
                deadline = self._give_up_at
                if now >= give_up_at or (deadline is not None and now >= deadline):
                    raise
            if now >= warn_at:
                warn_at += self.busy_timeout
                logger.warning("SQLite store busy: another connection holds the write lock")
            if pause:
                time.sleep(pause)  # in the connection thread, not the loop

    async def _call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(connection, ...)`` in the writing connection's thread."""
        return await self._in_thread(False, fn, *args, **kwargs)

    async def _read_call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(connection, ...)``, which only reads, in the reading connection's
        thread (see the module's docstring). ``fn`` must step every statement to its
        end (fetchall): one left open would hold its read transaction, and later reads
        would not see later commits."""
        return await self._in_thread(True, fn, *args, **kwargs)

    async def _in_thread(
        self,
        reading: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` on the reading or the writing connection; map driver errors."""
        while True:
            db, raw = (self._reader, self._reader_raw) if reading else (self._db, self._raw)
            if db is not None and raw is not None:
                break
            await self.open()  # not open yet, or closed again meanwhile
        self._in_flight += 1
        try:
            result: T = await db._execute(fn, raw, *args, **kwargs)  # type: ignore[no-untyped-call]
        except DRIVER_ERRORS as error:
            raise self._error(error) from error
        finally:
            self._in_flight -= 1
        return result

    def _error(self, error: Exception) -> StoreError:
        """A driver error (``DRIVER_ERRORS``) as a ``StoreError`` (``error_kind``)."""
        return error_kind(error)(f"SQLite store {self.path}: {error}{self._open_hint(error)}")

    def _open_hint(self, error: Exception) -> str:
        """What SQLite's "unable to open database file" leaves out: a file that is there
        and readable fails so in a folder this process cannot write to, when no other
        process has it open, as SQLite then makes its log and shared memory files."""
        if "unable to open database file" not in str(error):
            return ""
        name = self.path.name
        return (
            f" (SQLite keeps {name}-wal and {name}-shm beside the file, and makes them "
            f"when no other process has it open: can this process write to "
            f"{self.path.parent}?)"
        )

    def _write(
        self,
        db: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` in a write transaction that begins IMMEDIATE (in the thread)."""

        def transaction() -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db, *args, **kwargs)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return self._while_busy(db, transaction)

    def _statement(
        self,
        db: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn``, which runs exactly one write statement, in autocommit mode."""
        return self._while_busy(db, lambda: fn(db, *args, **kwargs))

    async def _transaction(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        result = await self._call(self._write, fn, *args, **kwargs)
        self._committed()
        return result

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
        if self._inline is None:
            return None
        write = self._inline.try_transaction if transaction else self._inline.try_write
        pauses = iter(_INLINE_PAUSES)
        spin_until: float | None = None
        while True:
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

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float | Callable[[], float]) -> Inserted:
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

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobRow | None:
        rows = await self._read_call(
            _fetchall,
            f"SELECT {_SELECT} FROM asyncjobs_jobs WHERE id = ?",  # noqa: S608 - constant columns
            (job_id,),
        )
        return _row(rows[0]) if rows else None

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
        now: float,
        preview: int | None = None,
    ) -> list[JobRow]:
        where, params = _status_filter(status, now)
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if task is not None:
            where.append("task = ?")
            params.append(task)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        sql = f"SELECT {_SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant columns
        if preview is not None:
            preview = checked_preview(preview)
            sql = f"SELECT {_PREVIEW_SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant
            params[:0] = [preview + 1] * len(PREVIEWED)  # its substr()s' ?s come first
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        rows = await self._read_call(_fetchall, sql, tuple(params))
        if preview is None:
            return [_row(r) for r in rows]
        n = len(COLUMNS)
        return [previewed(_row(r[:n]), preview, r[n:]) for r in rows]

    async def retry(self, job_id: str, *, now: float) -> bool:
        return await self._transaction(_retry, job_id, now)

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        return await self._transaction(_cancel, job_ids, now)

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        if status is None and older_than is None:
            raise ValueError("purge() needs a status or older_than")
        total, below = 0, _NEWEST
        while below is not None:  # one short transaction a batch, newest jobs first
            deleted, below = await self._transaction(_delete_batch, status, older_than, below, now)
            total += deleted
        return total

    async def set_progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        *,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> None:
        await self._transaction(
            _rowcount,
            "UPDATE asyncjobs_jobs SET progress = ?, progress_message = ? "
            "WHERE id = ? AND status = 'running' "
            "AND (? IS NULL OR worker = ?) AND (? IS NULL OR attempts = ?)",
            (progress, message, job_id, worker, worker, attempt, attempt),
        )

    async def counts(self, *, now: float) -> dict[tuple[str, str, str], int]:
        rows = await self._read_call(
            _fetchall,
            "SELECT queue, task, CASE WHEN status IN ('scheduled', 'queued') THEN "
            "CASE WHEN run_at > ? THEN 'scheduled' ELSE 'queued' END ELSE status END AS s, "
            "count(*) FROM asyncjobs_jobs GROUP BY queue, task, s",
            (now,),
        )
        return {(q, t, s): n for q, t, s, n in rows}

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        return dict(await self._read_call(_batch_counts, batch_id))

    async def pending_keys(self, tasks: Collection[str], *, limit: int) -> builtins.list[JobRow]:
        return await self._read_call(pending_keys, tasks, limit)

    async def set_rate_keys(self, keys: Sequence[RateKeyed]) -> None:
        if keys:
            await self._transaction(set_rate_keys, keys)

    # -- operations (see asyncjobs/_stats.py) -----------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        return await self._read_call(_read, _snapshot, now, windows, sample, workers_since)

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        await self._transaction(_record_worker, beat, now)

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        return await self._transaction(_prune, finished_before, dead_before, workers_before, limit)

    async def prune_buckets(self, *, full_before: Mapping[str, float], limit: int) -> int:
        if not full_before:
            return 0
        return await self._transaction(_prune_buckets, full_before, limit)

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        total, after = 0, _FIRST_BATCH
        while after is not None:  # one short transaction a batch
            requeued, after = await self._transaction(_requeue_dead_batch, queue, task, after, now)
            total += requeued
        return total

    async def delete(self, job_ids: Sequence[str], *, now: float) -> int:
        if not job_ids:
            return 0
        return await self._transaction(_delete_ids, job_ids, now)

    # meta and last_slot stay on the writing connection: meta stores its default on
    # first use, last_slot records a slot when given one.

    async def meta(self, key: str, default: str) -> str:
        stored = await self._read_call(_fetchall, META_VALUE, (key,))  # no write if stored
        if stored:
            return str(stored[0][0])
        return await self._transaction(_meta, key, default)

    async def last_slot(self, schedule: str, slot: int | None = None) -> int | None:
        return await self._transaction(_last_slot, SLOT_KEY + schedule, slot)


# -- the functions below run in the connection thread, inside a transaction ---------


def _weight(outcomes: Sequence[Outcome]) -> int:
    """The rows a write of ``outcomes`` counts as against ``INLINE_ROWS``: past that
    when their results and errors come to over ``INLINE_BYTES``."""
    size = 0
    for outcome in outcomes:
        size += len(outcome.result or "") + len(outcome.error or "")
    return len(outcomes) if size <= INLINE_BYTES else INLINE_ROWS + 1


def _query_only(db: sqlite3.Connection) -> None:
    # The reading connection refuses any write: one sent there by mistake fails loudly
    # instead of writing outside the busy retries and the checkpointer's count.
    db.execute("PRAGMA query_only = ON")
    # One read now opens the file's WAL and shared memory while they are the ones the
    # writing connection uses: opened on the first real read instead, a file deleted
    # (or replaced) meanwhile would leave this connection failing, or on another WAL.
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()


def _fetchall(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _rowcount(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return db.execute(sql, params).rowcount


# A deletion (discard, purge) of the jobs matching a condition: _UNFINISHED + condition
# finds the unfinished ones (and whether they belong to a chain or batch), and
# _DELETE + condition + _DELETE_END deletes what the condition matched before the
# cancel in between changed any row: finished rows it matches (but not those that
# cancel just finished), and the unfinished ones found first (not those it released).
_UNFINISHED = (
    "SELECT id, chain_next IS NOT NULL OR batch_id IS NOT NULL FROM asyncjobs_jobs "
    "WHERE status IN ('waiting', 'scheduled', 'queued') AND "
)
_DELETE = "DELETE FROM asyncjobs_jobs WHERE status != 'running' AND (("
_DELETE_END = (
    ") AND status NOT IN ('waiting', 'scheduled', 'queued') "
    "AND id NOT IN (SELECT value FROM json_each(?)) OR id IN (SELECT value FROM json_each(?))) "
    "RETURNING chain_next, batch_id, status, finished_at"
)


def _delete(
    db: sqlite3.Connection,
    unfinished_sql: str,
    delete_sql: str,
    params: Sequence[Any],
    now: float,
    walk_sql: str | None = None,
    walk_params: Sequence[Any] = (),
) -> int:
    """Delete the jobs a condition matches, unless running. An unfinished member of a
    chain or batch is cancelled first, as ``cancel`` would, so what waits on it moves on
    (the rest of its chain is cancelled, its batch's on_complete still comes). A chain
    member retried by hand that waits for a deleted dead or cancelled one is cancelled
    too: nothing is left to release it. A purge's ``walk_sql`` (``_PURGE_FOLLOWERS``,
    its condition's ``walk_params``) then takes the members that ``PURGEABLE`` kept for
    the ones deleted."""
    unfinished = db.execute(unfinished_sql, params).fetchall()
    members = [job_id for job_id, member in unfinished if member]
    changed = _cancel(db, members, now, reason="discarded") if members else []
    matched = [job_id for job_id, _ in unfinished]
    deleted = db.execute(delete_sql, (*params, json.dumps(changed), json.dumps(matched)))
    rows = deleted.fetchall()
    after = [chain_next for chain_next, _, _, _ in rows if chain_next is not None]
    if walk_sql is not None and after:
        walk = (json.dumps(after), *walk_params, *walk_params)
        rows += db.execute(walk_sql, walk).fetchall()
    tally_deleted(db, [(batch_id, status, at) for _, batch_id, status, at in rows])
    followers = [chain_next for chain_next, _, _, _ in rows if chain_next is not None]
    if followers:
        waiting = db.execute(
            "SELECT id FROM asyncjobs_jobs WHERE status = 'waiting' "
            "AND id IN (SELECT value FROM json_each(?))",
            (json.dumps(followers),),
        ).fetchall()
        _cancel(db, [job_id for (job_id,) in waiting], now)
    return len(rows)


_FIRST_BATCH: int | None = 0  # the seq the first batch comes after
_NEWEST: int | None = 2**63 - 1  # no seq is above it: a purge's first batch
_PICK_NOT_RUNNING = "SELECT id, seq FROM asyncjobs_jobs WHERE status != 'running' AND "
# The run of chain members after the jobs a purge deleted (a JSON list of their
# chain_next) that PURGEABLE kept while the one before each was stored: cancelled before
# they ran, they go with it when the purge's condition ({matching}, whose parameters
# follow the list twice) takes them too. The walk stops at the first that is not one.
# CROSS JOIN: the walk drives a lookup by id per member (as _PRUNE_FOLLOWERS).
# It takes nothing the purge itself cancelled: the member waiting for a deleted one
# is cancelled after the walk (_delete), and the rest of an unfinished job it deletes
# finished now, which no purge condition matches (not dead, not finished before
# ``now``, and a purge of cancelled jobs matches no unfinished job).
_PURGE_FOLLOWERS = (
    "WITH RECURSIVE rest(id) AS (SELECT value FROM json_each(?) UNION ALL "  # noqa: S608 - constant
    "SELECT j.chain_next FROM rest CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id "
    f"WHERE j.chain_next IS NOT NULL AND {PURGE_FOLLOWER} AND {{matching}}) "
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT j.seq FROM rest "
    f"CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id WHERE {PURGE_FOLLOWER} "
    "AND {matching}) RETURNING chain_next, batch_id, status, finished_at"
)
_BY_ID = "id IN (SELECT value FROM json_each(?))"


def _delete_ids(db: sqlite3.Connection, job_ids: Sequence[str], now: float) -> int:
    ids = (json.dumps(list(job_ids)),)
    return _delete(db, _UNFINISHED + _BY_ID, _DELETE + _BY_ID + _DELETE_END, ids, now)


def _delete_batch(
    db: sqlite3.Connection, status: str | None, older_than: float | None, below: int, now: float
) -> tuple[int, int | None]:
    """Delete the newest ``ADMIN_BATCH`` jobs a purge matches (``PURGEABLE`` among those
    with ``status``, finished before ``older_than``) whose seq is at most ``below``;
    return how many, and the next batch's ``below`` (None: that was the last).

    Newest first, so that a purge deletes what its condition matched before it began,
    as PostgreSQL's one statement does: what a batch changes without deleting it (the
    on_complete that cancelling a batch's last member releases, a chain member
    cancelled after one it deletes) was inserted after the job that changed it, in the
    same insert, so its seq is higher, and no later batch looks at it. The run after a
    deleted member that ``_PURGE_FOLLOWERS`` takes with it is taken whole in this batch,
    whether an earlier batch passed over it (kept then) or not."""
    where, params = _status_filter(status, now)
    if older_than is not None:
        where.append("finished_at < ?")
        params.append(older_than)
    # Only fixed terms with ? placeholders are joined here; values go in params.
    matching = " AND ".join(where)
    walk = _PURGE_FOLLOWERS.format(matching=matching)
    pick = f"{_PICK_NOT_RUNNING}{matching} AND {PURGEABLE} AND seq <= ? ORDER BY seq DESC LIMIT ?"
    rows = db.execute(pick, (*params, below, ADMIN_BATCH)).fetchall()
    ids = (json.dumps([job_id for job_id, _ in rows]),)
    unfinished, delete = _UNFINISHED + _BY_ID, _DELETE + _BY_ID + _DELETE_END
    deleted = _delete(db, unfinished, delete, ids, now, walk, params) if rows else 0
    return deleted, rows[-1][1] - 1 if len(rows) == ADMIN_BATCH else None


def _status_filter(status: str | None, now: float) -> tuple[list[str], list[Any]]:
    """WHERE terms for a status as users see it (scheduled/queued follow run_at)."""
    if status is None:
        return [], []
    if status == "scheduled":
        return ["status IN ('scheduled', 'queued')", "run_at > ?"], [now]
    if status == "queued":
        return ["status IN ('scheduled', 'queued')", "run_at <= ?"], [now]
    if status == "dead":  # with the statuses this version does not know, as reads show them
        return [DEAD_AS_READ], []
    return ["status = ?"], [str(status)]
