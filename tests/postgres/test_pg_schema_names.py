"""The PostgreSQL store in schemas with any valid name: its NOTIFY channel must stay
within PostgreSQL's 63 bytes, and the listeners must listen where the insert trigger
notifies."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import anyio
import asyncpg
import pytest
from conftest import in_schema

from asyncjobs import Jobs
from asyncjobs.stores._postgres_sql import channel

NAMES = {
    "ascii": "jobs_{}",
    "ascii-63-bytes": "j_{}_" + "x" * 54,  # as long as a name can be: cut as before
    "cyrillic-58-bytes": "задачи_{}_очередь_заданий_прил",  # 34 characters, 58 bytes
}

HAS_JOBS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables "
    "WHERE schemaname = $1 AND tablename = 'asyncjobs_jobs')"
)
HAS_SCHEMA = "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)"


@pytest.fixture(params=list(NAMES), ids=list(NAMES))
async def schema_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    schema = NAMES[request.param].format(uuid.uuid4().hex[:6])
    assert len(schema.encode()) <= 63  # a valid name
    async with in_schema(schema) as url:
        yield url


async def test_an_enqueue_notifies_the_channel_that_workers_listen_on(schema_url: str) -> None:
    jobs = Jobs(schema_url, workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    heard = anyio.Event()
    listener = await asyncpg.connect(schema_url.split("?")[0])
    try:
        await jobs.store.open()
        conn = await asyncpg.connect(schema_url)
        try:
            on = await channel(conn)  # what the store's listener listens on
        finally:
            await conn.close()
        assert len(on.encode()) <= 63
        await listener.add_listener(on, lambda *args: heard.set())
        job = await jobs.enqueue(t)  # the insert trigger notifies
        assert await jobs.get(job.id) is not None
        with anyio.fail_after(5):
            await heard.wait()
    finally:
        await listener.close()
        await jobs.close()


async def test_the_tables_go_to_the_first_schema_of_the_search_path_that_exists(
    postgres_url: str,
) -> None:
    """As PostgreSQL creates any table (current_schema()): a schema named first that does
    not exist is passed over, not refused, so the README says to create it first."""
    schema = parse_qs(urlsplit(postgres_url).query)["search_path"][0]
    missing = f"missing_{uuid.uuid4().hex[:8]}"
    jobs = Jobs(postgres_url.replace(schema, f"{missing},{schema}"), workers=False)
    try:
        await jobs.store.open()
    finally:
        await jobs.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval(HAS_JOBS, schema)
        assert not await conn.fetchval(HAS_SCHEMA, missing)  # not created either
    finally:
        await conn.close()
