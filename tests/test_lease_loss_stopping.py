"""A job stopped because its lease could not be renewed (heartbeats failing), while it
stops: this process's own lease recovery, a cancel by the user, and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from test_lease_loss import LEASE, failing, settle

from asyncjobs import Jobs
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


def cleaning_task(jobs: Jobs) -> tuple[anyio.Event, anyio.Event, anyio.Event]:
    """Task "t": runs until stopped, then cleans up (a rollback, say) until ``cleaned``.
    Returns the events started, cleaning and cleaned."""
    started, cleaning, cleaned = anyio.Event(), anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        try:
            await anyio.Event().wait()  # ends only when stopped
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()
            raise

    return started, cleaning, cleaned


async def test_lease_recovery_here_does_not_requeue_a_job_whose_cleanup_still_runs(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop stalled past the lease, heartbeats failing: this process's lease
    recovery stops the attempt. Its cleanup runs: the job is not requeued meanwhile
    (another worker could start it at once), only once the cleanup is over."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started, cleaning, cleaned = cleaning_task(jobs)

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        requeued_while_cleaning: list[bool] = []
        store_recover = jobs.store.recover

        async def recover(**kwargs: Any) -> Any:
            requeued_while_cleaning.append(cleaning.is_set() and not cleaned.is_set())
            return await store_recover(**kwargs)

        monkeypatch.setattr(jobs.store, "recover", recover)
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE + 1)
            async with anyio.create_task_group() as recovering:
                recovering.start_soon(jobs.runner.recover)
                with anyio.fail_after(5):
                    await cleaning.wait()
                await settle(jobs)
                row = await jobs.store.get(job.id)
                assert row is not None
                assert (row.status, row.attempts) == ("running", 1)
                cleaned.set()
            assert True not in requeued_while_cleaning
            assert requeued_while_cleaning  # it did recover, once the cleanup was over


async def test_lease_recovery_here_waits_for_a_stopping_job_half_a_beat_at_most(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Guard: a job that ignores its stop holds up the recovery half a heartbeat
    interval, not for good (other workers' jobs wait on it)."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started, cleaning, cleaned = cleaning_task(jobs)

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE + 1)
            with anyio.fail_after(5):  # the recovery ends, the cleanup still running
                async with anyio.create_task_group() as recovering:
                    recovering.start_soon(jobs.runner.recover)
                    await cleaning.wait()
                    await settle(jobs)
                    clock.advance(LEASE / 6)
            assert not cleaned.is_set()
            row = await jobs.store.get(job.id)
            assert row is not None
            assert (row.status, row.attempts) != ("running", 1)  # requeued (and run again)
            cleaned.set()
