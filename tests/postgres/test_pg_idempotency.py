"""Idempotency keys on PostgreSQL, where the key's insert and the read of the stored
job are two statements and an insert can wait on another open transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from asyncjobs import Jobs
from asyncjobs._errors import StoreError
from asyncjobs.stores import NewJob
from asyncjobs.stores._postgres_enqueue import KEY_LOCKS, insert_jobs

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def new_job(job_id: str, key: str | None) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3, idempotency_key=key,
    )  # fmt: skip


class DeletesAfterInsert:
    """An asyncpg connection whose first statement is followed, before the next one,
    by another client deleting the job that holds ``key`` (pruning, say)."""

    def __init__(self, conn: Any, other: Any, key: str) -> None:
        self.conn, self.other, self.key = conn, other, key
        self.deleted = False

    async def fetch(self, query: str, *args: Any) -> Any:
        rows = await self.conn.fetch(query, *args)
        if not self.deleted:
            self.deleted = True
            await self.other.execute(
                "DELETE FROM asyncjobs_jobs WHERE idempotency_key = $1", self.key
            )
        return rows


async def test_a_key_freed_between_insert_and_read_is_inserted_after_all(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    await make_jobs(postgres_url).store.open()  # the schema
    conn = await asyncpg.connect(postgres_url)
    other = await asyncpg.connect(postgres_url)
    try:
        await insert_jobs(conn, [new_job("old", "k")], now=1.0)
        racing = DeletesAfterInsert(conn, other, "k")

        ids = await insert_jobs(racing, [new_job("plain", None), new_job("new", "k")], now=2.0)  # type: ignore[arg-type]

        assert racing.deleted
        assert ids == ["plain", "new"]
        stored = await conn.fetch("SELECT id FROM asyncjobs_jobs ORDER BY id")
        assert [r["id"] for r in stored] == ["new", "plain"]
    finally:
        await conn.close()
        await other.close()


async def test_a_keyed_enqueue_waiting_on_an_open_transaction_holds_up_no_one_else(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """Request A holds key K in its open transaction; request B enqueues K the ordinary
    way and must wait for A. Other enqueues, A's own included, must not wait for B:
    A waiting for B while B waits for A would never end."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="charge")
    async def charge(order: int) -> None: ...

    await jobs.store.open()
    conn = await asyncpg.connect(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    second: list[str] = []

    async def retry_of_the_same_order() -> None:
        second.append((await jobs.enqueue(charge.options(idempotency_key="order:1"), 1)).id)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                async with conn.transaction():
                    async with jobs.transaction(conn):
                        first = await jobs.enqueue(charge.options(idempotency_key="order:1"), 1)
                    tg.start_soon(retry_of_the_same_order)
                    while not await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE $1 = ANY(pg_blocking_pids(pid))",
                        conn.get_server_pid(),
                    ):
                        await anyio.lowlevel.checkpoint()  # B's insert waits on A's row
                    with anyio.fail_after(5):
                        unrelated = await jobs.enqueue(charge, 2)
                assert not second  # B waited for A's commit
        assert second == [first.id]
        assert await jobs.get(unrelated.id) is not None
    finally:
        await conn.close()
        await admin.close()


async def test_a_key_held_past_command_timeout_is_not_taken_for_an_unreachable_server(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """An enqueue of a key that another open transaction holds waits for it. Past
    command_timeout that wait was taken for a silent network: the enqueue failed as
    "unreachable", its connection was dropped, and every other call of the process was
    refused for the reconnect backoff. The server now ends the wait itself first
    (lock_timeout): the enqueue fails saying so, and nothing else is held up."""
    holder = make_jobs(postgres_url, workers=False)
    other = make_jobs(postgres_url + "&command_timeout=1", workers=False)

    @holder.task(name="charge")
    async def charge(order: int) -> None: ...

    other.task(name="charge")(charge.fn)
    await holder.store.open()
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            async with holder.transaction(conn):
                await holder.enqueue(charge.options(idempotency_key="order:1"), 1)
            with anyio.fail_after(10), pytest.raises(StoreError) as waited:
                await other.enqueue(other.registry["charge"].options(idempotency_key="order:1"), 1)
            assert "lock timeout" in str(waited.value)
            assert "unreachable" not in str(waited.value)
            unrelated = await other.enqueue("charge", 2)  # no reconnect backoff
        assert await other.get(unrelated.id) is not None
    finally:
        await conn.close()


def test_the_lock_timeout_follows_command_timeout_unless_the_url_sets_one() -> None:
    from asyncjobs.stores import PostgresStore

    assert PostgresStore("postgresql://h/db")._server_settings["lock_timeout"] == "54000ms"
    two = PostgresStore("postgresql://h/db?command_timeout=2")
    assert two._server_settings["lock_timeout"] == "1800ms"
    assert "lock_timeout" not in PostgresStore("postgresql://h/db?lock_timeout=5s")._server_settings


async def test_a_command_timeout_past_what_lock_timeout_holds_still_connects(
    postgres_url: str,
) -> None:
    """lock_timeout is a number of milliseconds that PostgreSQL keeps in 32 bits (about
    24.8 days): 90% of a longer command_timeout (a year, say: no timeout in practice) was
    an invalid setting, and the server refused every connection of the store (and a
    command_timeout of 1e308 raised OverflowError)."""
    from asyncjobs.stores import PostgresStore

    longest = PostgresStore("postgresql://h/db?command_timeout=1e308")._server_settings
    assert longest["lock_timeout"] == "2147483647ms"
    year = 365 * 24 * 3600
    store = PostgresStore(postgres_url + f"&command_timeout={year}")
    try:
        await store.open()
        assert await store.get("none") is None
    finally:
        await store.close()


async def test_an_enqueue_many_of_more_keys_than_the_servers_lock_table_holds(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """Each key of an enqueue_many took an advisory lock of its own, held to the commit,
    and PostgreSQL keeps them in one shared table of max_locks_per_transaction x
    (max_connections + max_prepared_transactions) entries (6,400 by default): a daily
    digest keyed per user ("digest:{user}:{day}") for 20,000 users failed with "out of
    shared memory"."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="digest")
    async def digest(user: int) -> None: ...

    await jobs.store.open()
    conn = await asyncpg.connect(postgres_url)
    try:
        table = await conn.fetchval(
            "SELECT current_setting('max_locks_per_transaction')::int * "
            "(current_setting('max_connections')::int + "
            "current_setting('max_prepared_transactions')::int)"
        )
    finally:
        await conn.close()
    users = 2 * table + 1
    if users > 100_000:
        pytest.skip(f"the server's lock table holds {table} locks: too many keys to try")

    made = await jobs.enqueue_many(
        [digest.options(idempotency_key=f"digest:{u}").spec(u) for u in range(users)]
    )

    assert len({job.id for job in made}) == users
    again = await jobs.enqueue_many([digest.options(idempotency_key="digest:7").spec(7)])
    assert again[0].id == made[7].id


async def test_a_keyed_enqueue_many_in_a_callers_transaction_holds_few_locks(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """The locks that keep two enqueues of the same keys in other orders from
    deadlocking are held until the caller commits: their number is bounded, not one per
    key, so a long transaction with a large keyed enqueue_many does not fill the
    server's lock table (shared by every connection) for everyone else."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="digest")
    async def digest(user: int) -> None: ...

    await jobs.store.open()
    conn = await asyncpg.connect(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            async with jobs.transaction(conn):
                await jobs.enqueue_many(
                    [digest.options(idempotency_key=f"d:{u}").spec(u) for u in range(2000)]
                )
            held = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
                conn.get_server_pid(),
            )
        assert 0 < held <= KEY_LOCKS + 1 < 2000
    finally:
        await conn.close()
        await admin.close()


async def test_a_keyed_enqueue_on_the_callers_connection_waits_as_that_connection_says(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """Inside jobs.transaction(conn) the enqueue is the caller's statement: the store
    sets no lock_timeout there (a SET LOCAL would hold for the rest of the caller's
    transaction), so a key another open transaction holds is waited for as that
    connection's own lock_timeout says, and the enqueue fails with a StoreError once it
    runs out. (A guard of a documented choice: README, idempotency_key.)"""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="charge")
    async def charge(order: int) -> None: ...

    await jobs.store.open()
    holder = await asyncpg.connect(postgres_url)
    caller = await asyncpg.connect(postgres_url, server_settings={"lock_timeout": "20ms"})
    try:
        async with holder.transaction():
            async with jobs.transaction(holder):
                await jobs.enqueue(charge.options(idempotency_key="order:1"), 1)
            with anyio.fail_after(10):
                async with caller.transaction():
                    async with jobs.transaction(caller):
                        await jobs.enqueue(charge.options(idempotency_key="order:2"), 2)
                    assert await caller.fetchval("SHOW lock_timeout") == "20ms"
                with pytest.raises(StoreError, match="lock timeout"):
                    async with caller.transaction(), jobs.transaction(caller):
                        await jobs.enqueue(charge.options(idempotency_key="order:1"), 1)
    finally:
        await holder.close()
        await caller.close()
