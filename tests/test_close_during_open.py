"""``close()`` while the store is opening (``start()`` waiting on another process's
migration lock, a SQLite migration waiting on another connection's write lock): the
open is waited for ``OPEN_CLOSE_TIME``, then cancelled, so that the app's shutdown
ends. Opening itself is not bounded (a migration takes what it takes:
tests/test_start_bound.py); it is close() that cuts it short. The store is left closed,
and a later start opens it. (A close that waits for a first use's open, which ends in
time: tests/test_store_sqlite.py.)"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from test_close_bound import CLOSES_BY, MakeJobs
from test_start_bound import queued_job, runs_once_started

import asyncjobs.stores._opening
import asyncjobs.stores._sqlite_connections
from asyncjobs import Jobs, StoreError
from asyncjobs.stores import SQLiteStore
from asyncjobs.testing import FakeClock


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs.stores._opening, "OPEN_CLOSE_TIME", 0.3, raising=False)


@asynccontextmanager
async def open_held(jobs: Jobs, url: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another process holds what opening ``jobs``' store waits for, until the block
    ends: on PostgreSQL the migration lock (as another process's migration does), on
    SQLite the file's write lock, which its migration waits for (for a minute: five
    busy timeouts of 12 s). Yields a wait for the open to be waiting on it."""
    store = jobs.store
    if isinstance(store, SQLiteStore):
        store.busy_timeout = 12.0
        other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        other.execute("PRAGMA journal_mode=WAL")  # a new file, no schema yet
        migrating = threading.Event()
        write = store._write

        def noted(*args: Any, **kwargs: Any) -> Any:
            migrating.set()
            return write(*args, **kwargs)

        async def waiting_to_migrate() -> None:
            assert await anyio.to_thread.run_sync(migrating.wait, 5)

        store._write = noted  # type: ignore[method-assign]
        try:
            other.execute("BEGIN IMMEDIATE")
            yield waiting_to_migrate
        finally:
            other.close()
            del store._write
        return
    import asyncpg

    holder = await asyncpg.connect(url)

    async def waiting_on_the_lock() -> None:
        with anyio.fail_after(5):
            while not await holder.fetchval(
                # pg_locks, not pg_stat_activity: that is read once per transaction.
                "SELECT count(*) FROM pg_locks WHERE NOT granted "
                "AND $1 = ANY(pg_blocking_pids(pid))",
                holder.get_server_pid(),
            ):
                await anyio.lowlevel.checkpoint()

    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtext('asyncjobs.migrate:' || current_schema()))"
            )
            yield waiting_on_the_lock
    finally:
        await holder.close()


async def start_closed_meanwhile(jobs: Jobs, url: str) -> list[BaseException]:
    """``start()`` waits in the store's open; ``close()`` ends in time all the same,
    and tells the start it closed the store. What start() raised."""
    failed: list[BaseException] = []

    async def start() -> None:
        try:
            await jobs.start()
        except StoreError as error:
            failed.append(error)

    async with open_held(jobs, url) as waiting, anyio.create_task_group() as tg:
        tg.start_soon(start)
        await waiting()
        with anyio.fail_after(CLOSES_BY):
            await jobs.close()
        with anyio.fail_after(CLOSES_BY):
            while not failed:
                await anyio.lowlevel.checkpoint()
    assert not jobs.started
    return failed


async def test_close_cancels_an_open_that_waits_on_another_process(
    backend_url: str, make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture
) -> None:
    """The open waits on another process (for ever on PostgreSQL, a minute on SQLite):
    close() cancels it, start() fails saying so, the log says what close gave up on,
    and the store opens again at the next start."""
    jobs = make_jobs()
    if backend_url.startswith("postgres"):  # the open waits on the lock all the same
        job_id, _ = await queued_job(jobs)
    with caplog.at_level(logging.WARNING, "asyncjobs"):
        (failed,) = await start_closed_meanwhile(jobs, backend_url)
    assert "was closed while it opened" in str(failed)
    assert any("gave up after 0.3s on the open under way" in r.message for r in caplog.records)
    assert not any("thread is stuck" in r.message for r in caplog.records)
    if backend_url.startswith("postgres"):
        await runs_once_started(jobs, job_id)
        return
    # The migration did not go on in the connection's thread once the lock was free.
    assert isinstance(jobs.store, SQLiteStore)
    with sqlite3.connect(jobs.store.path) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    job_id, _ = await queued_job(jobs)
    await runs_once_started(jobs, job_id)


async def test_close_fails_the_uses_waiting_behind_the_open_it_cancels(
    backend_url: str, make_jobs: MakeJobs
) -> None:
    """A first use queued behind the open in progress (a second start, an enqueue) does
    not open the store again behind the close: it fails too, and the store stays closed."""
    jobs = make_jobs(workers=False)
    store: Any = jobs.store
    failed: list[BaseException] = []

    async def open_it() -> None:
        try:
            await store.open()
        except StoreError as error:
            failed.append(error)

    async with open_held(jobs, backend_url) as waiting, anyio.create_task_group() as tg:
        tg.start_soon(open_it)
        await waiting()
        tg.start_soon(open_it)
        for _ in range(10):  # the second one queues behind the first
            await anyio.lowlevel.checkpoint()
        with anyio.fail_after(CLOSES_BY):
            await jobs.close()
            while len(failed) < 2:
                await anyio.lowlevel.checkpoint()
    assert "closed while this waited to open it" in str(failed[1])
    assert store._pool is None if hasattr(store, "_pool") else not store._open
    await store.open()  # then used again: it opens
    await store.close()


async def test_close_interrupts_a_sqlite_migration_under_way(
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A migration statement running long in the connection's thread (an index built
    over a large table) is interrupted, and rolled back, by close(): the thread is not
    left running it behind the close."""
    running = threading.Event()
    ended: list[BaseException] = []

    def migrate(db: sqlite3.Connection) -> None:
        # Set once the statement runs: an interrupt before it would miss it.
        db.set_progress_handler(running.set, 1000)
        try:  # a minute's work, or more
            db.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                "WHERE x < 10000000000) SELECT count(*) FROM c"
            ).fetchall()
        except sqlite3.Error as error:
            ended.append(error)
            raise
        finally:
            db.set_progress_handler(None, 0)

    monkeypatch.setattr(asyncjobs.stores._sqlite_connections, "migrate", migrate)
    jobs = Jobs(f"sqlite:///{tmp_path / 'jobs.db'}", clock=clock)
    failed: list[BaseException] = []

    async def start() -> None:
        try:
            await jobs.start()
        except StoreError as error:
            failed.append(error)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            assert await anyio.to_thread.run_sync(running.wait, 5)
            with anyio.fail_after(CLOSES_BY), caplog.at_level(logging.WARNING, "asyncjobs"):
                await jobs.close()
    finally:
        await jobs.close()
    assert "was closed while it opened" in str(failed[0])
    assert "interrupted" in str(ended[0])
    assert not any("thread is stuck" in r.message for r in caplog.records)
