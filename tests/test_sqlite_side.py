"""The SQLite store's side connections: WAL checkpoints off the connection thread, and
change detection on the event loop thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from asyncjobs.stores import SQLiteStore
from asyncjobs.stores._protocol import NewJob
from asyncjobs.stores._sqlite_side import AUTOCHECKPOINT_PAGES, CHECKPOINT_EVERY


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
