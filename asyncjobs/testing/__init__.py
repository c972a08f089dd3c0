"""Testing helpers for users of asyncjobs: a fake clock and ``drain``."""

from __future__ import annotations

from asyncjobs._jobs import Jobs
from asyncjobs.testing._clock import FakeClock

__all__ = ["FakeClock", "drain"]


async def drain(jobs: Jobs) -> None:
    """Run every ready job (and what they release) until none is ready or running.

    Time does not move: jobs delayed or backing off stay scheduled until the test
    calls ``jobs.clock.advance(...)`` and drains again.
    """
    await jobs.drain()
