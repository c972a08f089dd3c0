"""Schema versions on every store: a store whose schema a newer asyncjobs migrated
past the versions this one ships is refused when opened, not used as if it were
current."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from asyncjobs import Jobs
from asyncjobs._errors import StoreError
from asyncjobs.stores import NewJob, SQLiteStore, open_store
from asyncjobs.stores._migrations import migration_scripts

T0 = 1_000_000.0


def new(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args": [], "kwargs": {}}',
        status="queued", priority=0, run_at=T0, max_attempts=3,
    )  # fmt: skip


async def versions(url: str) -> list[int]:
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            found = [v for (v,) in db.execute("SELECT version FROM asyncjobs_migrations")]
        db.close()
        return sorted(found)
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return sorted(
            r["version"] for r in await conn.fetch("SELECT version FROM asyncjobs_migrations")
        )
    finally:
        await conn.close()


async def record_version(url: str, version: int) -> None:
    """What a newer asyncjobs leaves behind: a migration this one does not know."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("INSERT INTO asyncjobs_migrations VALUES (?, 0)", (version,))
        db.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO asyncjobs_migrations VALUES ($1, 0)", version)
    finally:
        await conn.close()


async def test_a_schema_newer_than_this_version_is_refused(backend_url: str) -> None:
    backend = "sqlite" if backend_url.startswith("sqlite:") else "postgres"
    latest = migration_scripts(backend)[-1][0]
    store = open_store(backend_url)
    await store.insert([new("a")], now=T0)
    await store.close()
    await record_version(backend_url, latest + 1)

    newer = open_store(backend_url)
    try:
        with pytest.raises(
            StoreError, match=rf"schema version {latest + 1}, newer than .*{latest}"
        ):
            await newer.open()
        with pytest.raises(StoreError, match="newer"):
            await newer.get("a")  # a first use that opens it: refused the same way
    finally:
        await newer.close()
    assert await versions(backend_url) == [v for v, _ in migration_scripts(backend)] + [latest + 1]


async def test_transactional_enqueue_refuses_a_newer_sqlite_file(tmp_path: Path) -> None:
    """The caller holds the write lock, so the schema is checked through its connection."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    latest = migration_scripts("sqlite")[-1][0]
    await record_version("sqlite:///" + str(path), latest + 1)
    jobs = Jobs(str(path), workers=False)
    try:
        async with aiosqlite.connect(path, isolation_level=None) as conn:
            await conn.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="newer"):
                async with jobs.transaction(conn):
                    await jobs.enqueue("t")
            await conn.execute("ROLLBACK")
    finally:
        await jobs.close()
