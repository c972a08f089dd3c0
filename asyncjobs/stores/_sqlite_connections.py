"""How ``SQLiteStore`` reaches its file: opening it (WAL mode, the schema migrated, the
side connections of ``_sqlite_side``), closing it, forgetting the connections a forked
child inherited, and running a call in a connection's thread: a write there in a
transaction that begins IMMEDIATE and is tried again while the file is busy
(``_while_busy``). Driver errors (``DRIVER_ERRORS``) become ``StoreError`` here.

Pure reads (``get``, ``list``, the counts, the operations snapshot) go through a
second aiosqlite connection of their own, read-only. A write waits in its thread for
as long as another connection holds the file's lock, up to five busy timeouts: the
caller of ``jobs.transaction(conn)`` holds it until it commits, and a runner's claim
woken by its enqueue (or by the runner's poll) waits on it there. A read queued behind
that claim stalled the caller, who cannot commit before the read returns. In WAL mode
a reader never waits for a writer, so on its own connection the read returns at once;
and each read is a read transaction of its own, begun after the call was made, so it
sees every write committed before (on any connection).

``_Connections`` holds these methods of ``SQLiteStore``, which inherits them (through
``_HotPath``, ``_sqlite_hot_path``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from asyncjobs._errors import DataRefused, StoreError
from asyncjobs.stores._opening import Opening
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

_BUSY_RETRIES = 5
"""How many busy timeouts a write waits out before it gives up with StoreError."""

_BUSY_SLICE = 0.25
"""Seconds of one wait of the writing connection's busy handler (its busy timeout, set
when it connects): a write waits for a busy file in waits this long, so that a
deadline set meanwhile (``set_deadline``) ends the wait within one of them, not at the
end of a whole busy timeout."""


THREAD_CLOSE_TIME = 5.0
"""Seconds of real time ``close()`` waits for a connection's thread to close its
connection: the close is queued behind the call under way there, which the store's own
waits end in time (at the store's deadline, which shutdown sets), so a thread still in
it is stuck (a connection that does not answer). It is not waited for then: the call
goes on, a write in it is committed or not as if the store were open, and the thread
closes its connection and ends once it returns (a daemon, it does not hold the
process's exit). So long too for the WAL checkpoint under way, which only stuck disk
I/O holds (``Checkpointer.close``)."""

_WAL_PAUSE = 0.01
"""Seconds between tries to switch a file to WAL mode (``_switch_to_wal``), which SQLite
refuses at once, without its busy handler's wait, while another connection holds the
write lock: several processes opening a new file at once, each switching it."""


_STORES: weakref.WeakSet[_Connections] = weakref.WeakSet()
"""Every store of this process, for ``_forget_inherited`` in a forked child."""

_INHERITED: list[tuple[object, ...]] = []
"""What a forked child inherited from its parent's open stores: kept here, never used
(see ``SQLiteStore._forget_connections``)."""


def _forget_inherited() -> None:
    for store in list(_STORES):
        store._forget_connections()


os.register_at_fork(after_in_child=_forget_inherited)


class _Connections:
    """``SQLiteStore``'s writing and reading connections and its side connections, and
    running a call in a connection's thread."""

    if TYPE_CHECKING:
        path: Path
        synchronous: str
        busy_timeout: float
        _db: aiosqlite.Connection | None
        _raw: sqlite3.Connection | None
        _reader: aiosqlite.Connection | None
        _reader_raw: sqlite3.Connection | None
        _checkpointer: Checkpointer | None
        _watch: ChangeWatch | None
        _inline: InlineWriter | None
        _opening: Opening
        _open: bool
        _give_up_at: float | None
        _in_flight: int

    # -- connections -----------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        async with self._opening.lock:
            if not self._open:  # else another first use opened it meanwhile
                await self._opening.run(self, self._connect)
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
        # Set now, for _abandon_open to interrupt and close; the store's calls use them
        # once the open has ended (_in_thread), these calls of the open's own before.
        db, raw = self._db, self._raw = await self._thread_connection(
            min(self.busy_timeout, _BUSY_SLICE)
        )
        try:
            await self._run(db, raw, self._setup)
            checkpointer = self._checkpointer = Checkpointer(self.path)
            await self._run(db, raw, lambda _: checkpointer.connect())
            self._watch = await self._run(db, raw, lambda _: ChangeWatch(self.path))
            if self.synchronous == "NORMAL":  # FULL fsyncs each commit: not on the loop
                self._inline = await self._run(db, raw, lambda _: InlineWriter(self.path))
            reader, reader_raw = await self._thread_connection(self.busy_timeout)
            self._reader, self._reader_raw = reader, reader_raw
            await self._run(reader, reader_raw, _query_only)
        except BaseException:
            await self._abandon_open()
            raise

    async def _abandon_open(self) -> None:
        """Close what an open that failed, or was cancelled (``close()``, its caller),
        made. The call still under way in the writing connection's thread (a migration)
        is ended first, so that it does not go on behind the close, nor hold it for
        ``THREAD_CLOSE_TIME``: its statement is interrupted (rolled back), and a wait for
        another connection's lock gives up at its next try (a deadline of now)."""
        if self._raw is not None:
            self._raw.interrupt()
        deadline, self._give_up_at = self._give_up_at, time.monotonic()  # noqa: TID251
        try:
            await self._disconnect()
        finally:
            self._give_up_at = deadline

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
        # Once an open in progress (first uses) has ended, or been cancelled past
        # OPEN_CLOSE_TIME (``Opening.closing``): else it would open the store behind this.
        async with self._opening.closing(self):
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
        self._opening = Opening()  # the parent may have held it, opening

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
                await checkpointer.close(THREAD_CLOSE_TIME)
        finally:
            try:
                if reader is not None:
                    await self._close_thread(reader, "reading")
            finally:
                if db is not None:  # last: the connection that may write closes the file
                    await self._close_thread(db, "writing")

    async def _close_thread(self, db: aiosqlite.Connection, which: str) -> None:
        """Close ``db``, queued behind the call under way in its thread, for at most
        ``THREAD_CLOSE_TIME``: past it, the thread is stuck, and left to close it."""
        with anyio.move_on_after(THREAD_CLOSE_TIME) as waited:
            await db.close()
        if waited.cancelled_caught:
            logger.error(
                "SQLite store %s: the %s connection's thread is stuck in a call (%ss); "
                "not waiting for it to close: it closes once the call returns",
                self.path, which, THREAD_CLOSE_TIME,
            )  # fmt: skip

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
        """Run ``fn`` on the reading or the writing connection once the store is open:
        an open under way in another task is waited for. The writing connection is set
        before the open sets up and migrates the file through it: a call queued there
        behind that setup would run even when the open failed or was cancelled, on an
        unmigrated file, or on one a newer asyncjobs migrated, which the open refused."""
        while True:
            db, raw = (self._reader, self._reader_raw) if reading else (self._db, self._raw)
            if self._open and db is not None and raw is not None:
                return await self._run(db, raw, fn, *args, **kwargs)
            await self.open()  # not open yet, or closed again meanwhile

    async def _run(
        self,
        db: aiosqlite.Connection,
        raw: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(raw, ...)`` in ``db``'s thread; map driver errors."""
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

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()


def _query_only(db: sqlite3.Connection) -> None:
    # The reading connection refuses any write: one sent there by mistake fails loudly
    # instead of writing outside the busy retries and the checkpointer's count.
    db.execute("PRAGMA query_only = ON")
    # One read now opens the file's WAL and shared memory while they are the ones the
    # writing connection uses: opened on the first real read instead, a file deleted
    # (or replaced) meanwhile would leave this connection failing, or on another WAL.
    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
