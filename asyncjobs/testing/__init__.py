"""Testing helpers for users of asyncjobs: a fake clock, ``drain``, assertions, store swap."""

from __future__ import annotations

from asyncjobs._jobs import Jobs
from asyncjobs.testing._assertions import assert_enqueued, assert_not_enqueued, enqueued
from asyncjobs.testing._clock import FakeClock
from asyncjobs.testing._isolation import replace_store

__all__ = [
    "FakeClock",
    "assert_enqueued",
    "assert_not_enqueued",
    "drain",
    "enqueued",
    "replace_store",
]


async def drain(jobs: Jobs, *, max_jobs: int = 10_000) -> None:
    """Run every ready job (and what they release) until none is ready or running.

    Time does not move: jobs delayed or backing off stay scheduled until the test
    calls ``jobs.clock.advance(...)`` and drains again. Past ``max_jobs`` started
    attempts it raises ``AsyncJobsError``: jobs that enqueue one another without end
    (a task that enqueues itself at once) would otherwise hang the test.
    """
    await jobs.drain(max_jobs=max_jobs)
