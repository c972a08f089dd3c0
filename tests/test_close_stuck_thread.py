"""``close()`` of a SQLite store whose writing connection's thread is stuck in a call
(a connection that does not answer): the close, queued behind that call, is given up on
in real time, so that ``close()``, and ``start()`` failing (which closes the store),
end; the thread closes its connection and ends once the call returns. So is the WAL
checkpoint's thread, stuck in disk I/O."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
from test_close_bound import CLOSES_BY, MakeJobs

import asyncjobs._lifecycle
import asyncjobs.stores._sqlite_connections
from asyncjobs import StoreError
from asyncjobs.stores._sqlite_side import CHECKPOINT_EVERY


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        asyncjobs.stores._sqlite_connections, "THREAD_CLOSE_TIME", 0.3, raising=False
    )


def stuck_in_the_writer_thread(store: Any) -> tuple[threading.Event, threading.Event, Any]:
    """A call for the SQLite store's writing connection's thread that stays stuck
    there (as a connection that does not answer) until the second event is set."""
    stuck, released = threading.Event(), threading.Event()

    def hang(db: sqlite3.Connection) -> None:
        stuck.set()
        released.wait(30)

    async def call(*args: Any, **kwargs: Any) -> Any:
        await store._call(hang)

    return stuck, released, call


async def closed_threads(threads: list[threading.Thread]) -> None:
    """Once released, the threads of the connections closed end (the close queued)."""
    for thread in threads:
        await anyio.to_thread.run_sync(thread.join, 5)
        assert not thread.is_alive()


async def test_sqlite_close_ends_though_a_connection_thread_is_stuck(
    make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture
) -> None:
    """The writing connection's thread is stuck in a call: close() does not queue
    behind it for good; the thread closes its connection, and ends, once released."""
    jobs = make_jobs(workers=False)
    await jobs.store.open()
    store: Any = jobs.store
    threads = [store._db._thread, store._reader._thread]
    stuck, released, call = stuck_in_the_writer_thread(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        try:
            await anyio.to_thread.run_sync(stuck.wait, 5)
            with anyio.fail_after(CLOSES_BY), caplog.at_level(logging.ERROR, "asyncjobs"):
                await jobs.close()
        finally:
            released.set()
    await closed_threads(threads)
    assert any("thread is stuck" in r.message for r in caplog.records)


async def test_sqlite_start_failing_closes_the_store_though_its_thread_is_stuck(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() gives up on a first lease recovery stuck in the connection's thread, and
    its close of the store does not queue behind that for good: start() fails in time."""
    monkeypatch.setattr(asyncjobs._lifecycle, "START_TIME", 0.3)
    monkeypatch.setattr(asyncjobs._lifecycle, "PAST_START_TIME", 0.2)
    jobs = make_jobs()
    await jobs.store.open()
    store: Any = jobs.store
    threads = [store._db._thread, store._reader._thread]
    stuck, released, call = stuck_in_the_writer_thread(store)
    monkeypatch.setattr(store, "recover", call)
    try:
        with anyio.fail_after(CLOSES_BY), pytest.raises(StoreError):
            await jobs.start()
    finally:
        released.set()
    assert stuck.is_set()  # the recovery was stuck in the thread
    await closed_threads(threads)
    assert not jobs.started


async def test_sqlite_close_ends_though_the_wal_checkpoint_is_stuck(
    make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture
) -> None:
    """The WAL checkpoint's thread is stuck (disk I/O that does not return): close()
    does not wait for it for good; its connection closes once it returns."""
    jobs = make_jobs(workers=False)
    await jobs.store.open()
    store: Any = jobs.store
    checkpointer = store._checkpointer
    stuck, released = threading.Event(), threading.Event()
    connect = checkpointer.connect
    connections: list[sqlite3.Connection] = []

    def stuck_connect() -> sqlite3.Connection:
        db: sqlite3.Connection = connect()
        connections.append(db)
        stuck.set()  # the checkpoint's call on it does not return until released
        released.wait(30)
        return db

    checkpointer.connect = stuck_connect
    checkpointer.committed(CHECKPOINT_EVERY)
    running = checkpointer._running
    try:
        await anyio.to_thread.run_sync(stuck.wait, 5)
        with anyio.fail_after(CLOSES_BY), caplog.at_level(logging.ERROR, "asyncjobs"):
            await jobs.close()
    finally:
        released.set()
    with anyio.fail_after(5):
        await asyncio.wait({running})
        await anyio.lowlevel.checkpoint()  # the task's callbacks: the close's thread
    closing = [t for t in threading.enumerate() if "checkpointer's connection" in t.name]
    await closed_threads(closing)
    assert checkpointer.checkpoints == 1  # it went on once released
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        connections[0].execute("SELECT 1")
    assert any("checkpoint's thread is stuck" in r.message for r in caplog.records)
