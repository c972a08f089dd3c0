"""A batch bigger than PostgreSQL takes in one jsonb value (256 MiB) goes in as several
statements, still all or nothing. The limit is lowered here to a few kilobytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asyncjobs import Jobs
from asyncjobs.stores import NewJob, _postgres_sql
from asyncjobs.stores._postgres_sql import insert_jobs

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":["' + "x" * 100 + '"],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3,
    )  # fmt: skip


class Counted:
    """An asyncpg connection that counts the INSERT statements sent through it."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.inserts = conn, 0

    def transaction(self) -> Any:
        return self.conn.transaction()

    async def execute(self, query: str, *args: Any) -> Any:
        self.inserts += query.startswith("INSERT")
        return await self.conn.execute(query, *args)


async def test_a_batch_over_the_jsonb_limit_is_split_and_stays_atomic(
    make_jobs: MakeJobs, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_postgres_sql, "JSONB_LIMIT", 2_000)
    await make_jobs(postgres_url).store.open()  # the schema
    conn = await asyncpg.connect(postgres_url)
    try:
        counted = Counted(conn)
        ids = [f"{n:032d}" for n in range(60)]  # about 15 kB of rows
        assert await insert_jobs(counted, [new_job(i) for i in ids], now=1.0) == ids  # type: ignore[arg-type]
        assert counted.inserts >= 8
        stored = await conn.fetch("SELECT id FROM asyncjobs_jobs ORDER BY seq")
        assert [r["id"] for r in stored] == ids

        again = [new_job(f"{n:032x}") for n in range(1000, 1060)]
        again[55] = again[2]  # the same id twice, in different statements: all refused
        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_jobs(conn, again, now=1.0)
        assert await conn.fetchval("SELECT count(*) FROM asyncjobs_jobs") == 60
    finally:
        await conn.close()
