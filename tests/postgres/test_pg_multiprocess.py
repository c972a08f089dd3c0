"""Worker processes on hosts sharing one PostgreSQL database (simulated by processes).

The workers are real processes running ``tests/crash/crash_worker.py`` against a
fresh schema; each run of task ``record`` appends its job id to the process's own
runs file (line-buffered, so it survives kill -9).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from worker_process import Worker

from asyncjobs import Jobs, JobSpec

pytestmark = pytest.mark.slow

JOBS = 10_000


async def counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, count(*) FROM asyncjobs_jobs GROUP BY status")
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    with anyio.move_on_after(timeout):
        while True:
            if await check():
                return
            await anyio.sleep(0.1)  # noqa: TID251 - waiting on real processes
    raise TimeoutError(f"gave up after {timeout}s waiting for {what}")


async def all_succeeded(url: str) -> bool:
    return (await counts(url)).get("succeeded", 0) == JOBS


async def enqueue(url: str, n: int) -> list[str]:
    jobs = Jobs(url, workers=False)
    try:
        ids: list[str] = []
        for start in range(0, n, 1000):
            specs: list[JobSpec[object]] = [
                JobSpec(task="record", args=(i,)) for i in range(start, min(n, start + 1000))
            ]
            ids += [job.id for job in await jobs.enqueue_many(specs)]
        return ids
    finally:
        await jobs.close()


@pytest.fixture
def start_workers(postgres_url: str, tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def check_stderr(workers: list[Worker]) -> None:
    for worker in workers:
        errors = worker.stderr.read_text()
        assert "Traceback" not in errors, errors


async def test_four_processes_run_10000_jobs_and_none_twice(
    postgres_url: str, tmp_path: Path, start_workers: list[Worker]
) -> None:
    ids = await enqueue(postgres_url, JOBS)
    workers = [Worker(postgres_url, tmp_path, f"p{n}", "--concurrency", "25") for n in range(4)]
    start_workers += workers
    await wait_until(lambda: all_succeeded(postgres_url), 60, "all jobs to succeed")
    assert [worker.stop() for worker in workers] == [0, 0, 0, 0]
    assert await counts(postgres_url) == {"succeeded": JOBS}
    per_process = [worker.run_ids() for worker in workers]
    runs = collections.Counter(run for ids_ in per_process for run in ids_)
    assert set(runs) == set(ids)
    assert max(runs.values()) == 1  # no job ran twice
    assert sum(1 for ids_ in per_process if ids_) >= 2  # the work was shared
    check_stderr(workers)


async def test_a_killed_process_loses_no_job(
    postgres_url: str, tmp_path: Path, start_workers: list[Worker]
) -> None:
    ids = await enqueue(postgres_url, JOBS)
    options = ("--concurrency", "10", "--visibility-timeout", "2", "--work", "0.002")
    workers = [Worker(postgres_url, tmp_path, f"p{n}", *options) for n in range(4)]
    start_workers += workers
    victim = workers[0]

    # Kill one worker with jobs in hand once it has done some work.
    async def victim_busy() -> bool:
        return len(victim.run_ids()) >= 200

    await wait_until(victim_busy, 30, "the victim to run jobs")
    victim.kill()
    assert victim.process.returncode == -9
    await wait_until(lambda: all_succeeded(postgres_url), 60, "all jobs to succeed")
    survivors = workers[1:]
    assert [worker.stop() for worker in survivors] == [0, 0, 0]
    assert await counts(postgres_url) == {"succeeded": JOBS}
    runs = collections.Counter(run for worker in workers for run in worker.run_ids())
    assert set(runs) == set(ids)
    # Only jobs the victim held when it died can have run twice: at most its 10 slots'
    # jobs plus those it ran while claiming ahead (short jobs: up to 3 per slot more)
    # whose outcomes were not written yet.
    assert sum(n - 1 for n in runs.values()) <= 10 + 3 * 10
    check_stderr(survivors)
