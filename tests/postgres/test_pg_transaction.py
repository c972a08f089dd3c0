"""Transactional enqueue on PostgreSQL: failures of the caller's connection are the
caller's, never the store's."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from asyncjobs import Jobs, StoreError
from asyncjobs._errors import DataRefused
from asyncjobs.stores import PostgresStore

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def register(jobs: Jobs) -> None:
    @jobs.task(name="welcome")
    async def welcome(user_id: int) -> str:
        return f"welcome {user_id}"


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
