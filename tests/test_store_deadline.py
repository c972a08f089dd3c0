"""``Store.set_deadline``: at shutdown, a call held up by another process's write (a
lock on the jobs) gives up at the deadline instead of after the store's usual waits
(SQLite: five busy timeouts; PostgreSQL: ``command_timeout``)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from asyncjobs import StoreError
from asyncjobs.stores import PostgresStore, SQLiteStore, Store, open_store
from asyncjobs.stores._job_rows import NewJob


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=1,
    )  # fmt: skip


@asynccontextmanager
async def another_writer(store: Store, url: str) -> AsyncIterator[Callable[[float], None]]:
    """Another process's transaction holding the jobs against writes; yields a function
    that ends it after that many seconds (from a thread, while a write waits)."""
    if isinstance(store, SQLiteStore):
        other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        timers: list[threading.Timer] = []

        def release(after: float) -> None:
            timers.append(threading.Timer(after, lambda: other.execute("COMMIT")))
            timers[-1].start()

        try:
            yield release
        finally:
            for timer in timers:
                timer.join()
            if other.in_transaction:
                other.execute("COMMIT")
            other.close()
        return
    import asyncpg

    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE asyncjobs_jobs IN EXCLUSIVE MODE")
        async with anyio.create_task_group() as group:

            def release(after: float) -> None:
                async def later() -> None:
                    await anyio.to_thread.run_sync(threading.Event().wait, after)
                    await transaction.commit()

                group.start_soon(later)

            yield release
        if conn.is_in_transaction():
            await transaction.commit()
    finally:
        await conn.close()


def patient_store(backend_url: str, seconds: int) -> Store:
    """A store that waits ``seconds`` for another writer before giving up on its own
    (SQLite five busy timeouts of that, PostgreSQL a command_timeout of that)."""
    if not backend_url.startswith("postgres"):
        store = open_store(backend_url)
        assert isinstance(store, SQLiteStore)
        store.busy_timeout = float(seconds)
        return store
    separator = "&" if "?" in backend_url else "?"
    return open_store(f"{backend_url}{separator}command_timeout={seconds}")


async def test_a_deadline_cuts_short_the_wait_for_another_writer(backend_url: str) -> None:
    """Each backend waits 2 s at least before giving up on its own (SQLite five 2 s
    busy timeouts, PostgreSQL a command_timeout of 2 s): a deadline 0.2 s away ends the
    wait there. Without one, a write waits as configured again, and gets through."""
    store = patient_store(backend_url, 2)
    await store.open()
    try:
        async with another_writer(store, backend_url):
            store.set_deadline(0.2)
            with anyio.fail_after(1.5), pytest.raises(StoreError):
                await store.insert([new_job("a")], now=0.0)
        store.set_deadline(None)
        if isinstance(store, PostgresStore):
            store._failures = 0  # the timeout counted as unreachable: skip the backoff
        async with another_writer(store, backend_url) as release:
            release(0.5)
            with anyio.fail_after(5):  # waits past where the deadline was, then writes
                assert await store.insert([new_job("c")], now=0.0) == ["c"]
    finally:
        await store.close()


async def test_a_deadline_set_while_a_write_waits_ends_that_wait(backend_url: str) -> None:
    """The deadline comes while a write already waits on the other writer (SQLite in
    its busy handler, a busy timeout of 3 s; PostgreSQL for its reply, a
    command_timeout of 3 s): that wait ends at the deadline too."""
    store = patient_store(backend_url, 3)
    await store.open()
    try:
        async with another_writer(store, backend_url), anyio.create_task_group() as group:

            async def write() -> None:
                with anyio.fail_after(2), pytest.raises(StoreError):
                    await store.insert([new_job("a")], now=0.0)

            group.start_soon(write)
            # Let the write reach its wait (a thread's, or the server's): real time.
            await anyio.to_thread.run_sync(threading.Event().wait, 0.3)
            store.set_deadline(0.1)
    finally:
        await store.close()


async def test_past_the_deadline_a_free_store_is_still_written(backend_url: str) -> None:
    """A job's cleanup, the worker's last records: past the deadline a call still goes
    through, with next to no wait, when nothing holds it up."""
    store = open_store(backend_url)
    await store.open()
    try:
        store.set_deadline(0.0)
        with anyio.fail_after(5):
            assert await store.insert([new_job("a")], now=0.0) == ["a"]
    finally:
        await store.close()
