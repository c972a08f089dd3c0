"""Rows changed by hand in the store, on every backend (``db_url`` is overridden): the
job stays visible, nothing that lists or renders jobs fails, and it can be retried."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import pytest

from asyncjobs import AsyncJobsError, Jobs, JobStatus
from asyncjobs.stores._statuses import STATUSES
from asyncjobs.testing import drain


def dashboard_client(jobs: Jobs) -> httpx.AsyncClient:
    """A client of ``jobs``' dashboard, signed in."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=jobs.dashboard(auth=("admin", "secret"))),
        base_url="http://testserver",
        auth=("admin", "secret"),
    )


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


async def run_sql(db_url: str, sql: str, *params: Any) -> None:
    """Run ``sql`` (``$n`` parameters) on the store behind ``db_url``, as an operator would."""
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
            db.execute(sql.replace("$1", "?").replace("$2", "?"), params)
        db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(sql, *params)
    finally:
        await conn.close()


async def test_a_job_with_a_status_this_version_does_not_know_shows_dead_and_can_be_retried(
    jobs: Jobs, db_url: str
) -> None:
    """Written by hand, or by a newer asyncjobs sharing the store: reading the job, every
    list and the dashboard failed with "'paused' is not a valid JobStatus"."""

    @jobs.task(name="echo")
    async def echo(n: int) -> int:
        return n

    odd, other = await echo.enqueue(1), await echo.enqueue(2)
    await run_sql(db_url, "UPDATE asyncjobs_jobs SET status = $1 WHERE id = $2", "paused", odd.id)
    await drain(jobs)
    assert await other.result(timeout=5) == 2
    info = await odd.info()
    assert (info.status, info.attempts) == (JobStatus.DEAD, 0)
    assert "status 'paused'" in (info.error or "")
    assert [job.id for job in await jobs.list()] == [other.id, odd.id]
    counts = (await jobs.stats())["totals"]["counts"]  # and so the metrics: as it reads
    assert (counts["dead"], counts["succeeded"], "paused" in counts) == (1, 1, False)
    async with dashboard_client(jobs) as client:
        for page in ("/", "/jobs", f"/jobs/{odd.id}"):
            response = await client.get(page)
            assert response.status_code == 200, page
    assert await jobs.retry(odd.id)
    await drain(jobs)
    assert await odd.result(timeout=5) == 1


async def test_every_dead_filter_and_bulk_action_takes_a_job_whose_status_reads_dead(
    jobs: Jobs, db_url: str
) -> None:
    """It reads as dead, but the dead list (``jobs.list``, the dashboard's and the CLI's),
    ``retry_dead`` and ``purge(status="dead")`` filtered ``status = 'dead'`` and missed it."""

    @jobs.task(name="echo", retries=0)
    async def echo(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    dead, odd, done = await echo.enqueue(-1), await echo.enqueue(1), await echo.enqueue(2)
    await drain(jobs)
    assert (await dead.info()).status == JobStatus.DEAD
    await run_sql(db_url, "UPDATE asyncjobs_jobs SET status = $1 WHERE id = $2", "paused", odd.id)
    assert [job.id for job in await jobs.list(status="dead")] == [odd.id, dead.id]
    assert [job.id for job in await jobs.list(status="succeeded")] == [done.id]
    async with dashboard_client(jobs) as client:
        page = (await client.get("/jobs", params={"status": "dead"})).text
    assert odd.id in page
    assert dead.id in page
    assert done.id not in page

    assert await jobs.retry_dead(task="echo") == 2
    assert {(await job.info()).status for job in (dead, odd)} == {JobStatus.QUEUED}
    await drain(jobs)
    assert await odd.result(timeout=5) == 1

    await run_sql(db_url, "UPDATE asyncjobs_jobs SET status = $1 WHERE id = $2", "paused", odd.id)
    assert await jobs.purge(status="dead") == 2
    assert [job.id for job in await jobs.list()] == [done.id]


async def test_a_waiting_job_whose_status_reads_dead_waits_again_when_retried_in_bulk(
    jobs: Jobs, db_url: str
) -> None:
    """``retry_dead`` takes back a job that never ran as ``retry`` does: a chain member
    waits again for the one before it, instead of running beside it."""
    order: list[int] = []

    @jobs.task
    async def step(n: int) -> int:
        order.append(n)
        return n

    chain = await jobs.chain(step.spec(1), step.spec(2))
    second = chain.jobs[1]
    await run_sql(
        db_url, "UPDATE asyncjobs_jobs SET status = $1 WHERE id = $2", "paused", second.id
    )
    assert await jobs.retry_dead() == 1
    assert (await second.info()).status == JobStatus.WAITING
    await drain(jobs)
    assert order == [1, 2]


def test_the_stores_filter_by_the_statuses_jobstatus_names() -> None:
    assert tuple(JobStatus) == STATUSES


async def test_retry_dead_leaves_a_job_that_retry_refuses(jobs: Jobs, db_url: str) -> None:
    """A chain member that never got the previous result it takes, the member before it
    gone: ``retry`` refuses it, so ``retry_dead`` passes it over and retries the rest."""

    @jobs.task(retries=0)
    async def fetch() -> int:
        raise RuntimeError("source down")

    @jobs.task
    async def publish(value: int) -> int:
        return value

    chain = await jobs.chain(fetch.spec(), publish.spec(), pass_result=True)  # type: ignore[call-arg]
    first, orphan = chain.jobs
    other = await jobs.enqueue(fetch)
    await drain(jobs)
    assert await jobs.discard(first.id)
    await run_sql(
        db_url, "UPDATE asyncjobs_jobs SET status = $1 WHERE id = $2", "paused", orphan.id
    )
    assert await jobs.retry_dead() == 1
    assert (await other.info()).status == JobStatus.QUEUED
    assert (await orphan.info()).status == JobStatus.DEAD
    with pytest.raises(AsyncJobsError, match="pass_result"):
        await jobs.retry(orphan.id)
