"""Rows changed by hand in the store, on every backend (``db_url`` is overridden): the
job stays visible, nothing that lists or renders jobs fails, and it can be retried."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import pytest

from asyncjobs import Jobs, JobStatus
from asyncjobs.testing import drain


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
    dashboard = jobs.dashboard(auth=("admin", "secret"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard),
        base_url="http://testserver",
        auth=("admin", "secret"),
    ) as client:
        for page in ("/", "/jobs", f"/jobs/{odd.id}"):
            response = await client.get(page)
            assert response.status_code == 200, page
    assert await jobs.retry(odd.id)
    await drain(jobs)
    assert await odd.result(timeout=5) == 1
