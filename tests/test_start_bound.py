"""``start()`` while another process holds the store (SQLite a lock on the file,
PostgreSQL a lock on the jobs table), or while the store hangs: the first lease
recovery gets ``START_TIME``, then start() fails with an error naming what it waited
on, and the app's startup is refused with it. The store's own waits (SQLite five busy
timeouts, PostgreSQL ``command_timeout``) were all that bounded it, and a store that
hangs was not bounded at all. Nothing is lost: the jobs stay in the store, and run once
a start gets through. (Opening the store keeps its own waits: a migration takes however
long it takes: tests/stores/test_migrations.py.)"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import asyncjobs._lifecycle
import asyncjobs._shutdown
from asyncjobs import AsyncJobsError, Jobs, JobsMiddleware, StoreError
from asyncjobs.stores import SQLiteStore, Store
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]

START = 0.5
"""The tests' START_TIME: real time, as the store's waits are."""

PAST_START = 3.0
"""The tests' PAST_START_TIME: a wait that the deadline ends takes a little longer than
``START`` (PostgreSQL rolls back the statement it cancels)."""

FAILS_BY = 8.0
"""Seconds a start that fails may take here: ``START`` and ``PAST_START``, closing the
store, and a loaded machine's delays. The store's own waits are far longer
(``patient_jobs``)."""


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._lifecycle, "START_TIME", START, raising=False)
    monkeypatch.setattr(asyncjobs._lifecycle, "PAST_START_TIME", PAST_START, raising=False)


def patient_jobs(make_jobs: MakeJobs, url: str) -> Jobs:
    """A ``Jobs`` whose store waits 60 s for another writer before giving up on its own
    (SQLite five busy timeouts of 12 s, PostgreSQL a command_timeout of 60 s)."""
    if url.startswith("postgres"):
        separator = "&" if "?" in url else "?"
        return make_jobs(f"{url}{separator}command_timeout=60")
    jobs = make_jobs(url)
    assert isinstance(jobs.store, SQLiteStore)
    jobs.store.busy_timeout = 12.0
    return jobs


@asynccontextmanager
async def holding_the_jobs(store: Store, url: str) -> AsyncIterator[None]:
    """Another process holding the jobs against writes, and on PostgreSQL reads too, until
    the block ends (SQLite the file's write lock, PostgreSQL ACCESS EXCLUSIVE on the
    jobs table); the store opens."""
    if isinstance(store, SQLiteStore):
        other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")
            yield
        finally:
            other.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE asyncjobs_jobs IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def queued_job(jobs: Jobs) -> tuple[str, Callable[[], Any]]:
    """A job queued in the store (which that opens), the store closed again."""

    @jobs.task(name="t")
    async def t() -> str:
        return "done"

    job = await t.enqueue()
    await jobs.store.close()
    return job.id, t


async def runs_once_started(jobs: Jobs, job_id: str) -> None:
    """Nothing was lost: the job is still queued, and runs once the workers start."""
    info = await jobs.get(job_id)
    assert info is not None
    assert (info.status, info.attempts) == ("queued", 0)
    await jobs.start()
    with anyio.fail_after(5):
        while (info := await jobs.get(job_id)) is None or info.status != "succeeded":
            await anyio.lowlevel.checkpoint()
    assert info.result == "done"


async def test_start_fails_in_time_while_another_process_holds_the_jobs(
    backend_url: str, make_jobs: MakeJobs
) -> None:
    """The first lease recovery waits on the other process's lock: start() fails after
    ``START_TIME``, naming it, and not after the store's own waits (60 s here)."""
    jobs = patient_jobs(make_jobs, backend_url)
    job_id, _ = await queued_job(jobs)
    async with holding_the_jobs(jobs.store, backend_url):
        with anyio.fail_after(FAILS_BY), pytest.raises(StoreError) as raised:
            await jobs.start()
    message = str(raised.value)
    assert message.startswith("the first lease recovery (requeueing the jobs")
    assert f"did not get through within {START:g}s" in message
    assert not jobs.started
    await runs_once_started(jobs, job_id)


def a_recovery_that_hangs(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """The store's ``recover`` hangs, deadline or not (a stuck connection), until the
    event is set. (Nothing to wait for past ``START_TIME``: a short ``PAST_START_TIME``.)"""
    monkeypatch.setattr(asyncjobs._lifecycle, "PAST_START_TIME", 0.2)
    unblocked = anyio.Event()

    async def recover(*args: Any, **kwargs: Any) -> Any:
        await unblocked.wait()
        return []

    monkeypatch.setattr(jobs.store, "recover", recover)
    return unblocked


async def test_start_fails_in_time_when_the_first_lease_recovery_hangs(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery that the store's deadline does not end, under a fake clock nobody
    advances: start() gives up on it shortly after ``START_TIME`` of real time."""
    jobs = make_jobs()
    job_id, _ = await queued_job(jobs)
    unblocked = a_recovery_that_hangs(jobs, monkeypatch)
    try:
        with anyio.fail_after(FAILS_BY), pytest.raises(StoreError) as raised:
            await jobs.start()
    finally:
        unblocked.set()
    message = str(raised.value)
    assert message.startswith("the first lease recovery (requeueing the jobs")
    assert f"did not end within {START:g}s" in message
    assert not jobs.started
    monkeypatch.undo()
    await runs_once_started(jobs, job_id)


async def test_the_app_refuses_to_start_when_the_first_lease_recovery_hangs(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``JobsMiddleware``: the server is told the startup failed, and why."""
    jobs = make_jobs()
    unblocked = a_recovery_that_hangs(jobs, monkeypatch)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached")  # an app without lifespan

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    try:
        with anyio.fail_after(FAILS_BY), pytest.raises(StoreError):
            await JobsMiddleware(app, jobs=jobs)(scope, receive, send)
    finally:
        unblocked.set()
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith(
        "asyncjobs could not start: the first lease recovery (requeueing the jobs"
    )
    assert not jobs.started


GRACE = 0.2
"""The tests' STOP_AT_ONCE_GRACE: real time, as the store's waits are."""

STOPPED_BY = 5.0
"""Seconds a stop during start() may take here: ``GRACE``, a try past it, closing the
store, and a loaded machine's delays; far less than ``START_TIME``, 60 s in these
tests, as it is."""


async def stopped_while_starting(jobs: Jobs, stop: Callable[[], Any]) -> AsyncJobsError:
    """Start ``jobs``, and call ``stop`` (``jobs.stop``, ``jobs.close``) once start()
    waits for the first lease recovery: stop must end within ``STOPPED_BY``, and no
    workers run then. What start() raised."""
    raised: list[AsyncJobsError] = []

    async def start() -> None:
        with pytest.raises(AsyncJobsError) as error:
            await jobs.start()
        raised.append(error.value)

    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        with anyio.fail_after(STOPPED_BY):
            while jobs._host is None:
                await anyio.lowlevel.checkpoint()
            await stop()
        assert not jobs.started
        with anyio.fail_after(STOPPED_BY):  # start() saw the stop
            while not raised:
                await anyio.lowlevel.checkpoint()
    assert not jobs.started
    assert jobs._host is None
    await jobs.stop()  # nothing left to stop
    return raised[0]


@pytest.fixture
def long_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """``START_TIME`` as it is (a stop waited for all of it), the stop's grace short."""
    monkeypatch.setattr(asyncjobs._lifecycle, "START_TIME", 60.0)
    monkeypatch.setattr(asyncjobs._shutdown, "STOP_AT_ONCE_GRACE", GRACE)


@pytest.mark.usefixtures("long_start")
async def test_a_stop_during_start_cuts_the_wait_for_another_processs_lock_short(
    backend_url: str, make_jobs: MakeJobs
) -> None:
    """The app told to shut down (``stop()``) while the first lease recovery waits on
    another process's lock: the store's wait gets the stop's grace, not what is left of
    ``START_TIME``; start() fails saying it was stopped, no workers run, and the job is
    still queued for the next start, which runs it."""
    jobs = patient_jobs(make_jobs, backend_url)
    job_id, _ = await queued_job(jobs)
    async with holding_the_jobs(jobs.store, backend_url):
        error = await stopped_while_starting(jobs, jobs.stop)
    assert "cut short by stop() or close()" in str(error)
    assert "the jobs stay in the store for the next start" in str(error)
    await runs_once_started(jobs, job_id)


@pytest.mark.usefixtures("long_start")
async def test_a_close_during_start_gives_up_on_a_first_lease_recovery_that_hangs(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` while the first lease recovery hangs (a stuck connection, which its
    deadline does not end, under a fake clock nobody advances): the recovery is given
    up on ``PAST_START_TIME`` past the stop's grace, of real time, and the store closes."""
    jobs = make_jobs()
    job_id, _ = await queued_job(jobs)
    unblocked = a_recovery_that_hangs(jobs, monkeypatch)
    try:
        error = await stopped_while_starting(jobs, jobs.close)
    finally:
        unblocked.set()
    assert "cut short by stop() or close()" in str(error)
    monkeypatch.undo()
    await runs_once_started(jobs, job_id)


async def test_two_starts_at_once_start_one_set_of_workers_and_lift_the_deadline(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``start()`` calls at once (two lifespans entering), both opening the store:
    the second finds the workers the first started, and the store's deadline is lifted
    once they recovered, not left to cut short every wait from then on."""
    jobs = make_jobs()
    started: list[int] = []
    main = jobs._main

    async def counted(*args: Any) -> None:
        started.append(1)
        await main(*args)

    monkeypatch.setattr(jobs, "_main", counted)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.start)
            tg.start_soon(jobs.start)
    assert jobs.started
    assert started == [1]
    store: Any = jobs.store
    assert store._give_up_at is None
    await jobs.stop()


async def test_start_waits_for_another_processs_migration_past_the_start_bound(
    postgres_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the store is not cut short by ``START_TIME``: another process migrating
    the schema (an index built over a large table) holds the migration lock for longer,
    and start() waits for it, then starts. Cut short, a migration of its own would roll
    back at every start, and the app would never start on the new version."""
    import asyncpg

    monkeypatch.setattr(asyncjobs._lifecycle, "START_TIME", 0.1)
    monkeypatch.setattr(asyncjobs._lifecycle, "PAST_START_TIME", 0.1)
    jobs = Jobs(postgres_url, clock=clock)
    job_id, _ = await queued_job(jobs)
    holder = await asyncpg.connect(postgres_url)
    try:
        async with anyio.create_task_group() as tg:
            async with holder.transaction():
                await holder.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('asyncjobs.migrate:' "
                    "|| current_schema()))"
                )
                tg.start_soon(jobs.start)
                with anyio.fail_after(FAILS_BY):  # start() is waiting on the lock
                    while not await holder.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ):
                        await anyio.lowlevel.checkpoint()
                # Past the bound start() gives the first lease recovery, in real time.
                await anyio.sleep(0.5)  # noqa: TID251 - outlasting a real-time bound
                assert not jobs.started
            with anyio.fail_after(FAILS_BY):
                while not jobs.started:
                    await anyio.lowlevel.checkpoint()
        await jobs.stop()
        await runs_once_started(jobs, job_id)
    finally:
        await holder.close()
        await jobs.close()
