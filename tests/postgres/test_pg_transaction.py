"""Transactional enqueue on PostgreSQL: the caller's connection must be on the store's
database, and its failures are the caller's, never the store's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from conftest import new_database, postgres_dsn, with_search_path

from asyncjobs import ConfigurationError, Jobs, StoreError
from asyncjobs._errors import DataRefused
from asyncjobs.stores import PostgresStore

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def register(jobs: Jobs) -> None:
    @jobs.task(name="welcome")
    async def welcome(user_id: int) -> str:
        return f"welcome {user_id}"


@pytest.fixture
async def other_database() -> AsyncIterator[str]:
    """The DSN of another database on the test server, dropped after the test."""
    async with new_database("other") as url:
        yield url


async def test_a_lost_caller_connection_fails_its_enqueue_not_the_stores_other_enqueues(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """The caller's connection cut inside the block is not the store being unreachable:
    counting it towards the reconnect backoff refused every enqueue of the process."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    await jobs.enqueue("welcome", 0)  # the store is open and healthy
    conn = await asyncpg.connect(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        tx = conn.transaction()
        await tx.start()
        async with jobs.transaction(conn):
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            with anyio.fail_after(10):
                while not conn.is_closed():
                    await anyio.lowlevel.checkpoint()
            with pytest.raises(StoreError, match=r"the caller's connection .* was lost") as lost:
                await jobs.enqueue("welcome", 1)
            assert "unreachable" not in str(lost.value)
    finally:
        await admin.close()
        conn.terminate()
    job = await jobs.enqueue("welcome", 2)  # the store's own connections are fine
    assert await jobs.get(job.id) is not None


async def test_errors_on_the_callers_connection_are_mapped_without_the_stores_backoff(
    postgres_url: str,
) -> None:
    """A value refused is DataRefused, as on the store's own connections; other errors
    are StoreError naming the caller's connection."""
    store = PostgresStore(postgres_url)
    conn = await asyncpg.connect(postgres_url)
    try:
        await store.open()
        async with conn.transaction():
            with (
                pytest.raises(DataRefused, match=r"caller's connection .* failed"),
                store._caller_errors(conn, "enqueue"),
            ):
                await conn.fetchval("SELECT 'many'::int")
            with (
                pytest.raises(StoreError, match="caller's connection") as failed,
                store._caller_errors(conn, "enqueue"),
            ):
                await conn.fetchval("SELECT 1")  # the transaction is aborted
            assert not isinstance(failed.value, DataRefused)
        await conn.close()
        with (
            pytest.raises(StoreError, match=r"caller's connection .* was lost"),
            store._caller_errors(conn, "enqueue"),
        ):
            await conn.fetchval("SELECT 1")
        assert store._failures == 0
    finally:
        await conn.close()
        await store.close()


async def test_a_connection_to_another_database_is_refused(
    make_jobs: MakeJobs, postgres_url: str, other_database: str
) -> None:
    """Like the SQLite store's other file: the job would commit in that database (which
    has the store's tables in the same schema here), where this store never sees it."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    await jobs.store.open()
    name = parse_qs(urlsplit(postgres_url).query)["search_path"][0]
    admin = await asyncpg.connect(other_database)
    try:
        await admin.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await admin.close()
    other = PostgresStore(with_search_path(other_database, name))
    await other.open()  # the asyncjobs tables, there too
    await other.close()
    conn = await asyncpg.connect(other_database)
    try:
        async with conn.transaction():
            with pytest.raises(
                ConfigurationError, match=r"store's database .* on 'asyncjobs_test_"
            ):
                async with jobs.transaction(conn):
                    await jobs.enqueue("welcome", 1)
        assert await conn.fetchval(f'SELECT count(*) FROM "{name}".asyncjobs_jobs') == 0
    finally:
        await conn.close()


async def test_a_pooled_connection_with_another_search_path_is_accepted_and_asked_once(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """The schema is not compared (the insert names the store's own), and where a
    connection is is asked on its first block only, not on each enqueue's."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    asked: list[str] = []

    def log(record: Any) -> None:
        if "pg_postmaster_start_time" in record.query:
            asked.append(record.query)

    pool = await asyncpg.create_pool(postgres_dsn(), min_size=1, max_size=1)
    try:
        enqueued = []
        for user in (1, 2):
            async with pool.acquire() as conn:  # a new proxy, the same connection
                conn.add_query_logger(log)  # a second logger on the second block
                async with conn.transaction(), jobs.transaction(conn):
                    enqueued.append(await jobs.enqueue("welcome", user))
    finally:
        await pool.close()
    assert len(asked) == 1
    for job in enqueued:
        assert await jobs.get(job.id) is not None


async def test_the_stores_own_database_is_read_again_before_a_connection_is_refused(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """A restart changes the server's start time: the store's remembered one is stale."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    store: Any = jobs.store
    await store.open()
    store._database = (datetime(2000, 1, 1, tzinfo=UTC), store._database[1])
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction(), jobs.transaction(conn):
            job = await jobs.enqueue("welcome", 1)
    finally:
        await conn.close()
    assert await jobs.get(job.id) is not None


async def test_a_caller_connection_decoding_timestamps_its_own_way_is_accepted(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """An app with its own timestamptz codec: the server check compares values the
    server turned into text, not what the caller's codec made of them (refused)."""
    jobs = make_jobs(postgres_url)

    @jobs.task(name="welcome")
    async def welcome(user_id: int) -> str:
        return f"welcome {user_id}"

    await jobs.store.open()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.set_type_codec(
            "timestamptz", schema="pg_catalog", encoder=str, decoder=str, format="text"
        )
        async with conn.transaction(), jobs.transaction(conn):
            job = await jobs.enqueue("welcome", 1)
    finally:
        await conn.close()
    assert await jobs.get(job.id) is not None


async def test_a_pool_is_refused_with_the_way_to_a_connection(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """A pool is no transaction: each of its calls runs on whichever connection it
    acquires. Refused at once, saying to acquire a connection, not an AttributeError
    at the first enqueue."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    try:
        with pytest.raises(ConfigurationError, match=r"pool\.acquire\(\)"):
            async with jobs.transaction(pool):
                await jobs.enqueue("welcome", 1)
        assert await jobs.list() == []
    finally:
        await pool.close()


async def test_tasks_started_inside_the_block_enqueue_at_once_through_the_one_connection(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """The tasks of a gather inside the block share the caller's connection, which
    runs one query at a time: all but the first of them failed with StoreError
    (asyncpg's "another operation is in progress"). Their inserts now take turns, as
    do those of a second block on the same connection."""
    jobs = make_jobs(postgres_url)
    register(jobs)
    welcome = jobs.registry["welcome"]
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction(), jobs.transaction(conn):
            outer = [asyncio.create_task(jobs.enqueue("welcome", i)) for i in range(3)]
            async with jobs.transaction(conn):
                await asyncio.gather(
                    *outer,
                    jobs.enqueue_many([welcome.spec(3), welcome.spec(4)]),
                    *(jobs.enqueue("welcome", i) for i in range(5, 8)),
                )
    finally:
        await conn.close()
    assert sorted(info.args[0] for info in await jobs.list()) == list(range(8))
