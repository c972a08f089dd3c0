"""Schema versions on every store: a store left at each earlier version is upgraded
on open (by one of several processes opening it at once) and keeps its jobs, which
then run; a store whose schema a newer asyncjobs migrated past the versions this one
ships is refused when opened, not used as if it were current."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from asyncjobs import Jobs
from asyncjobs._errors import StoreError
from asyncjobs.stores import NewJob, SQLiteStore, open_store
from asyncjobs.stores._migrations import migration_scripts
from asyncjobs.stores._sqlite_schema import _statements
from asyncjobs.testing import FakeClock, drain

T0 = 1_000_000.0


def new(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args": [], "kwargs": {}}',
        status="queued", priority=0, run_at=T0, max_attempts=3,
    )  # fmt: skip


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgres"


OLD_ROWS = [  # id, status, attempts, run_at offset, lease_until offset, worker
    ("queued", "queued", 0, -10.0, None, None),
    ("due", "scheduled", 0, -5.0, None, None),
    ("taken", "running", 1, -100.0, -50.0, "gone:1:abc"),  # its process died
    ("dead", "dead", 3, -100.0, None, None),
]
_OLD_INSERT = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, attempts, "
    "max_attempts, run_at, enqueued_at, lease_until, worker, started_at, idempotency_key) "
)


async def create_old_store(url: str, version: int, now: float) -> None:
    """The store as an asyncjobs of schema ``version`` left it: its migrations up to that
    one applied, and jobs written in the columns that version had."""
    scripts = [(v, script) for v, script in migration_scripts(backend_of(url)) if v <= version]
    rows: list[tuple[Any, ...]] = [
        (job_id, "t", "default", status, 0, f'{{"args":["{job_id}"],"kwargs":{{}}}}', attempts,
         3, now + run_at, now - 100, None if lease is None else now + lease, worker,
         None if worker is None else now - 100, f"key:{job_id}")
        for job_id, status, attempts, run_at, lease, worker in OLD_ROWS
    ]  # fmt: skip
    create = "CREATE TABLE asyncjobs_migrations (version integer PRIMARY KEY, applied_at real)"
    if url.startswith("sqlite:"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            db.execute(create)
            for v, script in scripts:
                for statement in _statements(script):
                    db.execute(statement)
                db.execute("INSERT INTO asyncjobs_migrations VALUES (?, 0)", (v,))
            db.executemany(_OLD_INSERT + "VALUES (" + ", ".join("?" * 14) + ")", rows)
        finally:
            db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(create)
        for v, script in scripts:
            await conn.execute(script)
            await conn.execute("INSERT INTO asyncjobs_migrations VALUES ($1, 0)", v)
        marks = ", ".join(f"${i}" for i in range(1, 15))
        await conn.executemany(_OLD_INSERT + f"VALUES ({marks})", rows)
    finally:
        await conn.close()


EARLIER = [
    (backend, version)
    for backend in ("sqlite", "postgres")
    for version, _ in migration_scripts(backend)[:-1]
]


@pytest.fixture(params=EARLIER, ids=[f"{b}-{v}" for b, v in EARLIER])
def earlier(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, int]:
    """A store URL on one backend (as ``backend_url``), and an earlier schema version."""
    backend, version = request.param
    if backend == "sqlite":
        return "sqlite:///" + str(tmp_path / "old.db"), version
    url: str = request.getfixturevalue("postgres_url")
    return url, version


async def test_a_store_of_an_earlier_version_is_upgraded_and_its_jobs_run(
    earlier: tuple[str, int],
) -> None:
    backend_url, version = earlier
    scripts = migration_scripts(backend_of(backend_url))
    clock = FakeClock()
    await create_old_store(backend_url, version, clock.now())
    # Several processes opening it at once: one upgrades it, none fails.
    stores = [open_store(backend_url) for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        for store in stores:
            await store.close()
    assert await versions(backend_url) == [v for v, _ in scripts]

    jobs = Jobs(backend_url, clock=clock)
    ran: list[str] = []

    @jobs.task(name="t")
    async def t(job_id: str) -> None:
        ran.append(job_id)

    try:
        await drain(jobs)
        assert sorted(ran) == ["due", "queued", "taken"]
        statuses = {info.id: info.status for info in await jobs.list()}
        assert statuses == {"queued": "succeeded", "due": "succeeded", "taken": "succeeded",
                            "dead": "dead"}  # fmt: skip
        again = await jobs.enqueue(t.options(idempotency_key="key:dead"), "again")
        assert again.id == "dead"  # the keys written then still hold
    finally:
        await jobs.close()


async def versions(url: str) -> list[int]:
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            found = [v for (v,) in db.execute("SELECT version FROM asyncjobs_migrations")]
        db.close()
        return sorted(found)
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return sorted(
            r["version"] for r in await conn.fetch("SELECT version FROM asyncjobs_migrations")
        )
    finally:
        await conn.close()


async def record_version(url: str, version: int) -> None:
    """What a newer asyncjobs leaves behind: a migration this one does not know."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("INSERT INTO asyncjobs_migrations VALUES (?, 0)", (version,))
        db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO asyncjobs_migrations VALUES ($1, 0)", version)
    finally:
        await conn.close()


async def test_a_schema_newer_than_this_version_is_refused(backend_url: str) -> None:
    backend = "sqlite" if backend_url.startswith("sqlite:") else "postgres"
    latest = migration_scripts(backend)[-1][0]
    store = open_store(backend_url)
    await store.insert([new("a")], now=T0)
    await store.close()
    await record_version(backend_url, latest + 1)

    newer = open_store(backend_url)
    try:
        with pytest.raises(
            StoreError, match=rf"schema version {latest + 1}, newer than .*{latest}"
        ):
            await newer.open()
        with pytest.raises(StoreError, match="newer"):
            await newer.get("a")  # a first use that opens it: refused the same way
    finally:
        await newer.close()
    assert await versions(backend_url) == [v for v, _ in migration_scripts(backend)] + [latest + 1]


async def test_a_newer_sqlite_file_is_refused_while_the_newer_process_writes(
    tmp_path: Path,
) -> None:
    """The version is read, not written: the refusal waits for no write lock. It waited
    for one (to migrate) first, and with the newer asyncjobs in another process writing
    the whole time, it said "database is locked", not why the file cannot be used."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    await store.insert([new("a")], now=T0)
    await store.close()
    latest = migration_scripts("sqlite")[-1][0]
    await record_version("sqlite:///" + str(path), latest + 1)
    newer = sqlite3.connect(path, isolation_level=None)
    older = SQLiteStore(path, busy_timeout=0.05)
    try:
        newer.execute("BEGIN IMMEDIATE")  # the newer process's write, under way
        with pytest.raises(StoreError, match=rf"schema version {latest + 1}, newer than"):
            await older.open()
    finally:
        await older.close()
        newer.execute("ROLLBACK")
        newer.close()


async def test_transactional_enqueue_refuses_a_newer_sqlite_file(tmp_path: Path) -> None:
    """The caller holds the write lock, so the schema is checked through its connection."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    latest = migration_scripts("sqlite")[-1][0]
    await record_version("sqlite:///" + str(path), latest + 1)
    jobs = Jobs(str(path), workers=False)
    try:
        async with aiosqlite.connect(path, isolation_level=None) as conn:
            await conn.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="newer"):
                async with jobs.transaction(conn):
                    await jobs.enqueue("t")
            await conn.execute("ROLLBACK")
    finally:
        await jobs.close()


async def test_an_open_waits_for_another_process_migrating_however_long_it_takes(
    postgres_url: str,
) -> None:
    """Processes started at once: one migrates (an index built over a large table takes
    a while), the others wait for it on the migration lock. That wait is not one the
    store's lock_timeout (90% of command_timeout) is for: cut short, every process but
    the migrating one failed to open."""
    import asyncpg

    from asyncjobs.stores import PostgresStore

    migrating = await asyncpg.connect(postgres_url)
    try:
        transaction = migrating.transaction()
        await transaction.start()
        await migrating.execute(  # what the other process's migrate holds
            "SELECT pg_advisory_xact_lock(hashtext('asyncjobs.migrate:' || current_schema()))"
        )
        # lock_timeout 900 ms. (0.2 s made the open's own statements, the migrations
        # run once the lock is free among them, fail now and then on a busy machine.)
        store = PostgresStore(postgres_url + "&command_timeout=1")
        opening = asyncio.ensure_future(store.open())
        try:
            pid = await migrating.fetchval("SELECT pg_backend_pid()")
            with anyio.fail_after(10):
                while not await migrating.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted "
                    "AND $1 = ANY(pg_blocking_pids(pid))",  # (not pg_stat_activity: cached)
                    pid,
                ):
                    assert not opening.done()
            await migrating.execute("SELECT pg_sleep(1.2)")  # its migration goes on
            await transaction.commit()
            with anyio.fail_after(10):
                await opening
        finally:
            opening.cancel()
            await store.close()
    finally:
        await migrating.close()


async def test_a_group_running_two_jobs_when_upgraded_keeps_them_and_runs_one_from_then_on(
    postgres_url: str,
) -> None:
    """The race that version 11's unique index ends may have left a group running two
    jobs, in processes of the earlier version still working (or killed, their leases yet
    to expire). The index could not be built over them: the migration failed, and the
    store could not be opened at all, not even to recover those jobs. They are left to
    finish; the index holds every job of the group claimed from then on."""
    import asyncpg

    from asyncjobs.stores import ClaimRequest, Outcome, OutcomeKind, TaskLimits

    await create_old_store(postgres_url, 10, T0)
    old = await asyncpg.connect(postgres_url)
    try:
        for job_id, status in [("g1", "running"), ("g2", "running"), ("g3", "queued")]:
            running = status == "running"
            await old.execute(
                _OLD_INSERT.replace("idempotency_key)", "group_key)")
                + "VALUES ($1, 'grouped', 'default', $2, 0, '{\"args\":[],\"kwargs\":{}}', $3, 3, "
                "$4, $4, $5, $6, $7, 'g')",
                job_id, status, 1 if running else 0, T0 - 10,
                T0 + 60 if running else None, "old:1:abc" if running else None,
                T0 - 10 if running else None,
            )  # fmt: skip
    finally:
        await old.close()

    store = open_store(postgres_url)
    try:
        await store.open()
        assert await versions(postgres_url) == [v for v, _ in migration_scripts("postgres")]
        request = ClaimRequest(worker="w", tasks={"grouped": TaskLimits(max_attempts=3)},
                               queues=None, limit=5, lease=60)  # fmt: skip
        assert await store.claim(request, now=T0) == []  # the group's jobs run
        done = [Outcome(job_id=j, worker="old:1:abc", attempt=1, kind=OutcomeKind.SUCCEEDED,
                        result="null") for j in ("g1", "g2")]  # fmt: skip
        assert sorted(await store.finish(done, now=T0)) == ["g1", "g2"]
        assert [row.id for row in await store.claim(request, now=T0)] == ["g3"]
    finally:
        await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            _OLD_INSERT.replace("idempotency_key)", "group_key)")
            + "VALUES ('g4', 'grouped', 'default', 'queued', 0, '{}', 0, 3, $1, $1, NULL, NULL, "
            "NULL, 'g')",
            T0,
        )
        with pytest.raises(asyncpg.UniqueViolationError):  # one running job per group
            await conn.execute("UPDATE asyncjobs_jobs SET status = 'running' WHERE id = 'g4'")
    finally:
        await conn.close()


async def test_the_claim_cursors_older_versions_stored_are_deleted_on_upgrade(
    tmp_path: Path,
) -> None:
    """Claims under limits once kept their walk past the window in ``asyncjobs_meta``
    (``keys past the window:<task>``, ``groups past the window:<task>``); they keep it in
    memory now, and nothing reads those rows: version 13 deletes them, and only them."""
    url = "sqlite:///" + str(tmp_path / "old.db")
    await create_old_store(url, 12, T0)
    kept = [("schedule:nightly", "1000"), ("dashboard secret", "s3cret"), ("keys past", "x")]
    stale = [("keys past the window:send", "user:7"), ("groups past the window:send", "g")]
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.executemany("INSERT INTO asyncjobs_meta (key, value) VALUES (?, ?)", kept + stale)
    db.close()
    store = open_store(url)
    try:
        await store.open()
    finally:
        await store.close()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        left = sorted(db.execute("SELECT key, value FROM asyncjobs_meta"))
    db.close()
    assert left == sorted(kept)
    assert await versions(url) == [v for v, _ in migration_scripts("sqlite")]
