"""Shared fixtures: a real SQLite file per test, a fake clock, and Jobs factories.

Backend-parametrised fixtures: ``backend_url`` and ``store`` run a test on SQLite
and on PostgreSQL (a fresh schema per test, dropped after). PostgreSQL tests skip
unless ``$ASYNCJOBS_TEST_POSTGRES_DSN`` names a server (``.ci/run`` sets it). A
module can run ``make_jobs``/``jobs`` on both backends by overriding ``db_url``:
``@pytest.fixture def db_url(backend_url: str) -> str: return backend_url``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from asyncjobs import Jobs
from asyncjobs.stores import Store, open_store
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]


@pytest.fixture(scope="session", autouse=True)
def compiled_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' subprocesses (the CLI, uvicorn, crash workers) compile the modules they
    import once a run, into a cache apart from the source tree: where the machine sets
    PYTHONDONTWRITEBYTECODE (CI's does), each of them compiled every module again at its
    start, about 0.2 s for asyncjobs alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "jobs.db")


POSTGRES_DSN_ENV = "ASYNCJOBS_TEST_POSTGRES_DSN"


def postgres_dsn() -> str:
    """The test server's DSN, or skip the test saying how to configure one."""
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(
            f"PostgreSQL tests need a server: set {POSTGRES_DSN_ENV}="
            "postgresql://user@host:5432/db (.ci/run sets it)"
        )
    return dsn


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with its connections' search_path set to ``schema`` (asyncpg query param)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Steps:
    """SQLite VM steps counted (``counting_steps``)."""

    count = 0


@contextlib.contextmanager
def counting_steps(db: sqlite3.Connection) -> Iterator[Steps]:
    """Count the SQLite VM steps ``db`` takes inside the block: the work of its
    statements, counted rather than timed."""
    steps = Steps()

    def step() -> int:
        steps.count += 1
        return 0

    db.set_progress_handler(step, 1)
    try:
        yield steps
    finally:
        db.set_progress_handler(None, 1)


@contextlib.asynccontextmanager
async def new_database(label: str, options: str = "") -> AsyncIterator[str]:
    """The DSN of a new database on the test server (``CREATE DATABASE`` ``options``,
    e.g. an encoding), dropped after; skips where the role may not create one."""
    import asyncpg

    dsn = postgres_dsn()
    name = f"asyncjobs_test_{label}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        try:
            await admin.execute(f'CREATE DATABASE "{name}" {options}')
        except asyncpg.InsufficientPrivilegeError:
            pytest.skip("the test server's role may not CREATE DATABASE")
        try:
            yield urlunsplit(urlsplit(dsn)._replace(path="/" + name))
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def in_schema(schema: str) -> AsyncIterator[str]:
    """The test server's URL with its connections in a new ``schema``, dropped after."""
    import asyncpg

    dsn = postgres_dsn()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield with_search_path(dsn, schema)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A PostgreSQL URL whose connections use a fresh schema, dropped after the test.

    Each test gets its own schema, so tests (and helpers running tests at the same
    time on the same server) never see each other's jobs.
    """
    async with in_schema(f"asyncjobs_test_{uuid.uuid4().hex[:16]}") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on each backend: a SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "backend.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[Store]:
    """An opened store on each backend (``store[sqlite]``, ``store[postgres]``), closed after."""
    opened = open_store(backend_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_jobs(db_url: str, clock: FakeClock) -> AsyncIterator[MakeJobs]:
    """Build ``Jobs`` on this test's SQLite file and fake clock; all are closed after."""
    made: list[Jobs] = []

    def make(url: str | None = None, **kwargs: Any) -> Jobs:
        kwargs.setdefault("clock", clock)
        jobs = Jobs(url or db_url, **kwargs)
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        await jobs.close()


@pytest.fixture
async def jobs(make_jobs: MakeJobs) -> Jobs:
    return make_jobs()
