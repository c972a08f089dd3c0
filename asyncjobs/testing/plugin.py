"""pytest plugin (entry point ``asyncjobs``, loaded automatically): fixtures for users.

- ``asyncjobs_clock``: a ``FakeClock`` (time moves only on ``advance``).
- ``asyncjobs_url``: a SQLite URL in the test's ``tmp_path``.
- ``jobs``: a fresh ``Jobs`` on that store and clock, workers not started, closed
  after the test. Define tasks on it in the test, or override the fixture.
- ``asyncjobs_isolate``: ``await asyncjobs_isolate(myapp.jobs)`` points the app's
  own ``Jobs`` (with its registered tasks) at the temporary store and fake clock
  for one test, and restores it after. The usual ``conftest.py``::

      @pytest.fixture
      async def jobs(asyncjobs_isolate):
          return await asyncjobs_isolate(myapp.jobs)

Async fixtures use pytest-asyncio when it is installed (any mode).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from asyncjobs._jobs import Jobs
from asyncjobs.testing._clock import FakeClock
from asyncjobs.testing._isolation import replace_store

F = TypeVar("F", bound=Callable[..., Any])


def async_fixture(fn: F) -> F:
    """``pytest_asyncio.fixture`` when installed (works in strict and auto mode)."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - anyio's plugin or another runner handles them
        return cast(F, pytest.fixture(fn))
    return cast(F, pytest_asyncio.fixture(fn))


Isolate = Callable[[Jobs], Awaitable[Jobs]]


@pytest.fixture
def asyncjobs_clock() -> FakeClock:
    """A fake clock starting at the real current time."""
    return FakeClock()


@pytest.fixture
def asyncjobs_url(tmp_path: Path) -> str:
    """A SQLite store URL in this test's temporary directory."""
    return "sqlite:///" + str(tmp_path / "asyncjobs-test.db")


@async_fixture
async def jobs(asyncjobs_url: str, asyncjobs_clock: FakeClock) -> AsyncIterator[Jobs]:
    """A ``Jobs`` on a temporary SQLite file with a fake clock, workers not started."""
    instance = Jobs(asyncjobs_url, clock=asyncjobs_clock)
    try:
        yield instance
    finally:
        await instance.close()


@async_fixture
async def asyncjobs_isolate(
    asyncjobs_url: str, asyncjobs_clock: FakeClock
) -> AsyncIterator[Isolate]:
    """Run the app's own ``Jobs`` on this test's temporary store and fake clock."""
    async with AsyncExitStack() as stack:

        async def isolate(app_jobs: Jobs) -> Jobs:
            return await stack.enter_async_context(
                replace_store(app_jobs, asyncjobs_url, clock=asyncjobs_clock)
            )

        yield isolate
