"""Shared fixtures: a real SQLite file per test, a fake clock, and Jobs factories."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncjobs import Jobs
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "jobs.db")


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
