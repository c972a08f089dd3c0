"""The SQLite store's side connections: WAL checkpoints off the connection thread, and
change detection on the event loop thread."""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path

import anyio
import pytest

from asyncjobs.stores import SQLiteStore
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.stores._sqlite_hot_path import INLINE_ROWS
from asyncjobs.stores._sqlite_side import (
    AUTOCHECKPOINT_PAGES,
    CHECKPOINT_EVERY,
    LOG_SIZE_LIMIT,
    Checkpointer,
)


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=1,
    )  # fmt: skip


async def test_checkpoints_run_beside_the_connection_and_let_the_log_restart(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    checkpointer = store._checkpointer
    assert checkpointer is not None

    def log_frames() -> int:
        # A fresh connection's PASSIVE checkpoint reports the frames in the log.
        with sqlite3.connect(tmp_path / "s.db") as db:
            ((_, frames, _),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        db.close()
        return int(frames)

    try:
        pages = await store._call(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone())
        assert pages == (AUTOCHECKPOINT_PAGES,)  # SQLite's own only as a safety net
        commits = 2 * CHECKPOINT_EVERY  # well under the safety net: SQLite copies nothing
        for i in range(commits):
            await store.insert([new_job(f"job-{i:05d}")], now=float(i))
            await store.changed()  # the watch's reads must not pin the log either
        await checkpointer.idle()
        assert checkpointer.checkpoints >= 1
        checkpointer.committed(CHECKPOINT_EVERY)  # copy the rest, now that writes paused
        await checkpointer.idle()
        await store.insert([new_job("after")], now=0.0)
        # The log was fully copied back, so that commit started it over.
        assert log_frames() < 20
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone() == (commits + 1,)
    db.close()


@pytest.mark.parametrize("rows", [60, INLINE_ROWS + 10])  # written on the loop, in the thread
async def test_the_log_file_shrinks_back_after_a_burst(tmp_path: Path, rows: int) -> None:
    """One transaction larger than the log limit (an enqueue_many of many jobs) grows
    the file past it; once the log is copied back, the next write starts it over and
    cuts the file to the limit, instead of keeping the burst's size on disk for good."""
    path = tmp_path / "s.db"
    wal = tmp_path / "s.db-wal"
    store = SQLiteStore(path)
    await store.open()
    try:
        payload = '{"args":["' + "x" * (42_000_000 // rows) + '"],"kwargs":{}}'
        await store.insert(
            [new_job(f"big-{i:03d}")._replace(payload=payload) for i in range(rows)], now=0.0
        )
        assert wal.stat().st_size > 40 * 1024 * 1024
        with sqlite3.connect(path) as db:  # copy the log back; nobody reads
            ((busy, frames, copied),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        db.close()
        assert busy == 0
        assert copied == frames
        await store.insert([new_job("after")], now=0.0)  # starts the log over
        assert wal.stat().st_size <= LOG_SIZE_LIMIT
    finally:
        await store.close()


async def test_changed_sees_a_plain_sqlite_writer_without_the_connection_thread(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        assert await store.changed() is False
        calls = 0
        db = store._db
        assert db is not None
        execute = db._execute

        async def counting(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return await execute(*args, **kwargs)  # type: ignore[no-untyped-call]

        db._execute = counting  # type: ignore[method-assign]
        with sqlite3.connect(tmp_path / "s.db", isolation_level=None) as other:
            other.execute(
                "INSERT INTO asyncjobs_meta (key, value) VALUES ('probe', '1')"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )
        other.close()
        assert await store.changed() is True
        assert await store.changed() is False
        assert calls == 0  # answered on the event loop thread
    finally:
        await store.close()


async def test_a_log_that_readers_kept_from_starting_over_is_emptied(tmp_path: Path) -> None:
    """Readers back to back (a dashboard, a metrics scrape in another process) keep a
    PASSIVE checkpoint from ever finishing, and the log from ever starting over."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.open()
    reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM asyncjobs_jobs").fetchall()  # its snapshot
        for i in range(100):
            await store.insert([new_job(f"job-{i:05d}")], now=float(i))
        assert store._checkpointer is not None
        await store._checkpointer.idle()  # its own PASSIVE one, which copied nothing
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > 100 * 4096  # noqa: ASYNC240 - a stat, in a test
        checkpointer = Checkpointer(path, every=1, truncate_pages=50)
        # The reader ends while the checkpoint waits for it (a real reader's query would).
        ends = threading.Timer(0.2, lambda: reader.execute("COMMIT"))
        ends.start()
        await anyio.to_thread.run_sync(checkpointer._checkpoint)
        ends.join()
        assert checkpointer.checkpoints == 1
        assert wal.stat().st_size == 0  # noqa: ASYNC240
        await store.insert([new_job("after")], now=0.0)  # and the log starts over
        assert wal.stat().st_size < 100 * 4096  # noqa: ASYNC240
        await checkpointer.close(5)
    finally:
        reader.close()
        await store.close()


def test_a_reader_that_never_ends_holds_writers_off_only_a_few_times(tmp_path: Path) -> None:
    """A read transaction left open (an app's connection that began one and forgot it,
    in any process) keeps every checkpoint from copying the log past its snapshot. The
    TRUNCATE checkpoint that waits for readers also holds every writer off while it
    waits (a whole second): it tried again at every checkpoint once the log was that
    long, and with such a reader 6,000 enqueues took 59 s instead of 1.4. After one
    that could not finish, the next waits until the log is twice as long."""
    path = tmp_path / "s.db"
    writer = sqlite3.connect(path, isolation_level=None)
    reader = sqlite3.connect(path, isolation_level=None)
    checkpointer = Checkpointer(path, every=1, truncate_pages=10)
    truncates: list[str] = []
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's alone
        writer.execute("CREATE TABLE t (x BLOB)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()  # its snapshot, held for good
        db = checkpointer.connect()
        db.execute("PRAGMA busy_timeout=0")  # the waits themselves are not this test's
        db.set_trace_callback(lambda sql: truncates.append(sql) if "TRUNCATE" in sql else None)
        for _ in range(300):
            writer.execute("INSERT INTO t VALUES (zeroblob(3000))")  # a page or so each
            checkpointer._checkpoint()
        ((_, frames, _),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        assert frames > 300
        # At 10 pages, then at about 20, 40, 80...: once per doubling.
        assert 1 <= len(truncates) <= math.log2(frames / 10) + 1
        reader.execute("COMMIT")  # the reader ends: the log is copied back
        checkpointer._checkpoint()
        writer.execute("INSERT INTO t VALUES (zeroblob(3000))")  # and starts over
        checkpointer._checkpoint()
        reader.execute("BEGIN")  # readers hold it back again: waited for at 10 pages again
        reader.execute("SELECT count(*) FROM t").fetchall()
        truncates.clear()
        for _ in range(10):
            writer.execute("INSERT INTO t VALUES (zeroblob(3000))")
            checkpointer._checkpoint()
        assert truncates
    finally:
        reader.close()
        writer.close()
        if checkpointer._db is not None:
            checkpointer._db.close()
