"""pytest plugin (entry point ``asyncjobs``): fixtures for testing code that uses asyncjobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asyncjobs._jobs import Jobs
from asyncjobs.testing._clock import FakeClock


@pytest.fixture
def asyncjobs_clock() -> FakeClock:
    """A fake clock starting at the real current time."""
    return FakeClock()


@pytest.fixture
async def jobs(tmp_path: Path, asyncjobs_clock: FakeClock) -> AsyncIterator[Jobs]:
    """A ``Jobs`` on a temporary SQLite file with a fake clock, workers not started."""
    instance = Jobs("sqlite:///" + str(tmp_path / "asyncjobs-test.db"), clock=asyncjobs_clock)
    try:
        yield instance
    finally:
        await instance.close()
