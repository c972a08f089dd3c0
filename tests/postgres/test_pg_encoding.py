"""Non-ASCII text in a database whose encoding is SQL_ASCII: PostgreSQL keeps a text
value's bytes there as they come, but refuses a jsonb ``\\u`` escape of a character
beyond ASCII, so the JSON rows of batch inserts and of finishes must carry such
characters as themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from conftest import new_database, with_search_path

from asyncjobs import Jobs
from asyncjobs.stores import NewJob, Outcome, OutcomeKind, PostgresStore, _postgres_sql
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._postgres_sql import over_limit
from asyncjobs.testing import FakeClock

asyncpg = pytest.importorskip("asyncpg")

TASK = "café"


@pytest.fixture
async def sql_ascii_url() -> AsyncIterator[str]:
    """The DSN of a new SQL_ASCII database on the test server, dropped after the test."""
    async with new_database(
        "ascii", "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ) as url:
        yield url


def new_job(n: int) -> NewJob:
    return NewJob(
        id=f"job-{n}", task=TASK, queue="file-d'attente", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3, idempotency_key=f"clé-{n}",
        group_key=f"groupe-{n}-€",
    )  # fmt: skip


async def test_a_batch_with_non_ascii_text_is_inserted_in_a_sql_ascii_database(
    sql_ascii_url: str,
) -> None:
    store = PostgresStore(sql_ascii_url)
    await store.open()
    try:
        ids = await store.insert([new_job(n) for n in range(3)], now=1.0)

        assert ids == ["job-0", "job-1", "job-2"]
        rows = [await store.get(job_id) for job_id in ids]
        assert [(r.task, r.queue, r.idempotency_key, r.group_key) for r in rows if r] == [
            (TASK, "file-d'attente", f"clé-{n}", f"groupe-{n}-€") for n in range(3)
        ]
    finally:
        await store.close()


async def test_outcomes_with_non_ascii_text_are_stored_in_a_sql_ascii_database(
    sql_ascii_url: str,
) -> None:
    store = PostgresStore(sql_ascii_url)
    await store.open()
    try:
        for n in range(3):  # one at a time: an insert of one job sends no JSON
            await store.insert([new_job(n)], now=1.0)
        request = ClaimRequest(
            worker="wörker", tasks={TASK: TaskLimits(max_attempts=3)}, queues=None, limit=3,
            lease=60.0,
        )  # fmt: skip
        assert len(await store.claim(request, now=2.0)) == 3
        error = 'ValueError: "déjà vu" \\ 中文 😀'
        outcomes = [
            Outcome("job-0", "wörker", 1, OutcomeKind.DEAD, error=error),
            Outcome("job-1", "wörker", 1, OutcomeKind.RETRY, error=error, run_at=9.5),
            Outcome("job-2", "wörker", 1, OutcomeKind.SUCCEEDED, result='"\\u00e9t\\u00e9"'),
        ]

        assert await store.finish(outcomes, now=3.0) == ["job-0", "job-1", "job-2"]

        rows = [await store.get(o.job_id) for o in outcomes]
        assert [(r.status, r.error, r.result, r.run_at) for r in rows if r] == [
            ("dead", error, None, 0.0),
            ("scheduled", error, None, 9.5),
            ("succeeded", None, '"\\u00e9t\\u00e9"', 0.0),
        ]
    finally:
        await store.close()


def test_the_jsonb_limit_counts_bytes_not_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_postgres_sql, "JSONB_LIMIT", 10)
    assert not over_limit("a" * 10)
    assert over_limit("a" * 11)
    assert over_limit("é" * 6)  # 6 characters, 12 bytes


async def test_a_long_non_ascii_schema_name_in_a_sql_ascii_database_opens_and_wakes_workers(
    sql_ascii_url: str,
) -> None:
    """In SQL_ASCII, PostgreSQL counts a name's bytes as its characters: the channel cut
    to 63 of them ended inside a UTF-8 letter, and reading it back (every open) failed
    with 'invalid byte sequence for encoding "UTF8"'. Such a name gets the md5 channel."""
    schema = "é" * 30  # 60 bytes: 'asyncjobs:' and it are 70
    admin = await asyncpg.connect(sql_ascii_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await admin.close()
    url = with_search_path(sql_ascii_url, schema)
    workers = Jobs(url, clock=FakeClock(), poll_interval=600)  # claims only when woken
    web = Jobs(url, workers=False)

    @workers.task(name="ping")
    async def ping(n: int) -> int:
        return n + 1

    try:
        async with workers:
            job = await web.enqueue("ping", 41)
            with anyio.fail_after(10):
                assert await job.result() == 42
    finally:
        await web.close()
