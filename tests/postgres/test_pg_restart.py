"""PostgreSQL restarts under load and nothing is lost.

Restarting the server cuts every connection on it, so this test runs only when
``ASYNCJOBS_TEST_PG_RESTART=1`` says the server may be restarted (``.ci/run``
sets it; it owns the server there). It needs ``pg_ctlcluster`` and the rights to
use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import anyio
import asyncpg
import pytest

from asyncjobs import Jobs
from asyncjobs._errors import StoreError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("ASYNCJOBS_TEST_PG_RESTART") != "1" or not shutil.which("pg_ctlcluster"),
        reason="restarts the PostgreSQL server: set ASYNCJOBS_TEST_PG_RESTART=1 (.ci/run does)",
    ),
]

JOBS = 1500


def pg_ctl(action: str, check: bool = True) -> None:
    version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version[-1], "main", action],
        check=check,
        capture_output=True,
        timeout=60,
    )


async def succeeded(url: str, ids: set[str]) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM asyncjobs_jobs WHERE status = 'succeeded' "
                "AND id = ANY($1::text[])",
                list(ids),
            )
        )
    finally:
        await conn.close()


async def test_a_server_restart_under_load_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    ran: set[int] = set()
    jobs = Jobs(postgres_url, concurrency=10, poll_interval=0.2, visibility_timeout=5)

    @jobs.task(name="record")
    async def record(i: int) -> None:
        ran.add(i)

    enqueued: set[str] = set()
    errors: list[StoreError] = []
    down = anyio.Event()
    back = anyio.Event()

    async def produce() -> None:
        i = 0
        while i < JOBS:
            try:
                job = await jobs.enqueue(record, i)
            except StoreError as error:  # the server is down: try again shortly
                errors.append(error)
                await anyio.sleep(0.05)  # noqa: TID251 - riding out a real outage
                continue
            enqueued.add(job.id)
            i += 1
            if i % 10 == 0:
                await anyio.sleep(0.01)  # noqa: TID251 - a steady stream, not one burst
            if i == JOBS // 3:
                down.set()

    async def restart() -> None:
        await down.wait()
        await anyio.to_thread.run_sync(pg_ctl, "stop")
        await anyio.sleep(1.0)  # noqa: TID251 - keep the server down for a moment
        await anyio.to_thread.run_sync(pg_ctl, "start")
        back.set()

    try:
        async with jobs:
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce)
                    tg.start_soon(restart)
                while True:
                    if await succeeded(postgres_url, enqueued) == len(enqueued):
                        break
                    await anyio.sleep(0.2)  # noqa: TID251 - waiting on real workers
    finally:
        if not back.is_set():
            await anyio.to_thread.run_sync(pg_ctl, "start", False)
        await jobs.close()
    assert len(enqueued) == JOBS
    assert ran == set(range(JOBS))
    assert errors, "enqueue never saw the server down"
    assert all("unreachable" in str(e) for e in errors), errors[0]
