"""The PostgreSQL store at shutdown (``Store.set_deadline``): a write held up by a lock
gives up at the deadline without counting the server as unreachable, and the calls
after it (the worker's stop, an enqueue from a job's cleanup or from the app's own
shutdown, a start again) still get through to a server that answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

import asyncjobs._outbox
from asyncjobs import Jobs
from asyncjobs.stores import PostgresStore

asyncpg = pytest.importorskip("asyncpg")


@asynccontextmanager
async def row_locked(url: str, job_id: str) -> AsyncIterator[None]:
    """Another session holds the job's row (FOR UPDATE): writes to it wait."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.fetch("SELECT id FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE", job_id)
            yield
    finally:
        await conn.close()


async def test_a_stop_whose_last_write_hit_the_deadline_leaves_the_store_usable(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's row is locked by another session all through stop(): its outcome
    waits until the deadline, then for FINAL_WRITE_TIME, and is left to its lease. The
    server answered all along: the worker's stop is still recorded, and the app's own
    shutdown can enqueue, and the same Jobs start again, at once. (The timeouts were
    counted as the server being unreachable, and everything after was refused.)"""
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 0.3)
    jobs = Jobs(postgres_url, shutdown_timeout=0.3, poll_interval=0.1)
    started, go = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        started.set()
        await go.wait()
        return "done"

    try:
        await jobs.start()
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        async with row_locked(postgres_url, job.id):
            go.set()
            with anyio.fail_after(5):
                await jobs.stop()
        workers = (await jobs.stats())["workers"]
        assert [w["alive"] for w in workers] == [False]  # its stop was recorded
        later = await t.enqueue()  # as the app's shutdown would
        go = anyio.Event()
        go.set()
        await jobs.start()
        with anyio.fail_after(10):
            assert await later.result(timeout=10) == "done"
    finally:
        await jobs.close()


async def test_a_cancelled_jobs_cleanup_can_enqueue_past_the_deadline(
    postgres_url: str,
) -> None:
    """A job runs past shutdown_timeout and is cancelled; its cleanup enqueues a job to
    take the work up later, during CANCEL_GRACE, past the store's deadline. The server
    answers: the enqueue is sent and stored (it was refused untried)."""
    jobs = Jobs(postgres_url, shutdown_timeout=0.3, poll_interval=0.1)
    started = anyio.Event()
    errors: list[BaseException] = []

    @jobs.task(name="resume")
    async def resume() -> None: ...

    @jobs.task(name="long")
    async def long() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await resume.enqueue()
                except Exception as error:
                    errors.append(error)

    try:
        await jobs.start()
        await long.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        with anyio.fail_after(10):
            await jobs.stop()
        assert errors == []
        assert [info.task for info in await jobs.list(task="resume")] == ["resume"]
    finally:
        await jobs.close()


async def test_a_deadline_set_as_a_wait_times_out_passes_that_wait_over() -> None:
    """A wait whose timeout has fired but which has not ended yet: setting a deadline
    then must not fail (rescheduling an expiring timeout raises), nor hold it up."""
    store = PostgresStore("postgresql://127.0.0.1/unused")
    loop = asyncio.get_running_loop()

    async def wait() -> None:
        async with store._until(loop.time()):
            try:
                await asyncio.Event().wait()
            finally:
                store.set_deadline(0.1)

    with pytest.raises(TimeoutError):
        await wait()
    assert store._waiting == {}


async def test_a_deadline_lifted_gives_the_waits_under_way_their_own_time(
    postgres_url: str,
) -> None:
    """The workers' stop sets a deadline and lifts it when done, and the app's calls go
    on: one under way meanwhile, cut short to the deadline, gets its command_timeout
    back (it failed at the lifted deadline, its connection dropped)."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        async with anyio.create_task_group() as tg:

            async def slow_call() -> None:
                with anyio.fail_after(5):
                    await store._run("app", lambda conn: conn.fetchval("SELECT pg_sleep(0.6)"))

            tg.start_soon(slow_call)
            with anyio.fail_after(5):
                while not store._waiting:
                    await anyio.lowlevel.checkpoint()
            store.set_deadline(0.2)  # a stop begins...
            store.set_deadline(None)  # ...and ends in time
    finally:
        await store.close()
