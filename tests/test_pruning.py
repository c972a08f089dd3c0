"""Retention: finished jobs are pruned after ``retention``, dead ones after ``dead_retention``."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from asyncjobs import Jobs, JobStatus
from asyncjobs._retention import prune_expired
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

HOUR = 3600.0


async def finished_mix(jobs: Jobs) -> dict[str, str]:
    """One job in each status that matters here; returns their ids by status."""

    @jobs.task(name="ok")
    async def ok() -> None: ...

    @jobs.task(name="boom", retries=0)
    async def boom() -> None:
        raise RuntimeError("boom")

    succeeded = await jobs.enqueue(ok.options(idempotency_key="once"))
    dead = await jobs.enqueue(boom)
    cancelled = await jobs.enqueue(ok.options(delay=10))
    await cancelled.cancel()
    await drain(jobs)
    scheduled = await jobs.enqueue(ok.options(delay=100 * HOUR))
    ids = {"succeeded": succeeded.id, "dead": dead.id, "cancelled": cancelled.id}
    for status, job_id in ids.items():
        assert (await jobs.get(job_id)) is not None, status
    return ids | {"scheduled": scheduled.id}


async def statuses(jobs: Jobs) -> set[str]:
    return {info.status.value for info in await jobs.list()}


async def test_finished_jobs_are_pruned_after_retention_dead_ones_later(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR, dead_retention=5 * HOUR)
    await finished_mix(jobs)
    clock.advance(HOUR - 1)
    assert await prune_expired(jobs) == 0
    clock.advance(2)
    assert await prune_expired(jobs) == 2  # succeeded and cancelled
    assert await statuses(jobs) == {"dead", "scheduled"}
    clock.advance(4 * HOUR)
    assert await prune_expired(jobs) == 1
    assert await statuses(jobs) == {"scheduled"}  # unfinished jobs are never pruned


async def test_a_pruned_idempotency_key_can_be_used_again(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR)
    ids = await finished_mix(jobs)
    task = jobs.registry["ok"]
    kept = await jobs.enqueue(task.options(idempotency_key="once"))
    assert kept.id == ids["succeeded"]  # still kept: enqueue returns the existing job
    clock.advance(HOUR + 1)
    await prune_expired(jobs)
    fresh = await jobs.enqueue(task.options(idempotency_key="once"))
    assert fresh.id != ids["succeeded"]


async def test_pruning_deletes_in_bounded_batches(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(retention=HOUR)

    @jobs.task
    async def ok() -> None: ...

    for _ in range(7):
        await jobs.enqueue(ok)
    await drain(jobs)
    clock.advance(HOUR + 1)
    assert await prune_expired(jobs, batch=2, max_batches=3) == 6
    assert len(await jobs.list()) == 1
    assert await prune_expired(jobs, batch=2, max_batches=3) == 1
    assert await jobs.list() == []


async def test_the_maintenance_loop_prunes_while_workers_run(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR, visibility_timeout=60)

    @jobs.task
    async def ok() -> int:
        return 1

    async with jobs:
        job = await jobs.enqueue(ok)
        assert await job.result(timeout=5) == 1
        assert (await job.info()).status == JobStatus.SUCCEEDED
        # The maintenance loop's first round done (else a prune under way reads the
        # time before the clock moves and its next round is an hour later): asleep.
        asleep_until = clock.now() + 30  # visibility_timeout / 2
        with anyio.fail_after(5):
            while not any(entry[0] == asleep_until for entry in clock._sleepers):
                await anyio.lowlevel.checkpoint()
        clock.advance(HOUR + 61)  # past retention, and the loop's next pruning round
        with anyio.fail_after(5):
            while await jobs.get(job.id) is not None:
                await anyio.lowlevel.checkpoint()
