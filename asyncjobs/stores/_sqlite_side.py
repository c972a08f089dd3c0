"""Side connections of the SQLite store, so its connection thread only runs SQL that
callers wait for, and the hot path's short writes need not wait for that thread at all.

- ``Checkpointer`` copies the write-ahead log back into the database file (a PASSIVE
  checkpoint) on a worker thread of its own, every ``every`` commits. SQLite's own
  automatic checkpoint runs inside a commit, on the connection thread, and its fsync
  of the database file (milliseconds on a slow disk) would delay every claim and
  enqueue queued behind it. The store raises the automatic threshold to a safety net
  (``AUTOCHECKPOINT_PAGES``) that this checkpointer keeps the log from reaching.
- ``ChangeWatch`` reads ``PRAGMA data_version`` on the event loop thread: an idle
  runner asks ten times a second whether another process committed, and a few
  microseconds here beat a round trip through the connection thread.
- ``InlineWriter`` runs the short writes of the hot path (an enqueue, a runner's
  finish-and-claim) on the event loop thread when no other connection is writing
  (synchronous=NORMAL only, where a commit does not fsync).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import anyio

logger = logging.getLogger("asyncjobs")

P = ParamSpec("P")
T = TypeVar("T")

AUTOCHECKPOINT_PAGES = 4000
"""SQLite's automatic checkpoint threshold on the store's connections (16 MiB of log at
4 KiB pages): reached only if the checkpointer falls behind."""

CHECKPOINT_EVERY = 100
"""Commits between checkpoints: a commit adds a few pages, so the log stays well under
SQLite's default threshold of 1,000 pages."""

TRUNCATE_PAGES = AUTOCHECKPOINT_PAGES // 2
"""A log this long that a PASSIVE checkpoint could not copy back in full was held back
by readers (another process's dashboard or metrics scrape, back to back): the
checkpointer then waits for them (``TRUNCATE_WAIT_MS``) to copy it all and cut the file
to nothing. PASSIVE alone let the file grow without bound, and the safety net would
copy it all inside a commit, on the event loop."""

TRUNCATE_WAIT_MS = 1000
"""How long that TRUNCATE checkpoint waits for readers (and holds off writers, which
wait in turn: at most this long, and only while the log is that long)."""


LOG_SIZE_LIMIT = 32 * 1024 * 1024
"""Bytes of log file a writer keeps when it starts the log over (twice the safety net's
16 MiB). A burst the checkpoints could not keep up with (an ``enqueue_many`` of a
million jobs is one transaction) grew the file to its peak, and the file kept that
size on disk for good; the log is only ever started over, never shrunk, without it."""


def set_log_policy(db: sqlite3.Connection) -> None:
    """On a writing connection: raise the automatic checkpoint threshold to the safety
    net (the checkpointer's thread does the work), and cap the log a reset leaves."""
    db.execute("PRAGMA wal_autocheckpoint=4000")  # AUTOCHECKPOINT_PAGES; no parameters
    db.execute("PRAGMA journal_size_limit=33554432")  # LOG_SIZE_LIMIT


def is_busy(error: sqlite3.OperationalError) -> bool:
    """Did another connection hold the lock (SQLITE_BUSY or SQLITE_LOCKED)?"""
    message = str(error)
    return "locked" in message or "busy" in message


def _unless_busy(
    db: sqlite3.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T | None:
    """``fn(db, ...)``, or None if another connection held the lock (nothing done)."""
    try:
        return fn(db, *args, **kwargs)
    except sqlite3.OperationalError as error:
        if is_busy(error):
            return None
        raise


def read_text(data: bytes) -> str:
    """A TEXT value as read (a connection's ``text_factory``). SQLite keeps whatever
    bytes another program wrote: bytes that are not UTF-8 become ``\\xNN`` escapes
    instead of failing the read of every row beside them (a claim, a list). Such a
    payload no longer parses as JSON, so its job goes dead, "cannot be decoded"."""
    return data.decode("utf-8", "backslashreplace")


def _side_connection(path: Path) -> sqlite3.Connection:
    # timeout=0: neither connection ever waits for a lock; busy means "try later".
    db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    db.text_factory = read_text
    return db


class Checkpointer:
    """Runs a PASSIVE WAL checkpoint in a worker thread every ``every`` commits.

    ``committed()`` is called on the event loop thread after each commit; at most one
    checkpoint runs at a time. PASSIVE never waits: with another process's
    checkpoint or a long reader in the way it copies what it can, and the next one
    goes on from there. If readers held back a log ``truncate_pages`` long, a
    TRUNCATE checkpoint waits for them and empties it. One that could not (a reader
    stayed the whole wait, meanwhile holding every writer off) is tried again only once
    the log has doubled: a reader that never ends stalls writers a few times, not at
    every checkpoint.
    """

    def __init__(
        self, path: Path, *, every: int = CHECKPOINT_EVERY, truncate_pages: int = TRUNCATE_PAGES
    ) -> None:
        self._path = path
        self._every = every
        self._truncate_pages = truncate_pages
        self._truncate_at = truncate_pages  # doubled while a TRUNCATE cannot finish
        self._commits = 0
        self._running: asyncio.Task[None] | None = None
        self._db: sqlite3.Connection | None = None  # one worker thread at a time
        self.checkpoints = 0  # completed, for tests and curiosity

    def committed(self, commits: int = 1) -> None:
        self._commits += commits
        if self._commits < self._every:
            return
        if self._running is not None and not self._running.done():
            return  # the next commit asks again
        self._commits = 0
        self._running = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._checkpoint), name="asyncjobs WAL checkpoint"
        )

    def connect(self) -> sqlite3.Connection:
        """Open this checkpointer's connection now, beside the store's (blocking: in a
        thread). Opened at the first checkpoint instead, after the file was deleted under
        the open store, it created an empty database at the path and checkpointed that
        one, not the log the store writes. One read opens the log and shared memory the
        store's connections use."""
        if self._db is None:
            db = _side_connection(self._path)
            # PASSIVE never waits; only the TRUNCATE in _checkpoint does.
            db.execute("PRAGMA busy_timeout=1000")  # TRUNCATE_WAIT_MS
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()
            self._db = db
        return self._db

    def _checkpoint(self) -> None:
        try:
            db = self.connect()
            ((_, frames, copied),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if frames < self._truncate_pages:  # the log started over: readers let it
                self._truncate_at = self._truncate_pages
            elif frames >= self._truncate_at and copied < frames:
                ((busy, _, _),) = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                # Busy: a reader stayed (maybe one that never ends, a transaction left
                # open in any process). Wait for readers again once the log has doubled,
                # or every checkpoint from here on would hold writers off the whole wait.
                self._truncate_at = 2 * frames if busy else self._truncate_pages
            self.checkpoints += 1
        except sqlite3.Error as error:
            # Busy, or the disk failed: the safety net threshold still bounds the log.
            logger.debug("SQLite WAL checkpoint of %s skipped: %s", self._path, error)

    async def idle(self) -> None:
        """Wait for the checkpoint in progress, if any."""
        await _ended(self._running)

    def close_unless_running(self) -> None:
        """Close the connection now unless a checkpoint is under way on it (in a forked
        child, where the thread running it did not come along: it is left alone)."""
        if self._running is None or self._running.done():
            db, self._db = self._db, None
            if db is not None:
                db.close()

    async def close(self, wait: float) -> None:
        """Close the connection once the checkpoint under way, if any, has ended, for
        at most ``wait`` seconds of real time: past it, its thread is stuck (disk I/O
        that does not return), and closes the connection once it does."""
        running = self._running
        with anyio.move_on_after(wait) as waited:
            await _ended(running)
        self._running = None
        db, self._db = self._db, None
        if running is not None and waited.cancelled_caught:
            logger.error(
                "SQLite store %s: the WAL checkpoint's thread is stuck (%ss); not waiting "
                "for it: its connection closes once it returns", self._path, wait,
            )  # fmt: skip
            if db is not None:  # in a thread: the last connection to close checkpoints
                running.add_done_callback(lambda _: _close_in_a_thread(db))
        elif db is not None:
            db.close()


class ChangeWatch:
    """Has another connection committed since the last look? (event loop thread).

    Its connection also serves the idle runner's one other read, ``try_read``.
    """

    def __init__(self, path: Path) -> None:
        self._db = _side_connection(path)
        self._version = self._read()

    def _read(self) -> int:
        # fetchall, not fetchone: a statement not stepped to its end keeps its read
        # transaction open, and an open reader stops every checkpoint at its snapshot.
        ((version,),) = self._db.execute("PRAGMA data_version").fetchall()
        return int(version)

    def changed(self) -> bool:
        version = self.version()
        if version is None:
            return True  # busy (another process is recovering the log): go and look
        changed = version != self._version
        self._version = version
        return changed

    def version(self) -> int | None:
        """The file's ``data_version`` now: it changes with every commit of another
        connection (this store's own too). None: busy."""
        try:
            return self._read()
        except sqlite3.OperationalError:
            return None

    def try_read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """``fn(connection, ...)``: a short indexed read (an idle runner's next wake-up
        time) on the loop thread; None if the file is busy: read it through the thread."""
        return _unless_busy(self._db, fn, *args, **kwargs)

    def close(self) -> None:
        self._db.close()


class InlineWriter:
    """Runs a short write on the event loop thread, if the file is free right now.

    A round trip through the store's connection thread costs two thread wake-ups,
    which on a virtual machine take longer than inserting one job: a lone sequential
    enqueue waited about 260 µs, of which the insert took 50. Worse, under load every
    SQLite call in that thread gives the GIL up and must win it back from a busy event
    loop, so a runner's finish-and-claim waited milliseconds for a few hundred
    microseconds of work. With synchronous=NORMAL a WAL commit does not fsync
    (checkpoints do, on their own thread), so a write of a bounded batch is CPU work
    of tens to hundreds of microseconds, cheaper here than the hand-over.

    It never waits for a lock: when another connection (this store's own thread
    included) holds the write lock, the write is refused at once, nothing of it is
    written, and it returns None: the caller goes through the thread, which waits.
    """

    def __init__(self, path: Path) -> None:
        self._db = _side_connection(path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The safety net stays on here too: with writes back to back, the log starts
        # over only after a checkpoint inside a commit (the checkpointer's, beside it,
        # never finds it all copied when a write begins), and a log left to grow makes
        # every commit dearer (2 µs per enqueue at 22,000 frames). The checkpointer
        # has copied nearly all of it by then, unless readers held it back (see there).
        set_log_policy(self._db)

    def try_write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """``fn(connection, ...)``, which must run exactly one write statement
        (autocommit) and not return None; None if the file is locked."""
        return _unless_busy(self._db, fn, *args, **kwargs)

    def try_transaction(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """``fn(connection, ...)`` in a transaction that begins IMMEDIATE; ``fn`` must not
        return None. None if the file is locked, at the start or (never expected in
        WAL mode) later: the transaction is rolled back, so nothing was written."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = fn(db, *args, **kwargs)
            db.execute("COMMIT")
        except BaseException as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(error, sqlite3.OperationalError) and is_busy(error):
                return None
            raise
        return result

    def close(self) -> None:
        self._db.close()


async def _ended(running: asyncio.Task[None] | None) -> None:
    """Wait for a checkpoint's task, if it is under way in this event loop."""
    if running is None or running.done():
        return
    if running.get_loop() is not asyncio.get_running_loop():
        return  # an earlier event loop's (asyncio.run per call), which waited for it
    await asyncio.shield(running)


def _close_in_a_thread(db: sqlite3.Connection) -> None:
    """Close ``db`` off the event loop: the last connection to a file closing checkpoints
    its log (disk I/O, which may be slow where a checkpoint was stuck)."""
    name = "asyncjobs: close the WAL checkpointer's connection"
    threading.Thread(target=db.close, name=name, daemon=True).start()
