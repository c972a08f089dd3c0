"""The statements that select dead jobs (the dead list, ``retry_dead``,
``purge(status="dead")``) take jobs whose status this version does not know too
(``DEAD_AS_READ``, a NOT IN), and read them through the partial index
``asyncjobs_jobs_dead``, not over every row of a table of finished jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncjobs import Jobs
from asyncjobs.stores import PostgresStore
from asyncjobs.stores._statuses import DEAD_AS_READ

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")

MIGRATIONS = Path(__file__).resolve().parents[2] / "asyncjobs" / "stores" / "migrations"


def test_the_dead_index_is_built_on_the_condition_the_stores_select_by() -> None:
    """A partial index serves only a query whose condition matches its own."""
    for backend in ("sqlite", "postgres"):
        (script,) = MIGRATIONS.joinpath(backend).glob("*_dead_index.sql")
        assert f"WHERE {DEAD_AS_READ};" in script.read_text("utf-8"), backend


async def test_dead_jobs_are_read_through_the_dead_index(
    make_jobs: MakeJobs, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_jobs(postgres_url).store
    assert isinstance(store, PostgresStore)
    await store.open()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(
            "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, "
            "attempts, run_at, enqueued_at, finished_at) SELECT 'j' || n, 't', 'default', "
            "CASE WHEN n % 5000 = 0 THEN 'dead' ELSE 'succeeded' END, '{}', 1, 1, 0, 0, n "
            "FROM generate_series(1, 20000) AS n"
        )
        await conn.execute("ANALYZE asyncjobs_jobs")
        sent: list[tuple[str, tuple[Any, ...]]] = []
        run = store._run

        async def logged(what: str, fn: Callable[[Any], Awaitable[Any]], **kw: Any) -> Any:
            async def with_logger(c: Any) -> Any:
                log = lambda q: sent.append((q.query, q.args))  # noqa: E731
                c.add_query_logger(log)
                try:
                    return await fn(c)
                finally:
                    c.remove_query_logger(log)

            return await run(what, with_logger, **kw)

        monkeypatch.setattr(store, "_run", logged)
        assert len(await store.list(status="dead", limit=10, now=0.0)) == 4
        await store.list(status="dead", queue="q", limit=10, before_seq=5, now=0.0)
        assert await store.retry_dead(queue=None, task="t", now=0.0) == 4
        await conn.execute("UPDATE asyncjobs_jobs SET status = 'dead' WHERE id = 'j5000'")
        assert await store.purge(status="dead", now=0.0) == 1
        reads = [(query, args) for query, args in sent if DEAD_AS_READ in query]
        assert len(reads) >= 5, sent
        for query, args in reads:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, *args))
            assert "asyncjobs_jobs_dead" in plan, (query, plan)
    finally:
        await conn.close()
