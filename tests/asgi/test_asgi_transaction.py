"""Transactional enqueue: the job exists if and only if the caller's transaction commits."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from asyncjobs import AsyncJobsError, ConfigurationError, DataRefused, Jobs, JobSpec, JobStatus
from asyncjobs._transaction import _autocommits
from asyncjobs.stores import SQLiteStore, _sqlite_sql
from asyncjobs.stores._sqlite_claim import _claim, _finish_and_claim
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_path(db_url: str) -> Path:
    return Path(db_url.removeprefix("sqlite:///"))


@pytest.fixture
async def conn(db_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """The app's own connection to the same file, in explicit-transaction mode."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(db_path, isolation_level=None, timeout=5) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, email TEXT)")
        yield db


def job_count(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        try:
            return int(db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


def register(jobs: Jobs) -> None:
    @jobs.task(name="welcome")
    async def welcome(user_id: int) -> str:
        return f"welcome {user_id}"


async def test_commit_keeps_the_job_and_the_business_row(
    jobs: Jobs, conn: aiosqlite.Connection, db_path: Path
) -> None:
    register(jobs)
    await conn.execute("BEGIN IMMEDIATE")
    async with jobs.transaction(conn):
        cursor = await conn.execute("INSERT INTO users (email) VALUES ('a@example.com')")
        job = await jobs.enqueue("welcome", cursor.lastrowid)
    await conn.execute("COMMIT")

    assert job_count(db_path) == 1
    await drain(jobs)
    assert await job.result(timeout=5) == f"welcome {cursor.lastrowid}"


async def test_rollback_leaves_no_job(
    jobs: Jobs, conn: aiosqlite.Connection, db_path: Path
) -> None:
    register(jobs)
    await jobs.store.open()
    await conn.execute("BEGIN IMMEDIATE")
    async with jobs.transaction(conn):
        await conn.execute("INSERT INTO users (email) VALUES ('b@example.com')")
        job = await jobs.enqueue("welcome", 1)
        many = await jobs.enqueue_many([jobs.registry["welcome"].spec(2)])
    await conn.execute("ROLLBACK")

    assert job_count(db_path) == 0
    assert await jobs.get(job.id) is None
    assert await jobs.get(many[0].id) is None
    await drain(jobs)  # nothing to run


async def test_the_job_is_invisible_to_workers_until_the_caller_commits(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    register(jobs)
    await jobs.store.open()
    await conn.execute("BEGIN IMMEDIATE")
    async with jobs.transaction(conn):
        job = await jobs.enqueue("welcome", 3)
    assert await jobs.get(job.id) is None  # the store's own connection cannot see it yet
    await conn.execute("COMMIT")
    info = await jobs.get(job.id)
    assert info is not None
    assert info.status == JobStatus.QUEUED


async def test_legacy_implicit_transactions_of_aiosqlite_work_too(
    jobs: Jobs, db_path: Path
) -> None:
    """aiosqlite's default isolation level opens a transaction on the first write."""
    register(jobs)
    async with aiosqlite.connect(db_path) as db:
        await db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        await db.commit()
        async with jobs.transaction(db):
            await db.execute("INSERT INTO users (email) VALUES ('c@example.com')")
            await jobs.enqueue("welcome", 1)
        await db.rollback()
        async with jobs.transaction(db):
            await jobs.enqueue("welcome", 2)
        await db.commit()
    assert [info.args for info in await jobs.list()] == [[2]]


async def test_enqueues_outside_the_block_or_in_other_tasks_are_not_part_of_it(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    register(jobs)
    await jobs.store.open()
    go = anyio.Event()
    outside: list[str] = []

    async def other_task() -> None:
        await go.wait()  # runs while the block is open, in its own context
        outside.append((await jobs.enqueue("welcome", 99)).id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await conn.execute("BEGIN")
            async with jobs.transaction(conn):
                inside = await jobs.enqueue("welcome", 1)
                go.set()
                await anyio.lowlevel.checkpoint()
            await conn.execute("ROLLBACK")
    after = await jobs.enqueue("welcome", 2)

    assert await jobs.get(inside.id) is None
    assert await jobs.get(outside[0]) is not None
    assert await jobs.get(after.id) is not None


async def test_a_task_started_inside_the_block_enqueues_on_its_own_after_it_ends(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    """The task inherits the block's context; once the block is over, its enqueues
    must not write through the caller's connection (where nobody would commit them)."""
    register(jobs)
    await jobs.store.open()
    block_over = anyio.Event()
    later: list[str] = []

    async def follow_up() -> None:
        await block_over.wait()
        later.append((await jobs.enqueue("welcome", 2)).id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await conn.execute("BEGIN")
            async with jobs.transaction(conn):
                inside = await jobs.enqueue("welcome", 1)
                tg.start_soon(follow_up)
            await conn.execute("ROLLBACK")
            block_over.set()

    assert await jobs.get(inside.id) is None
    assert await jobs.get(later[0]) is not None
    assert not conn.in_transaction


async def test_another_jobs_instance_is_not_bound_by_the_block(
    make_jobs: MakeJobs, conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    jobs = make_jobs()
    register(jobs)
    other = make_jobs("sqlite:///" + str(tmp_path / "other.db"))
    register(other)
    await jobs.store.open()
    await conn.execute("BEGIN")
    async with jobs.transaction(conn):
        mine = await jobs.enqueue("welcome", 1)
        theirs = await other.enqueue("welcome", 2)
    await conn.execute("ROLLBACK")
    assert await jobs.get(mine.id) is None
    assert await other.get(theirs.id) is not None


async def test_idempotency_key_inside_a_transaction_returns_the_stored_job(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    register(jobs)
    first = await jobs.enqueue(jobs.registry["welcome"].options(idempotency_key="k"), 1)
    await conn.execute("BEGIN")
    async with jobs.transaction(conn):
        again = await jobs.enqueue(jobs.registry["welcome"].options(idempotency_key="k"), 1)
    await conn.execute("COMMIT")
    assert again.id == first.id
    assert len(await jobs.list()) == 1


async def test_a_store_read_inside_the_block_does_not_wait_behind_a_runners_claim(
    jobs: Jobs, conn: aiosqlite.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enqueue wakes the runner, whose claim waits in the store's connection thread
    for the caller's write lock (five busy timeouts, 25 s). A read of the store inside
    the block must not queue behind that claim: the caller cannot commit, and so free
    the claim, before the read returns."""
    register(jobs)
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    armed, claiming = False, anyio.Event()
    transaction = store._transaction

    async def spy(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if armed and fn in (_claim, _finish_and_claim):
            claiming.set()  # then queued in the thread before this task yields
        return await transaction(fn, *args, **kwargs)

    monkeypatch.setattr(store, "_transaction", spy)
    async with jobs:
        first = await jobs.enqueue("welcome", 0)
        await conn.execute("BEGIN IMMEDIATE")
        armed = True
        async with jobs.transaction(conn):
            job = await jobs.enqueue("welcome", 1)
            with anyio.fail_after(5):
                await claiming.wait()  # the claim now waits on our lock, in the thread
            with anyio.move_on_after(3) as read:  # was: until the claim gave up, 25 s
                info = await jobs.get(first.id)
        await conn.execute("COMMIT")
        assert not read.cancelled_caught
        assert info is not None
        assert await job.result(timeout=10) == "welcome 1"  # the claim went on after


async def test_store_not_yet_open_while_the_caller_holds_the_write_lock_does_not_deadlock(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The schema is created through the caller's connection, inside its transaction."""
    path = tmp_path / "fresh.db"
    jobs = Jobs("sqlite:///" + str(path), clock=clock)
    register(jobs)
    try:
        async with aiosqlite.connect(path, isolation_level=None, timeout=5) as db:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
            await db.execute("BEGIN IMMEDIATE")
            await db.execute("INSERT INTO users DEFAULT VALUES")
            with anyio.fail_after(5):
                async with jobs.transaction(db):
                    job = await jobs.enqueue("welcome", 1)
            await db.execute("COMMIT")
        await drain(jobs)
        assert await job.result(timeout=5) == "welcome 1"
    finally:
        await jobs.close()


@pytest.mark.parametrize("store_open", [True, False], ids=["store-open", "schema-only"])
async def test_entering_the_block_after_a_deferred_begin_neither_locks_nor_reads(
    jobs: Jobs, conn: aiosqlite.Connection, db_path: Path, store_open: bool
) -> None:
    """A plain BEGIN takes its snapshot at its first statement, and a first statement
    that writes waits on the busy timeout for the lock. The block's start read the
    store's schema through the caller's connection: that took the snapshot there, so
    the next commit of any other connection (the workers, another request, another
    process) made the caller's first write fail at once with "database is locked"
    (SQLITE_BUSY_SNAPSHOT); on a connection whose schema cache was older than the
    store's tables, it took the write lock there."""
    register(jobs)
    await jobs.store.open()  # the schema is in place
    if not store_open:  # an enqueue-only app without the lifespan: opened on first use
        await jobs.store.close()
    await conn.execute_fetchall("SELECT count(*) FROM asyncjobs_jobs")  # a used connection
    await conn.execute("BEGIN")
    async with jobs.transaction(conn):
        with sqlite3.connect(db_path, timeout=1) as other:  # another process commits
            other.execute("INSERT INTO users (email) VALUES ('other@example.com')")
        await conn.execute("INSERT INTO users (email) VALUES ('d@example.com')")
        job = await jobs.enqueue("welcome", 1)
    await conn.execute("COMMIT")
    assert await jobs.get(job.id) is not None
    ((users,),) = await conn.execute_fetchall("SELECT count(*) FROM users")
    assert users == 2


async def test_a_value_sqlite_refuses_in_the_callers_transaction_is_data_refused(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    """As through the store's own connections, and as PostgreSQL's caller connection
    says it: the same enqueue fails the same way every time, unlike a locked file."""
    register(jobs)
    await jobs.store.open()
    raw = conn._connection
    assert raw is not None
    # In the connection's thread: SQLITE_TOOBIG for a value past 200 bytes.
    await conn._execute(raw.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 200)  # type: ignore[no-untyped-call]
    await conn.execute("BEGIN IMMEDIATE")
    async with jobs.transaction(conn):
        with pytest.raises(DataRefused, match="too big"):
            await jobs.enqueue("welcome", "x" * 300)
    await conn.execute("ROLLBACK")


async def test_autocommit_connection_without_begin_is_refused_and_nothing_is_written(
    jobs: Jobs, conn: aiosqlite.Connection, db_path: Path
) -> None:
    register(jobs)
    async with jobs.transaction(conn):
        with pytest.raises(ConfigurationError, match="autocommit"):
            await jobs.enqueue("welcome", 1)
    assert job_count(db_path) == 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3's autocommit= is Python 3.12+")
async def test_a_python_312_autocommit_connection_without_begin_is_refused(
    jobs: Jobs, db_path: Path
) -> None:
    """``aiosqlite.connect(path, autocommit=True)`` leaves ``isolation_level`` at its
    default, yet every statement commits on its own: the job would outlive a rollback."""
    register(jobs)
    async with aiosqlite.connect(db_path, autocommit=True) as db:
        async with jobs.transaction(db):
            with pytest.raises(ConfigurationError, match="autocommit"):
                await jobs.enqueue("welcome", 1)
        await db.rollback()
    assert job_count(db_path) == 0


def test_a_connection_that_says_autocommit_counts_as_autocommit() -> None:
    """The check above on this interpreter too: Python 3.12's sqlite3 connections have an
    ``autocommit`` attribute, and one set to True commits each statement on its own
    whatever its ``isolation_level``."""

    class Connection:  # what a 3.12 ``sqlite3.connect(path, autocommit=...)`` reports
        isolation_level = ""

        def __init__(self, autocommit: bool | int) -> None:
            self.autocommit = autocommit

    assert _autocommits(Connection(True))  # type: ignore[arg-type]
    assert not _autocommits(Connection(False))  # type: ignore[arg-type]
    assert not _autocommits(Connection(-1))  # type: ignore[arg-type]  # LEGACY: isolation_level
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as db:
        assert _autocommits(db)
    with closing(sqlite3.connect(":memory:")) as db:
        assert not _autocommits(db)


async def test_connection_to_another_database_file_is_refused(jobs: Jobs, tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "app.db") as db:
        with pytest.raises(ConfigurationError, match="store's file"):
            async with jobs.transaction(db):
                pass


async def test_unsupported_connection_types_are_refused(jobs: Jobs) -> None:
    with pytest.raises(ConfigurationError, match="aiosqlite or asyncpg"):
        async with jobs.transaction(object()):
            pass


async def test_a_connection_not_open_is_refused_as_such(jobs: Jobs, db_path: Path) -> None:
    unopened = aiosqlite.connect(db_path)  # not awaited: no sqlite3 connection yet
    with pytest.raises(ConfigurationError, match=r"not opened yet .* or already closed"):
        async with jobs.transaction(unopened):
            pass
    async with aiosqlite.connect(db_path) as closed:
        pass
    with pytest.raises(ConfigurationError, match=r"not opened yet .* or already closed"):
        async with jobs.transaction(closed):
            pass


async def test_asyncpg_connection_with_a_sqlite_store_is_refused(
    jobs: Jobs, postgres_url: str
) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        with pytest.raises(ConfigurationError, match="asyncpg connection"):
            async with jobs.transaction(conn):
                pass
    finally:
        await conn.close()


async def test_asyncpg_commit_keeps_the_job_and_rollback_drops_it(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    import asyncpg

    jobs = make_jobs(postgres_url)
    register(jobs)
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction(), jobs.transaction(conn):
            kept = await jobs.enqueue("welcome", 1)
        tx = conn.transaction()
        await tx.start()
        async with jobs.transaction(conn):
            dropped = await jobs.enqueue("welcome", 2)
        await tx.rollback()
        async with jobs.transaction(conn):
            with pytest.raises(ConfigurationError, match="no open transaction"):
                await jobs.enqueue("welcome", 3)
    finally:
        await conn.close()
    assert await jobs.get(kept.id) is not None
    assert await jobs.get(dropped.id) is None
    assert len(await jobs.list()) == 1
    await drain(jobs)
    assert await kept.result(timeout=5) == "welcome 1"


async def test_a_store_first_opened_inside_the_block_does_not_wait_for_the_callers_lock(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An app without the lifespan: its store is first opened by a read inside the
    block. The file's schema is already there, so opening it takes no write lock and
    does not wait for the caller's, which the caller cannot free before the read ends."""
    path = tmp_path / "app.db"
    earlier = Jobs("sqlite:///" + str(path), clock=clock, workers=False)
    register(earlier)
    first = await earlier.enqueue("welcome", 0)
    await earlier.close()

    jobs = Jobs("sqlite:///" + str(path), clock=clock, workers=False)
    register(jobs)
    try:
        async with aiosqlite.connect(path, isolation_level=None, timeout=5) as db:
            await db.execute("BEGIN IMMEDIATE")
            async with jobs.transaction(db):
                await jobs.enqueue("welcome", 1)
                with anyio.move_on_after(3) as read:  # was: until the open gave up
                    info = await jobs.get(first.id)
            await db.execute("COMMIT")
        assert not read.cancelled_caught
        assert info is not None
        assert len(await jobs.list()) == 2
    finally:
        await jobs.close()


async def test_a_batch_not_yet_committed_is_not_finished(
    jobs: Jobs, conn: aiosqlite.Connection
) -> None:
    """Its jobs are out of sight until the caller commits: its progress is none, and
    waiting for it fails on a job the store does not know, rather than reading it as
    deleted (a deleted member counts as finished)."""
    register(jobs)
    await jobs.store.open()  # as the lifespan does: the schema is in place
    await conn.execute("BEGIN IMMEDIATE")
    async with jobs.transaction(conn):
        batch = await jobs.batch(
            [JobSpec(task="welcome", args=(1,)), JobSpec(task="welcome", args=(2,))],
            on_complete=JobSpec(task="welcome", args=(0,)),
        )
    progress = await batch.progress()
    assert not progress.finished
    assert progress.done == 0
    with pytest.raises(AsyncJobsError, match="does not exist"):
        await batch.wait(timeout=5)
    await conn.execute("ROLLBACK")


async def test_a_grouped_job_first_written_in_a_legacy_transaction_is_never_held_by_a_stale_mark(
    jobs: Jobs, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosqlite's default mode begins the transaction at the first write, so the insert's
    read of its group (is a job of it unfinished: mark the new one behind) ran before
    it, outside the transaction. A commit in between that finished the group's last job
    left the new one marked behind nothing, which held its group for good. The read is
    now in the caller's transaction, so another connection cannot write in between."""
    register(jobs)
    welcome = jobs.registry["welcome"]
    ahead = await jobs.enqueue(welcome.spec(1).with_options(group="g"))
    real_behind = _sqlite_sql._behind
    interleaved: list[str] = []

    def behind_then_another_commit(db: sqlite3.Connection, new: Any) -> Any:
        marks = real_behind(db, new)
        with closing(sqlite3.connect(db_path, timeout=0)) as other:
            try:  # an operator's cancel, say, committed between the read and the insert
                with other:
                    other.execute(
                        "UPDATE asyncjobs_jobs SET status = 'cancelled' WHERE id = ?", (ahead.id,)
                    )
                interleaved.append("cancelled")
            except sqlite3.OperationalError:  # locked: nothing can come in between
                interleaved.append("locked")
        return marks

    monkeypatch.setattr(_sqlite_sql, "_behind", behind_then_another_commit)
    async with aiosqlite.connect(db_path) as db:
        async with jobs.transaction(db):
            job = await jobs.enqueue(welcome.spec(2).with_options(group="g"))
        await db.commit()
    monkeypatch.undo()
    await drain(jobs)
    info = await jobs.get(job.id)
    assert info is not None
    assert info.status == JobStatus.SUCCEEDED  # was: queued behind nothing, for good
    assert interleaved == ["locked"]
