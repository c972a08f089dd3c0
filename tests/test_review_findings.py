"""Findings of a review of the workers' ready state (``_workers_ready``, ``_join_start``),
recorded as tests that fail on the current code (``xfail(strict=True)``) until fixed.

A ``start()`` that joins workers another start() began (``_join_start``, two lifespans
entering at once) shares them with it, but the cancellation of that first start()
stops them all the same, under the start() that joined them."""

from __future__ import annotations

import anyio
import pytest
from test_start_bound import STOPPED_BY, MakeJobs
from test_start_races import a_recovery_held
from test_start_ready import as_the_workers_get_ready

from asyncjobs import AsyncJobsError


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


async def checkpoints(n: int = 50) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


@pytest.mark.xfail(
    strict=True,
    reason="a cancelled start() stops (or drains) the workers, also those a second "
    "start() joined: that one fails saying stop()/close() cut it short, or returned "
    "success for workers that then stop",
)
@pytest.mark.parametrize("when", ["while they start", "once they are ready"])
async def test_a_cancelled_start_leaves_the_workers_a_second_start_joined(
    make_jobs: MakeJobs, when: str
) -> None:
    """Two starts at once (two lifespans entering), the first one cancelled (its app's
    startup cancelled, an ``asyncio.wait_for`` around it timing out): its ``_unstart``
    stopped the workers that the second, not cancelled, waits on or has returned for.
    While they start the second failed with "cut short by stop() or close()", neither
    called; once they were ready it returned success, then the first's cancellation
    drained them and closed the store. The second start() should get running workers."""
    jobs = make_jobs()
    waiting, gate = a_recovery_held(jobs)
    first = anyio.CancelScope()
    second: list[str] = []

    async def start_first() -> None:
        with first:
            await jobs.start()

    async def start_second() -> None:
        try:
            await jobs.start()
        except AsyncJobsError as error:
            second.append(f"failed: {error}")
        else:
            second.append("returned")

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start_first)
            await waiting.wait()
            tg.start_soon(start_second)
            await checkpoints()
            if when == "while they start":
                first.cancel()
                await checkpoints()
                gate.set()
            else:
                with as_the_workers_get_ready(first.cancel):
                    gate.set()
                    while not first.cancel_called or not second:
                        await anyio.lowlevel.checkpoint()
    assert first.cancelled_caught
    assert second == ["returned"]
    assert jobs.started
