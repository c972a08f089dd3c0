"""A call made while another task opens the SQLite store (its schema still being set
up or migrated) waits for that open; it never runs on the writing connection before
the setup has ended. Queued behind the setup in the connection's thread instead, it
ran even when the open failed or was cancelled: on a file left unmigrated, or on one a
newer asyncjobs migrated, which the open had just refused."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from test_store_sqlite import new_job

import asyncjobs.stores._sqlite_connections
import asyncjobs.stores._sqlite_hot_path
from asyncjobs import StoreError
from asyncjobs.stores import SQLiteStore
from asyncjobs.stores._migrations import migration_scripts
from asyncjobs.stores._sqlite_schema import SCHEMA_VERSION_TABLE, migrate, schema_current

JOB = "a" * 32


async def made(call: asyncio.Task[object]) -> None:
    """Let ``call`` run up to its wait (in the connection's thread, or for the open)."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()
    assert not call.done()


async def test_a_write_made_while_an_open_migrates_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open's caller is cancelled mid-migration (a request's timeout): the migration
    rolls back, and the enqueue made meanwhile opens the store itself and goes in,
    instead of running on the unmigrated file ("no such table")."""
    running = threading.Event()
    migrations: list[sqlite3.Connection] = []

    def slow_migrate(db: sqlite3.Connection) -> None:
        migrations.append(db)
        if len(migrations) == 1:
            # Set once the statement runs: an interrupt before it would miss it.
            db.set_progress_handler(running.set, 1000)
            try:
                db.execute(  # a long index build, which the cancelled open interrupts
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                    "WHERE x < 10000000000) SELECT count(*) FROM c"
                ).fetchall()
            finally:
                db.set_progress_handler(None, 0)
        migrate(db)

    monkeypatch.setattr(asyncjobs.stores._sqlite_connections, "migrate", slow_migrate)
    store = SQLiteStore(tmp_path / "jobs.db")
    opening = asyncio.create_task(store.open())
    writing: asyncio.Task[object] | None = None
    try:
        assert await anyio.to_thread.run_sync(running.wait, 5)
        writing = asyncio.create_task(store.insert([new_job(JOB)], now=0.0))
        await made(writing)
        opening.cancel()
        with anyio.fail_after(10):
            assert await writing == [JOB]
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert len(migrations) == 2  # the write's own open migrated the file
        assert await store.get(JOB) is not None
    finally:
        opening.cancel()
        if writing is not None:
            writing.cancel()
        await store.close()


async def test_a_write_made_while_an_open_refuses_a_newer_file_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open refuses a file a newer asyncjobs migrated: an enqueue made while it
    looked at the schema fails the same way, and writes no job into that file."""
    path = tmp_path / "jobs.db"
    latest = migration_scripts("sqlite")[-1][0]
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
        db.execute(
            f"INSERT INTO {SCHEMA_VERSION_TABLE} (version, applied_at) VALUES (?, 0)",
            (latest + 1,),
        )
    db.close()
    looking, go = threading.Event(), threading.Event()

    def slow_schema_current(db: sqlite3.Connection) -> bool:
        looking.set()
        go.wait(5)
        return schema_current(db)

    monkeypatch.setattr(asyncjobs.stores._sqlite_connections, "schema_current", slow_schema_current)
    store = SQLiteStore(path)
    opening = asyncio.create_task(store.open())
    writing: asyncio.Task[object] | None = None
    try:
        assert await anyio.to_thread.run_sync(looking.wait, 5)
        writing = asyncio.create_task(store.insert([new_job(JOB)], now=0.0))
        await made(writing)
        go.set()
        with anyio.fail_after(10):
            with pytest.raises(StoreError, match="newer than this asyncjobs knows"):
                await opening
            with pytest.raises(StoreError, match="newer than this asyncjobs knows"):
                await writing
    finally:
        go.set()
        opening.cancel()
        if writing is not None:
            writing.cancel()
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone() == (0,)
    db.close()


async def test_a_write_paused_on_the_loop_when_the_open_fails_goes_through_its_own_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write made during the open's last step (the file set up, its side
    connections made) runs on the loop, and pauses while another connection holds the
    file. The open then fails and closes those side connections: the write tried again
    on the one it had started with, and failed ("Cannot operate on a closed database").
    Now it goes through the connection thread, whose own open lets it in."""
    monkeypatch.setattr(asyncjobs.stores._sqlite_hot_path, "_INLINE_SPIN", 0.0)
    monkeypatch.setattr(asyncjobs.stores._sqlite_hot_path, "_INLINE_PAUSES", (0.05,) * 100)
    reached, go = threading.Event(), threading.Event()
    query_only = asyncjobs.stores._sqlite_connections._query_only

    def failing_once(db: sqlite3.Connection) -> None:
        if not reached.is_set():
            reached.set()
            go.wait(5)
            raise sqlite3.OperationalError("disk I/O error")
        query_only(db)

    monkeypatch.setattr(asyncjobs.stores._sqlite_connections, "_query_only", failing_once)
    store = SQLiteStore(tmp_path / "jobs.db")
    opening = asyncio.create_task(store.open())
    writing: asyncio.Task[object] | None = None
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    try:
        assert await anyio.to_thread.run_sync(reached.wait, 5)
        other.execute("BEGIN IMMEDIATE")  # the write pauses on the loop
        writing = asyncio.create_task(store.insert([new_job(JOB)], now=0.0))
        await made(writing)
        go.set()
        with anyio.fail_after(10):
            with pytest.raises(StoreError, match="disk I/O error"):
                await opening
            other.rollback()
            assert await writing == [JOB]
        assert await store.get(JOB) is not None
    finally:
        go.set()
        other.close()
        opening.cancel()
        if writing is not None:
            writing.cancel()
        await store.close()
