"""Stopping at once (``asyncjobs worker``'s second signal, ``Jobs._stop_at_once``) while
another writer holds the store: the store's waits of shutdown (a claim under way, the
last outcomes) get ``STOP_AT_ONCE_GRACE``, not ``shutdown_timeout`` nor
``FINAL_WRITE_TIME``. A release that could not be written leaves its job running with
its lease: it runs again once that expires, as after a crash."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import asyncjobs._outbox
import asyncjobs._shutdown
from asyncjobs import Job, Jobs
from asyncjobs.stores import PostgresStore, SQLiteStore, Store
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

GRACE = 0.3
"""The tests' STOP_AT_ONCE_GRACE: real time, as the store's waits are."""

STOPS_BY = 5.0
"""Seconds a stop at once may take here: the grace, then a last try of each write left
(SQLite a quarter of a second, PostgreSQL a second: some 2.5 s in all), and a loaded
machine's delays. The waits it cuts short are longer: the store's own (10 s,
``patient_jobs``), ``shutdown_timeout`` (600 s) and ``FINAL_WRITE_TIME`` (30 s here)."""


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._shutdown, "STOP_AT_ONCE_GRACE", GRACE, raising=False)
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 30.0)


async def until(check: Callable[[], object]) -> None:
    """Yield to the loop until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            for _ in range(10):
                await anyio.lowlevel.checkpoint()


def patient_jobs(make_jobs: MakeJobs, url: str, **kwargs: Any) -> Jobs:
    """Workers that drain for up to 600 s, on a store that waits 10 s for another writer
    before giving up on its own (SQLite five busy timeouts of 2 s, PostgreSQL a
    command_timeout of 10 s)."""
    kwargs.setdefault("shutdown_timeout", 600)
    if url.startswith("postgres"):
        separator = "&" if "?" in url else "?"
        return make_jobs(f"{url}{separator}command_timeout=10", **kwargs)
    jobs = make_jobs(url, **kwargs)
    assert isinstance(jobs.store, SQLiteStore)
    jobs.store.busy_timeout = 2.0
    return jobs


@asynccontextmanager
async def another_writer(store: Store, url: str) -> AsyncIterator[None]:
    """Another process's transaction holding the jobs against writes until the block ends
    (SQLite the file's write lock, PostgreSQL the jobs table); reads go on."""
    if isinstance(store, SQLiteStore):
        other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")
            yield
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()
        return
    import asyncpg

    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE asyncjobs_jobs IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def a_job_under_way(jobs: Jobs) -> tuple[Job[str], list[int], anyio.Event]:
    """Start the workers on a job that ends once the event is set; its runs counted."""
    runs: list[int] = []
    started, go = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        runs.append(1)
        started.set()
        await go.wait()
        return "done"

    await jobs.start()
    job = await t.enqueue()
    with anyio.fail_after(5):
        await started.wait()
    return job, runs, go


async def stop_at_once(jobs: Jobs, *, when: Callable[[], object] | None = None) -> None:
    """``stop()`` the workers, then, once they drain (and ``when()``), stop them at once,
    as a second signal does; returns when ``stop()`` does, ``STOPS_BY`` at most later."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(jobs.stop)
        await until(lambda: jobs._stop_requested.is_set())
        if when is not None:
            await until(when)
        assert jobs._stop_at_once()
        with anyio.fail_after(STOPS_BY):  # real time: the store's waits are
            await until_stopped(jobs)


async def until_stopped(jobs: Jobs) -> None:
    host = jobs._host
    while host is not None and not host.done():
        await anyio.lowlevel.checkpoint()


async def runs_again_once_its_lease_expires(
    make_jobs: MakeJobs, url: str, job: Job[str], clock: FakeClock
) -> None:
    """The job whose release could not be written is still running, attempt 1 spent,
    with its lease. Once that expires, a worker started again (another process) recovers
    it, attempt 1 spent as after a crash, and runs it again, to its end."""
    info = await job.info()
    assert (info.status, info.attempts) == ("running", 1)
    again = make_jobs(url)
    ran: list[int] = []

    @again.task(name="t")
    async def t() -> str:
        ran.append(1)
        return "done"

    clock.advance(again.settings.visibility_timeout + 1)
    await drain(again)
    rerun = await again.get(job.id)
    assert rerun is not None
    assert (rerun.status, rerun.attempts, rerun.result) == ("succeeded", 2, "done")
    assert ran == [1]


async def test_stopping_at_once_cuts_short_a_claim_another_writer_holds_up(
    backend_url: str, make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A claim was under way as the workers began to drain, held up by another writer:
    shutdown lets it land, up to the store's own waits (10 s here) within
    ``shutdown_timeout`` (600 s). A stop at once waited for it all the same."""
    jobs = patient_jobs(make_jobs, backend_url)
    job, _, _ = await a_job_under_way(jobs)
    async with another_writer(jobs.store, backend_url):
        jobs.runner.wake()
        await until(lambda: jobs.runner._claims_under_way)
        await stop_at_once(jobs)
    await runs_again_once_its_lease_expires(make_jobs, backend_url, job, clock)


async def test_stopping_at_once_cuts_short_the_last_writes_another_writer_holds_up(
    backend_url: str, make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The running job is cancelled and its release is to be written, but another writer
    holds the store: shutdown tries its last writes for ``FINAL_WRITE_TIME`` (5 s; 30 s
    here). A stop at once waited for them all the same."""
    jobs = patient_jobs(make_jobs, backend_url)
    job, _, _ = await a_job_under_way(jobs)
    async with another_writer(jobs.store, backend_url):
        await stop_at_once(jobs)
    await runs_again_once_its_lease_expires(make_jobs, backend_url, job, clock)


async def test_stopping_at_once_while_the_last_writes_are_tried_cuts_them_short(
    backend_url: str, make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """``shutdown_timeout`` ran out and the job's release is being tried (for
    ``FINAL_WRITE_TIME``, 30 s here) when the second signal comes: that wait ends too."""
    jobs = patient_jobs(make_jobs, backend_url, shutdown_timeout=0.1)
    job, _, _ = await a_job_under_way(jobs)
    async with another_writer(jobs.store, backend_url):
        await stop_at_once(jobs, when=lambda: jobs.runner._writing)
    await runs_again_once_its_lease_expires(make_jobs, backend_url, job, clock)


async def test_stopping_at_once_gives_the_running_jobs_back_to_a_free_store(
    backend_url: str, make_jobs: MakeJobs
) -> None:
    """Nothing holds the store: the grace is enough for the releases, and the job goes
    back to the queue with its attempt unspent."""
    jobs = patient_jobs(make_jobs, backend_url)
    job, runs, go = await a_job_under_way(jobs)
    await stop_at_once(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", 0)
    go.set()
    await drain(jobs)
    assert await job.result(timeout=1) == "done"
    assert runs == [1, 1]
