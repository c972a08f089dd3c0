"""A job's life: statuses, attempts counted at claim, leases and heartbeats, recovery of
expired leases, and graceful stop that gives unfinished jobs back."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncjobs._outbox
import asyncjobs._queries
from asyncjobs import (
    AsyncJobsError,
    ConfigurationError,
    Job,
    JobFailed,
    JobInfo,
    Jobs,
    JobStatus,
    Retry,
    StoreError,
    current_job,
)
from asyncjobs.stores import ClaimRequest, JobRow, SQLiteStore, TaskLimits
from asyncjobs.testing import FakeClock, drain, replace_store

MakeJobs = Callable[..., Jobs]


async def until(check: Callable[[], object], clock: FakeClock | None = None) -> None:
    """Yield to the loop (optionally moving fake time 1 s per turn) until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            if clock is not None:
                clock.advance(1)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()


async def claim_as_dead_worker(jobs: Jobs, task: str, *, lease: float, max_attempts: int) -> None:
    """Claim one job as a worker that then vanishes (its process was killed)."""
    rows = await jobs.store.claim(
        ClaimRequest(
            worker="ghost:1:dead",
            tasks={task: TaskLimits(max_attempts=max_attempts)},
            queues=None,
            limit=1,
            lease=lease,
        ),
        now=jobs.clock.now(),
    )
    assert len(rows) == 1


# -- statuses ------------------------------------------------------------------------


async def test_a_job_goes_scheduled_queued_running_succeeded(jobs: Jobs, clock: FakeClock) -> None:
    seen: list[tuple[str, int]] = []

    @jobs.task
    async def work(x: int) -> int:
        info = await jobs.get(current_job().id)
        assert info is not None
        seen.append((info.status, info.attempts))
        return x * 2

    job = await work.options(delay=10).enqueue(21)
    info = await job.info()
    assert (info.status, info.attempts, info.started_at, info.finished_at) == (
        "scheduled", 0, None, None,
    )  # fmt: skip
    clock.advance(10)
    assert (await job.info()).status == JobStatus.QUEUED
    await drain(jobs)
    assert seen == [("running", 1)]  # attempts are counted at claim
    info = await job.info()
    assert (info.status, info.result, info.error, info.attempts) == ("succeeded", 42, None, 1)
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.enqueued_at <= info.started_at <= info.finished_at
    assert await job.result(timeout=1) == 42


async def test_result_raises_job_failed_for_a_dead_job(jobs: Jobs) -> None:
    @jobs.task(retries=0)
    async def bad() -> None:
        raise ValueError("no such user")

    job = await bad.enqueue()
    await drain(jobs)
    with pytest.raises(JobFailed, match="ended dead: ValueError: no such user") as caught:
        await job.result(timeout=1)
    assert (caught.value.job_id, caught.value.status) == (job.id, "dead")


async def test_result_with_timeout_zero_reads_the_job_once(jobs: Jobs) -> None:
    @jobs.task
    async def answer() -> int:
        return 42

    job = await answer.enqueue()
    with pytest.raises(TimeoutError):
        await job.result(timeout=0)  # not run yet
    await drain(jobs)
    assert await job.result(timeout=0) == 42


async def test_result_takes_its_timeout_as_a_timedelta(jobs: Jobs) -> None:
    """Durations are seconds or a timedelta everywhere, a wait's timeout too."""

    @jobs.task
    async def answer() -> int:
        return 42

    job = await answer.enqueue()
    with pytest.raises(TimeoutError):
        await job.result(timeout=timedelta(0))  # not run yet: read once
    chain = await jobs.chain(answer.spec(), answer.spec())
    await drain(jobs)
    assert await job.result(timeout=timedelta(seconds=5)) == 42
    assert await chain.result(timeout=timedelta(seconds=5)) == 42


async def test_waiting_for_results_leaves_nothing_behind(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(poll_interval=0.01)

    @jobs.task
    async def answer(n: int) -> int:
        return n

    done = [await answer.enqueue(n) for n in range(3)]
    await jobs.start()
    for job in done:  # a status endpoint polled by clients reads finished jobs over and over
        for _ in range(5):
            assert await job.result(timeout=5) == done.index(job)
    assert jobs._result_events == {}
    # Two waiters on a job that finishes while they wait, and one that gives up.
    await jobs.stop()
    late, waiting = await answer.enqueue(99), await answer.enqueue(7)
    results: list[int] = []

    async def wait() -> None:
        results.append(await waiting.result(timeout=5))

    with pytest.raises(TimeoutError):
        await late.result(timeout=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        tg.start_soon(wait)
        await until(lambda: len(jobs._result_events.get(waiting.id, [])) == 2)
        await jobs.start()
    assert results == [7, 7]
    assert jobs._result_events == {}
    await jobs.stop()


@pytest.mark.parametrize("admin", ["cancel", "cancel the chain", "discard", "purge"])
async def test_an_admin_call_wakes_the_result_waiters_of_the_jobs_it_ends(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, admin: str
) -> None:
    """A job cancelled, discarded or purged in this process: its waiters hear of it at
    once, as of a job that ends here, not at their next read (the clock never moves,
    and the waiters never read again on their own)."""
    monkeypatch.setattr(asyncjobs._queries, "_FIRST_POLL", math.inf)

    @jobs.task
    async def t() -> None:
        pass

    chain = await jobs.chain(t.spec(), t.spec())
    first, last = chain.jobs
    waited = last if admin == "cancel the chain" else first
    caught: list[BaseException] = []
    reads: list[JobInfo | None] = []
    get = jobs.get

    async def read(job_id: str) -> JobInfo | None:
        reads.append(await get(job_id))
        return reads[-1]  # the waiter goes on to wait, before the test goes on

    monkeypatch.setattr(jobs, "get", read)

    async def wait() -> None:
        try:
            await waited.result()
        except AsyncJobsError as error:
            caught.append(error)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await until(lambda: reads)  # it read the job, unfinished, and waits
            if admin in ("cancel", "cancel the chain"):
                assert await jobs.cancel(first.id)
            elif admin == "discard":
                assert await jobs.discard(first.id)
            else:
                assert await jobs.purge(status="queued") == 1
    (error,) = caught
    if admin == "discard" or admin == "purge":
        assert not isinstance(error, JobFailed)
        assert str(error) == f"job {waited.id} does not exist (or was purged)"
    else:
        assert isinstance(error, JobFailed)
        assert (error.job_id, error.status) == (waited.id, "cancelled")
    assert jobs._result_events == {}


async def test_list_filters_by_status_and_returns_newest_first(
    jobs: Jobs, clock: FakeClock
) -> None:
    @jobs.task
    async def t(i: int) -> None:
        if i == 1:
            raise RuntimeError("x")

    made = [await t.enqueue(i) for i in range(3)]
    later = await t.options(delay=60).enqueue(9)
    await drain(jobs)
    assert [i.id for i in await jobs.list()] == [later.id, *(j.id for j in reversed(made))]
    assert [i.id for i in await jobs.list(status="scheduled")] == [later.id, made[1].id]
    assert [i.id for i in await jobs.list(status="succeeded")] == [made[2].id, made[0].id]
    assert await jobs.list(status="queued") == []
    assert len(await jobs.list(limit=2)) == 2


async def test_purge_deletes_by_status(jobs: Jobs) -> None:
    @jobs.task(retries=0)
    async def t(fail: bool) -> None:
        if fail:
            raise RuntimeError("x")

    await t.enqueue(True)
    ok = await t.enqueue(False)
    await drain(jobs)
    assert await jobs.purge(status="dead") == 1
    assert [i.id for i in await jobs.list()] == [ok.id]
    with pytest.raises(ValueError, match="needs a status"):
        await jobs.purge()


@pytest.mark.parametrize("status", ["waiting", "scheduled", "queued"])
async def test_purge_refuses_older_than_with_a_status_that_has_not_finished(
    jobs: Jobs, status: str
) -> None:
    """``older_than`` counts from when a job finished: with a status whose jobs have
    not finished it matched none, and purged 0 as if there were none to purge."""
    await jobs.enqueue("t")
    with pytest.raises(ValueError, match=f"{status} jobs have not finished"):
        await jobs.purge(status=status, older_than=0)
    assert len(await jobs.list()) == 1


# -- leases --------------------------------------------------------------------------


async def test_heartbeat_extends_the_lease(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(visibility_timeout=30)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task
    async def slow() -> None:
        started.set()
        await release.wait()

    job = await slow.enqueue()

    async def beat() -> None:
        row = await jobs.store.get(job.id)
        assert row is not None
        assert row.lease_until == pytest.approx(clock.now() + 30)
        clock.advance(20)
        await jobs.runner.heartbeat_once()
        row = await jobs.store.get(job.id)
        assert row is not None
        assert row.lease_until == pytest.approx(clock.now() + 30)
        release.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            await beat()
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)


async def test_a_long_job_keeps_its_lease_over_many_visibility_timeouts(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """With workers started, the heartbeat loop renews the lease; recovery never takes it."""
    jobs = make_jobs(visibility_timeout=30)
    started, release = anyio.Event(), anyio.Event()
    runs: list[int] = []

    @jobs.task
    async def slow() -> str:
        runs.append(1)
        started.set()
        await release.wait()
        return "done"

    async with jobs:
        job = await slow.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        first = await jobs.store.get(job.id)
        assert first is not None
        assert first.lease_until is not None
        row = first
        store = jobs.store
        assert isinstance(store, SQLiteStore)
        for _ in range(200):  # 200 s of fake time, over six visibility timeouts
            clock.advance(1)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            # Reads do not queue behind the store's writes: let the heartbeat's write
            # land first, else the fake clock runs ahead of it.
            await store._call(lambda db: None)
            got = await store.get(job.id)
            assert got is not None
            row = got
            assert (row.status, row.attempts, row.worker) == ("running", 1, jobs.runner.worker_id)
        assert row.lease_until is not None
        assert row.lease_until > first.lease_until + 150
        release.set()
        assert await job.result(timeout=5) == "done"
    assert runs == [1]


async def test_a_job_running_through_a_stall_of_the_event_loop_is_not_run_again(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The loop stalls past the lease (a blocking call, a suspended machine) and lease
    recovery wakes before the heartbeat: it must not requeue the job still running
    here, which would be stopped and run again, an attempt spent, with no crash."""
    jobs = make_jobs(visibility_timeout=30, poll_interval=3600)
    started, release = anyio.Event(), anyio.Event()
    runs: list[int] = []

    @jobs.task(name="t")
    async def t() -> str:
        runs.append(current_job().attempt)
        started.set()
        await release.wait()
        return "done"

    store = jobs.store
    assert isinstance(store, SQLiteStore)

    async def settle() -> None:
        """Let the woken loops run, and their writes land (real time, the store's thread)."""
        for _ in range(3):
            for _ in range(30):
                await anyio.lowlevel.checkpoint()
            await store._call(lambda db: None)

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        await settle()
        # Heartbeat due in 10 s, lease recovery in 15 s: after 12 s, recovery is due
        # first (in 3 s, the heartbeat in 8 s: every 10 s from the first), and the lease
        # ends 30 s after that beat.
        clock.advance(12)
        await settle()
        due = sorted(entry[0] - clock.now() for entry in clock._sleepers)
        assert due[:2] == [3, 8]
        clock.advance(40)  # the loop stalled 40 s: both are due, recovery first
        await settle()
        info = await job.info()
        assert (info.status, info.attempts) == ("running", 1)
        release.set()
        assert await job.result(timeout=5) == "done"
    assert runs == [1]
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)


async def test_a_job_that_ends_while_a_heartbeat_asks_about_it_is_not_reported_lost(
    make_jobs: MakeJobs,
    backend_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat asks about a running job; before its update runs, the job succeeds
    and its outcome is written. The store leaves the job out, as it should, but nothing
    took it away: no warning that it is no longer ours."""
    jobs = make_jobs(backend_url)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await release.wait()

    job = await t.enqueue()
    store_heartbeat = jobs.store.heartbeat

    async def late_heartbeat(job_ids: Sequence[str], **kwargs: Any) -> set[str]:
        release.set()  # the job ends, and its outcome is written before the update
        while (await job.info()).status != "succeeded":
            await anyio.lowlevel.checkpoint()
        return await store_heartbeat(job_ids, **kwargs)

    monkeypatch.setattr(jobs.store, "heartbeat", late_heartbeat)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            await jobs.runner.heartbeat_once()
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)
    assert "no longer ours" not in caplog.text


async def test_a_running_job_cancelled_from_another_process_is_reported_lost_and_stopped(
    make_jobs: MakeJobs, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = make_jobs(backend_url)
    other = make_jobs(backend_url, workers=False)
    started = anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await anyio.Event().wait()  # ends only when stopped

    job = await t.enqueue()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            assert await other.cancel(job.id)
            await jobs.runner.heartbeat_once()
    assert (await job.info()).status == "cancelled"
    lost = f"job {job.id} is no longer ours (cancelled, or lease expired); stopping it"
    (record,) = [r for r in caplog.records if r.getMessage() == lost]
    assert record.levelname == "WARNING"
    assert (record.job_id, record.task, record.attempt) == (job.id, "t", 1)  # type: ignore[attr-defined]


async def test_a_job_cancelled_from_another_process_is_cancelled_once_so_its_cleanup_ends(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Its cleanup (a finally that awaits) outlasts a heartbeat: the heartbeats that find
    it still running, asked to stop, must not cancel it again and cut the cleanup
    short, as asyncjobs' own cancel, a timeout and shutdown cancel a job once."""
    jobs = make_jobs(backend_url)
    other = make_jobs(backend_url, workers=False)
    started, cleaning, may_finish = anyio.Event(), anyio.Event(), anyio.Event()
    cleaned: list[bool] = []

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        try:
            await anyio.Event().wait()  # ends only when stopped
        finally:
            cleaning.set()
            await may_finish.wait()  # closing a connection, rolling back...
            cleaned.append(True)

    job = await t.enqueue()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            assert await other.cancel(job.id)
            await jobs.runner.heartbeat_once()
            await cleaning.wait()
            await jobs.runner.heartbeat_once()  # still stopping: its cleanup goes on
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            may_finish.set()
    assert cleaned == [True]
    assert (await job.info()).status == "cancelled"


async def test_a_job_cancelled_from_another_process_is_reported_lost_once(
    make_jobs: MakeJobs, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While its cleanup runs, every heartbeat finds it asked to stop: only the first,
    which stops it, says so; the others do nothing, and say nothing. Cancelled here, in
    this process, it is being stopped already: no heartbeat says it is stopping it."""
    jobs = make_jobs(backend_url)
    other = make_jobs(backend_url, workers=False)
    events: dict[str, anyio.Event] = {}

    @jobs.task(name="t")
    async def t() -> None:
        events["started"].set()
        try:
            await anyio.Event().wait()  # ends only when stopped
        finally:
            events["cleaning"].set()
            await events["may_finish"].wait()

    async def stop_slowly(cancel: Callable[[str], Any]) -> str:
        events.update(started=anyio.Event(), cleaning=anyio.Event(), may_finish=anyio.Event())
        started, cleaning, may_finish = events["started"], events["cleaning"], events["may_finish"]
        job = await t.enqueue()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, jobs)
                await started.wait()
                assert await cancel(job.id)
                await jobs.runner.heartbeat_once()
                await cleaning.wait()
                await jobs.runner.heartbeat_once()  # still stopping
                await jobs.runner.heartbeat_once()
                may_finish.set()
        assert (await job.info()).status == "cancelled"
        return job.id

    def lost(job_id: str) -> list[logging.LogRecord]:
        message = f"job {job_id} is no longer ours (cancelled, or lease expired); stopping it"
        return [r for r in caplog.records if r.getMessage() == message]

    elsewhere = await stop_slowly(other.cancel)
    assert len(lost(elsewhere)) == 1
    here = await stop_slowly(jobs.cancel)
    assert lost(here) == []


async def test_an_expired_lease_is_recovered_when_workers_start(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs()

    @jobs.task(name="t")
    async def t() -> str:
        return f"attempt {current_job().attempt}"

    job = await t.enqueue()
    await claim_as_dead_worker(jobs, "t", lease=30, max_attempts=4)
    clock.advance(29)
    await drain(jobs)  # lease still valid: nobody else may run it
    assert (await job.info()).status == "running"
    clock.advance(2)
    async with jobs:
        assert await job.result(timeout=5) == "attempt 2"
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 2)


async def test_an_expired_lease_is_recovered_while_workers_run(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(visibility_timeout=30, poll_interval=3600)
    done: list[int] = []

    @jobs.task(name="t")
    async def t() -> None:
        done.append(current_job().attempt)

    async with jobs:
        job = await t.enqueue()
        # The first job runs normally. Once its outcome is written the runner idles (the
        # fake clock stands still), so it cannot claim the job inserted next first.
        await job.result(timeout=5)
        done.clear()
        other = await jobs.store.insert(
            [jobs._new_job(t.spec(), clock.now())], now=clock.now()
        )  # written behind the runner's back, then taken by a worker that dies
        await claim_as_dead_worker(jobs, "t", lease=30, max_attempts=4)
        # The maintenance loop's first pass goes through the store's thread (real time):
        # let it fall asleep on the fake clock (15 s: visibility_timeout / 2) first.
        maintenance_due = clock.now() + 15
        await until(lambda: any(entry[0] == maintenance_due for entry in clock._sleepers))
        clock.advance(31)  # past the lease and the maintenance interval; then time stops
        await until(lambda: done)  # recovered, and run at once (not at the next poll)
        assert done == [2]
        # The outcome is written with the runner's next round trip; result() waits for it.
        await Job(jobs, other[0]).result(timeout=5)
        info = await jobs.get(other[0])
        assert info is not None
        assert (info.status, info.attempts) == ("succeeded", 2)
    assert (await job.info()).status == "succeeded"


async def test_a_lease_that_expires_on_the_last_attempt_makes_the_job_dead(
    jobs: Jobs, clock: FakeClock
) -> None:
    runs: list[int] = []

    @jobs.task(name="t", retries=2)
    async def t() -> None:
        runs.append(1)

    job = await t.enqueue()
    for _ in range(3):  # three attempts, each lost with its worker
        await claim_as_dead_worker(jobs, "t", lease=10, max_attempts=3)
        clock.advance(11)
        await jobs.runner.recover()
    info = await job.info()
    assert (info.status, info.attempts, runs) == ("dead", 3, [])
    assert "lease expired" in (info.error or "")
    assert info.finished_at is not None
    await drain(jobs)
    assert runs == []  # not run again


async def run_and_lose_the_lease(
    jobs: Jobs, clock: FakeClock, job: Job[Any], started: anyio.Event, release: anyio.Event
) -> JobRow:
    """Run ``job`` (task "t") until it has ``started``; meanwhile its lease expires and a
    dead worker claims it again (attempt 2); then ``release`` the first attempt, let it
    end, and return the job's row, still the second attempt's."""

    async def lose_the_lease() -> None:
        clock.advance(61)
        await jobs.store.recover(now=clock.now())  # another process's maintenance loop
        await claim_as_dead_worker(jobs, "t", lease=60, max_attempts=4)
        release.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            await lose_the_lease()
    row = await jobs.store.get(job.id)
    assert row is not None
    assert (row.status, row.attempts, row.worker) == ("running", 2, "ghost:1:dead")
    return row


async def test_an_outcome_from_a_worker_that_lost_its_lease_is_ignored(
    jobs: Jobs, clock: FakeClock
) -> None:
    """At least once: the late worker's ack must not overwrite the new attempt's state."""
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        started.set()
        await release.wait()
        return "late"

    job = await t.enqueue()
    await run_and_lose_the_lease(jobs, clock, job, started, release)


async def test_progress_from_a_worker_that_lost_its_lease_is_ignored(
    jobs: Jobs, clock: FakeClock
) -> None:
    """The attempt that runs now shows its own progress, not a late one's."""
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await release.wait()
        await current_job().set_progress(0.9, "the late attempt")

    job = await t.enqueue()
    row = await run_and_lose_the_lease(jobs, clock, job, started, release)
    assert (row.progress, row.progress_message) == (None, None)


# -- graceful stop -------------------------------------------------------------------


async def test_stop_waits_for_running_jobs_and_stops_claiming(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(shutdown_timeout=10)
    started, release = anyio.Event(), anyio.Event()
    ran: list[int] = []

    @jobs.task(name="t")
    async def t(i: int) -> None:
        if i == 0:
            started.set()
            await release.wait()
        ran.append(i)

    await jobs.start()
    first = await t.enqueue(0)
    with anyio.fail_after(5):
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            await until(lambda: jobs._stop_requested.is_set())
            second = await t.enqueue(1)  # arrives during shutdown: not claimed
            for _ in range(50):
                await anyio.lowlevel.checkpoint()
            release.set()
    assert ran == [0]
    assert (await first.info()).status == "succeeded"
    info = await second.info()
    assert (info.status, info.attempts) == ("queued", 0)
    await jobs.close()


async def test_stop_called_by_a_job_returns_at_once_and_the_workers_stop_after_it(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """stop() waits for the running jobs: called by one of them, it waited for itself
    (the whole shutdown_timeout, then the caller was cut off and given back, to run
    again and stop the workers again). The clock never moves here: it must not wait."""
    jobs = make_jobs(shutdown_timeout=10)
    other_started, release_other, stop_returned = anyio.Event(), anyio.Event(), anyio.Event()

    @jobs.task(name="other")
    async def other() -> str:
        other_started.set()
        await release_other.wait()
        return "other done"

    @jobs.task(name="maintenance")
    async def maintenance() -> str:
        await jobs.stop()
        stop_returned.set()
        return "stopped them"

    await jobs.start()
    with anyio.fail_after(5):
        running = await other.enqueue()
        await other_started.wait()
        stopper = await maintenance.enqueue()
        await stop_returned.wait()
        late = await other.enqueue()  # the workers are stopping: not claimed
        release_other.set()
        await jobs.stop()  # from outside: waits for both jobs
    assert await stopper.result(timeout=0) == "stopped them"
    assert await running.result(timeout=0) == "other done"
    info = await late.info()
    assert (info.status, info.attempts) == ("queued", 0)
    assert not jobs.started
    await jobs.close()


async def test_a_jobs_entered_twice_runs_its_workers_until_the_last_exit(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A test fixture's ``async with jobs:`` around an app's ``jobs.lifespan`` (or two
    lifespans of one Jobs): the inner exit stopped the workers and closed the store
    under the outer one, which went on with no worker. Entries are counted now."""
    jobs = make_jobs()

    @jobs.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    with anyio.fail_after(5):
        async with jobs:
            async with jobs.lifespan() as state:
                assert state["jobs"] is jobs
                async with jobs:
                    assert jobs.started
                assert jobs.started
            assert jobs.started
            assert await (await double.enqueue(2)).result() == 4
        assert not jobs.started
        async with jobs:  # and it starts again
            assert await (await double.enqueue(3)).result() == 6
    assert not jobs.started


async def test_close_called_by_a_job_is_refused_and_the_workers_go_on(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """close() from a running job closed the store under the workers (stop() returns at
    once there), and that job's own outcome then opened it again behind close()'s back.
    It is refused now: a job may call stop(), and whoever started the workers closes."""
    jobs = make_jobs()

    @jobs.task(name="closer", retries=0)
    async def closer() -> str:
        try:
            await jobs.close()
        except AsyncJobsError as error:
            return str(error)
        return "closed"

    @jobs.task(name="after")
    async def after() -> str:
        return "ran"

    await jobs.start()
    with anyio.fail_after(5):
        refused = await (await closer.enqueue()).result()
        assert "close() from inside a running job" in refused
        assert "stop()" in refused
        assert jobs.started  # nothing was stopped nor closed
        assert await (await after.enqueue()).result() == "ran"


async def test_close_called_by_a_job_during_a_drain_is_refused(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs()
    refusals: list[str] = []

    @jobs.task(name="closer", retries=0)
    async def closer() -> None:
        with pytest.raises(AsyncJobsError, match=r"close\(\) from inside a running job") as e:
            await jobs.close()
        refusals.append(str(e.value))

    job = await closer.enqueue()
    await drain(jobs)
    assert len(refusals) == 1
    assert (await job.info()).status == "succeeded"


async def test_outcomes_are_written_as_jobs_end_while_stop_waits_for_others(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """While stop waits for a long job, a job that ends meanwhile is recorded at once.
    Written only at the end, it stayed running in the store: past its lease another
    process's recovery ran it again, as would a restart after a kill -9."""
    jobs = make_jobs(shutdown_timeout=600, concurrency=2)
    started: dict[int, anyio.Event] = {0: anyio.Event(), 1: anyio.Event()}
    go: dict[int, anyio.Event] = {0: anyio.Event(), 1: anyio.Event()}

    @jobs.task(name="t")
    async def t(i: int) -> None:
        started[i].set()
        await go[i].wait()

    await jobs.start()
    long, short = await t.enqueue(0), await t.enqueue(1)
    try:
        with anyio.fail_after(5):
            await started[0].wait()
            await started[1].wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(jobs.stop)
                await until(lambda: jobs._stop_requested.is_set())
                go[1].set()
                while (await short.info()).status != "succeeded":
                    await anyio.lowlevel.checkpoint()
                assert (await long.info()).status == "running"
                go[0].set()
    finally:
        go[0].set()  # a failure above must not leave stop() waiting for it forever
    assert (await long.info()).status == "succeeded"


def lock_the_file(jobs: Jobs) -> sqlite3.Connection:
    """Another process's write transaction on the store's file, holding its lock."""
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


async def a_job_under_way(jobs: Jobs) -> tuple[Job[str], list[int], anyio.Event]:
    """Start the workers on a job that ends once the event is set; its runs counted."""
    runs: list[int] = []
    started, go = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        runs.append(1)
        started.set()
        await go.wait()
        return "done"

    await jobs.start()
    job = await t.enqueue()
    with anyio.fail_after(5):
        await started.wait()
    return job, runs, go


async def test_stop_keeps_trying_the_last_outcome_while_another_process_holds_the_file(
    make_jobs: MakeJobs,
) -> None:
    """The job ends as stop begins, while another process writes for 3 s; each write
    gives up after five busy timeouts (0.5 s). Shutdown goes on trying the outcome for
    ``FINAL_WRITE_TIME`` (5 s) instead of dropping it after one failed write: the job
    is recorded as succeeded, not left to its lease to run a second time."""
    jobs = make_jobs(shutdown_timeout=0.3, poll_interval=0.1)
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    store.busy_timeout = 0.1
    job, runs, go = await a_job_under_way(jobs)
    other = lock_the_file(jobs)
    release = threading.Timer(3.0, lambda: other.execute("COMMIT"))
    release.start()
    try:
        go.set()
        with anyio.fail_after(8):
            await jobs.stop()
    finally:
        release.join()
        other.close()
    assert (await job.info()).status == "succeeded"
    assert runs == [1]


async def test_stop_ends_in_time_while_another_process_holds_the_file(
    make_jobs: MakeJobs,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process holds the write lock for all of shutdown. Each write would wait
    five busy timeouts (5 s here), one after another: stop() ends after
    ``shutdown_timeout`` and ``FINAL_WRITE_TIME`` instead (about 1 s), says which job
    will run again, and that job does run again once its lease expires."""
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 0.5)
    jobs = make_jobs(shutdown_timeout=0.5, visibility_timeout=60)
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    store.busy_timeout = 1.0
    job, runs, go = await a_job_under_way(jobs)
    other = lock_the_file(jobs)
    try:
        go.set()
        with anyio.fail_after(4):
            await jobs.stop()
    finally:
        other.execute("COMMIT")
        other.close()
    assert f"could not record the outcome (succeeded) of job {job.id}" in caplog.text
    assert (await job.info()).status == "running"  # to its lease, as after a crash

    clock.advance(61)
    await jobs.store.recover(now=clock.now())
    await drain(jobs)  # (go is set: this time the job ends at once)
    assert await job.result(timeout=1) == "done"
    assert runs == [1, 1]


async def test_an_outcome_the_store_failed_to_write_is_not_logged_as_no_longer_ours(
    make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write failed, the job is still ours: the log must not send an operator
    looking for who cancelled it or why its lease expired. Shutdown tries again for
    ``FINAL_WRITE_TIME``, then says which jobs will run again."""
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 0.3)
    jobs = make_jobs(shutdown_timeout=600)
    started, go = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await go.wait()

    await jobs.start()
    job = await t.enqueue()

    async def failing(*args: object, **kwargs: object) -> list[str]:
        raise StoreError("disk I/O error")

    try:
        with anyio.fail_after(5):
            await started.wait()
            monkeypatch.setattr(jobs.store, "finish", failing)
            # A claim still under way as the job ends may carry its outcome too.
            monkeypatch.setattr(jobs.store, "finish_and_claim", failing)
            async with anyio.create_task_group() as tg:
                tg.start_soon(jobs.stop)
                await until(lambda: jobs._stop_requested.is_set())
                go.set()
    finally:
        go.set()
    assert "will run again once their leases expire" in caplog.text
    assert f"could not record the outcome (succeeded) of job {job.id}" in caplog.text
    assert "no longer ours" not in caplog.text
    monkeypatch.undo()
    assert (await job.info()).status == "running"  # left to its lease: it runs again


async def test_an_outcome_whose_write_failed_keeps_its_lease_until_a_write_succeeds(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refused the write of a finished job's outcome for longer than its
    lease: heartbeats must keep it this worker's, or recovery runs it again."""
    jobs = make_jobs(visibility_timeout=60, poll_interval=1)
    ran: list[int] = []

    @jobs.task(name="t")
    async def t() -> None:
        ran.append(1)

    async def failing(*args: object, **kwargs: object) -> list[str]:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(jobs.store, "finish", failing)
    monkeypatch.setattr(jobs.store, "finish_and_claim", failing)
    await jobs.start()
    job = await t.enqueue()
    await until(lambda: ran and not jobs.runner.running)
    for _ in range(12):  # two minutes: twice the lease
        clock.advance(10)
        await jobs.runner.heartbeat_once()
        await jobs.runner.recover()
    assert jobs.runner._outbox  # still unwritten
    monkeypatch.undo()
    clock.advance(1)
    with anyio.fail_after(5):
        while (await job.info()).status != "succeeded":
            await anyio.lowlevel.checkpoint()
    assert ran == [1]
    assert (await job.info()).attempts == 1
    await jobs.close()


async def test_an_outcome_whose_write_failed_at_shutdown_goes_with_the_next_write(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While stop waits for a long job, the write of a shorter one's outcome fails; the
    next write, as the long job ends, records both (the first was dropped)."""
    jobs = make_jobs(shutdown_timeout=600, concurrency=2)
    go = {0: anyio.Event(), 1: anyio.Event()}
    started: list[int] = []
    wrote: list[int] = []
    store_finish = jobs.store.finish

    @jobs.task(name="t")
    async def t(i: int) -> None:
        started.append(i)
        await go[i].wait()

    async def failing_once(*args: Any, **kwargs: Any) -> list[str]:
        wrote.append(1)
        if len(wrote) == 1:
            raise StoreError("disk I/O error")
        return await store_finish(*args, **kwargs)

    await jobs.start()
    long, short = await t.enqueue(0), await t.enqueue(1)
    try:
        with anyio.fail_after(5):
            await until(lambda: len(started) == 2)
            monkeypatch.setattr(jobs.store, "finish", failing_once)
            async with anyio.create_task_group() as tg:
                tg.start_soon(jobs.stop)
                await until(lambda: jobs._stop_requested.is_set())
                go[1].set()
                await until(lambda: len(wrote) == 1)
                go[0].set()
    finally:
        go[0].set()
        go[1].set()
    assert [(await job.info()).status for job in (long, short)] == ["succeeded"] * 2


async def test_stop_goes_on_without_a_job_that_ignores_its_cancellation(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that swallows its cancellation held stop() forever. After the
    shutdown timeout and the grace for cleanup, stop goes on; the job keeps its lease,
    so it runs again once that expires, and the log says so."""
    jobs = make_jobs(shutdown_timeout=10, visibility_timeout=60)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="stubborn")
    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed: the job carries on as if nothing happened

    job = await stubborn.enqueue()
    await jobs.start()
    stopped = anyio.Event()

    async def stop() -> None:
        await jobs.stop()
        stopped.set()

    try:
        with anyio.fail_after(5):
            await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            await until(lambda: stopped.is_set(), clock)
    finally:
        release.set()  # a failure above must not leave the job running forever
    row = await jobs.store.get(job.id)
    assert row is not None
    assert (row.status, row.attempts) == ("running", 1)  # still leased: not lost
    assert "ignored its cancellation" in caplog.text
    # A heartbeat may have renewed the lease at the clock's last reading: past that.
    await jobs.store.recover(now=clock.now() + 61)
    assert (await job.info()).status == "queued"  # the lease expired: it runs again


async def test_a_job_that_stop_went_on_without_is_not_collected_while_it_runs(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Once stop() went on without a job that ignores its cancellation, the runner held
    its task no more, and asyncio holds tasks weakly: a job waiting on something only
    it can reach was collected mid-run ("Task was destroyed but it is pending!"), its
    code thrown ``GeneratorExit``, and ``asyncjobs worker`` never saw it to wait for
    at its exit (tests/test_cli.py's stubborn worker, now and then). It is kept."""
    jobs = make_jobs(shutdown_timeout=10)
    started, done = anyio.Event(), anyio.Event()

    @jobs.task(name="stubborn")
    async def stubborn() -> None:
        started.set()
        never = asyncio.Event()  # nothing else reaches it, nor so the job's task
        while not done.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # swallowed
                await never.wait()

    await stubborn.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            await until(lambda: not jobs.started, clock)
    gc.collect()
    left = [t for t in asyncio.all_tasks() if "_execute" in repr(t.get_coro())]
    assert "Task was destroyed but it is pending" not in caplog.text
    assert len(left) == 1
    done.set()
    left[0].cancel()
    with anyio.fail_after(5):
        await asyncio.wait(left)


@pytest.mark.parametrize("earlier_attempts", [0, 1])
async def test_stop_cancels_jobs_after_the_shutdown_timeout_and_refunds_the_attempt(
    make_jobs: MakeJobs, clock: FakeClock, earlier_attempts: int
) -> None:
    jobs = make_jobs(shutdown_timeout=10)
    started = anyio.Event()
    cut_at: list[float] = []

    @jobs.task(name="stuck", retries=3)
    async def stuck() -> None:
        if current_job().attempt <= earlier_attempts:
            raise RuntimeError("an earlier failed attempt")
        started.set()
        try:
            await anyio.Event().wait()
        finally:
            cut_at.append(clock.now())

    job = await stuck.enqueue()
    if earlier_attempts:
        await drain(jobs)
        clock.advance(3600)
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
    info = await job.info()
    assert (info.status, info.attempts) == ("running", earlier_attempts + 1)
    stop_at = clock.now()
    stopped = anyio.Event()

    async def stop() -> None:
        await jobs.stop()
        stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop)
        # Fake time stands still until the shutdown waits out its timeout: the claim loop
        # stops first, and a write of its in the store's thread takes real time.
        shutdown_deadline = stop_at + 10
        await until(lambda: any(entry[0] == shutdown_deadline for entry in clock._scopes))
        await until(lambda: stopped.is_set(), clock)
    assert len(cut_at) == 1
    assert 10 <= cut_at[0] - stop_at <= 15  # it had its shutdown_timeout, then was cut off
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", earlier_attempts)
    assert (info.started_at is None) == (not earlier_attempts), "no start once none counts"
    row = await jobs.store.get(job.id)
    assert row is not None
    assert (row.worker, row.lease_until) == (None, None)
    await jobs.close()


async def test_retry_dead_with_a_name_no_job_can_have_retries_none(jobs: Jobs) -> None:
    @jobs.task(retries=0)
    async def flaky() -> None:
        raise RuntimeError("down")

    await jobs.enqueue(flaky)
    await drain(jobs)
    assert await jobs.retry_dead(queue="\udcff") == 0  # a lone surrogate: not even storable
    assert await jobs.retry_dead(task="") == 0
    with pytest.raises(ConfigurationError, match="queue must be a string"):
        await jobs.retry_dead(queue=42)  # type: ignore[arg-type]
    assert await jobs.retry_dead() == 1


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit(3)"])
def test_a_job_that_raises_keyboard_interrupt_or_system_exit_is_recorded_as_failed(
    tmp_path: Path, raised: str
) -> None:
    """Raised by a job, KeyboardInterrupt and SystemExit go on out of the event loop, as
    asyncio has them do, and the process goes down; the attempt is recorded on the way,
    a failure to retry that shows what was raised. It was left running, as after a
    kill -9: unseen until its lease expired."""
    db = tmp_path / "jobs.db"
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from asyncjobs import Jobs

            jobs = Jobs("sqlite:///{db}")

            @jobs.task(name="t", retries=2)
            async def t() -> None:
                raise {raised}

            async def main() -> None:
                async with jobs:
                    await t.enqueue()
                    await asyncio.Event().wait()

            try:
                asyncio.run(main())
            except BaseException as error:
                print("out of the loop:", type(error).__name__)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    name = raised.split("(")[0]
    assert done.stdout.strip() == f"out of the loop: {name}"
    with closing(sqlite3.connect(db)) as conn:
        status, attempts, error, worker = conn.execute(
            "SELECT status, attempts, error, worker FROM asyncjobs_jobs"
        ).fetchone()
    assert (status, attempts, worker) == ("scheduled", 1, None)  # its retry, after backoff
    assert error.rstrip().endswith(name if name == "KeyboardInterrupt" else f"{name}: 3")


async def test_a_job_that_raises_system_exit_in_a_group_is_recorded_as_failed(
    jobs: Jobs,
) -> None:
    """In a group, SystemExit does not take the event loop down (asyncio lets only a
    bare one out): the process goes on, and the job was left running, its slot free,
    until its lease expired."""

    @jobs.task(name="t", retries=1)
    async def t() -> None:
        raise BaseExceptionGroup("cleanup", [SystemExit(3)])

    job = await t.enqueue()
    with anyio.fail_after(5):
        await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == (JobStatus.SCHEDULED, 1)
    assert info.error is not None
    assert "SystemExit: 3" in info.error


def test_a_script_that_enqueues_without_closing_the_store_still_exits(tmp_path: Path) -> None:
    """What DESIGN promises a script: enqueue without workers, and return."""
    db = tmp_path / "jobs.db"
    script = tmp_path / "enqueue.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from asyncjobs import Jobs

            jobs = Jobs("sqlite:///{db}")

            @jobs.task(name="t")
            async def t(n: int) -> None: ...

            asyncio.run(t.enqueue(1))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT task, status FROM asyncjobs_jobs").fetchall() == [
            ("t", "queued")
        ]


async def test_shutdown_timeout_passes_in_real_time_when_nobody_advances_a_fake_clock(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A user's test that leaves a job running when its app shuts down (TestClient's
    exit) must not hang: the job is cut off after shutdown_timeout and given back."""
    jobs = make_jobs(shutdown_timeout=0.2)
    started = anyio.Event()

    @jobs.task(name="nap")
    async def nap() -> None:
        started.set()
        await jobs.clock.sleep(3600)  # fake time: it never ends on its own

    try:
        with anyio.fail_after(30):
            async with jobs:
                job = await nap.enqueue()
                await started.wait()
    finally:
        clock.advance(3600)  # without a real bound: let the stop the test gave up on end
    info = await jobs.get(job.id)
    assert info is not None
    assert (info.status, info.attempts) == (JobStatus.QUEUED, 0)  # given back unspent


@pytest.mark.parametrize("in_task_group", [False, True])
async def test_a_job_whose_cleanup_fails_when_shutdown_cuts_it_off_is_still_released(
    make_jobs: MakeJobs, in_task_group: bool
) -> None:
    """Cut off by shutdown, the job's own cleanup raised (its connection was gone): that
    is still shutdown's doing, so the attempt is refunded, not spent as a failure."""
    jobs = make_jobs(shutdown_timeout=0)
    started = anyio.Event()

    async def give_the_lock_back() -> None:
        raise ConnectionError("the lock server hung up")

    async def hold_the_lock() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        except asyncio.CancelledError:
            await give_the_lock_back()
            raise

    @jobs.task(name="locked", retries=0)
    async def locked() -> None:
        if not in_task_group:
            await hold_the_lock()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_the_lock)

    job = await locked.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        await jobs.stop()
    info = await job.info()
    assert (info.status, info.attempts, info.error) == ("queued", 0, None)


@pytest.mark.parametrize("in_task_group", [False, True])
async def test_a_job_that_asks_for_a_retry_when_shutdown_cuts_it_off_is_released(
    make_jobs: MakeJobs, in_task_group: bool
) -> None:
    """A job that answers its cancellation with ``raise Retry(...)`` ("interrupted: try
    again later") was cut off by shutdown all the same: it goes back without spending
    an attempt, as any job shutdown cuts off. It spent one, and on its last went dead."""
    jobs = make_jobs(shutdown_timeout=0)
    started = anyio.Event()

    async def call_the_api() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        except asyncio.CancelledError:
            raise Retry(delay=60, reason="interrupted") from None

    @jobs.task(name="sync_account", retries=0)
    async def sync_account() -> None:
        if not in_task_group:
            await call_the_api()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_the_api)

    job = await sync_account.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        await jobs.stop()
    info = await job.info()
    assert (info.status, info.attempts, info.error) == ("queued", 0, None)


async def test_a_job_with_a_timeout_cut_off_by_shutdown_is_released_unspent(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(shutdown_timeout=0)
    started = anyio.Event()

    @jobs.task(name="slow", timeout=30, retries=0)
    async def slow() -> None:
        started.set()
        await anyio.Event().wait()

    job = await slow.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        await jobs.stop()
    info = await job.info()
    assert (info.status, info.attempts, info.error) == ("queued", 0, None)


async def test_a_job_whose_cleanup_fails_after_its_timeout_while_workers_stop_spends_its_attempt(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Its own timeout cut it off while the workers were stopping, within their
    shutdown_timeout: a failure like any timeout, not shutdown's doing."""
    jobs = make_jobs(shutdown_timeout=3600)
    started = anyio.Event()

    @jobs.task(name="locked", timeout=30, retries=0)
    async def locked() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("the lock server hung up") from None

    job = await locked.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            await until(lambda: not jobs.runner.accepting)
            clock.advance(31)  # the job's timeout, long before the shutdown's
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 1)
    assert "ConnectionError: the lock server hung up" in (info.error or "")


async def test_workers_that_stopped_after_their_stop_call_was_cancelled_start_again(
    make_jobs: MakeJobs,
) -> None:
    """The only ``stop()`` was cancelled (a bound on the app's shutdown) while a job
    ran; the workers then finished draining on their own. They were still taken for
    running: ``start()`` started none, and the jobs enqueued after never ran."""
    jobs = make_jobs(shutdown_timeout=3600)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t(wait: bool) -> int:
        if wait:
            started.set()
            await release.wait()
        return 1

    await jobs.start()
    first = await t.enqueue(True)
    with anyio.fail_after(5):
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            await until(lambda: not jobs.runner.accepting)
            tg.cancel_scope.cancel()  # the stop() call gives up; the drain goes on
        release.set()
        assert await first.result(timeout=5) == 1
        await until(lambda: jobs._host is None or jobs._host.done())
        await jobs.start()
        assert jobs.started
        assert await (await t.enqueue(False)).result(timeout=5) == 1
    await jobs.stop()
    assert not jobs.started


async def test_a_start_as_the_workers_stop_is_not_undone_by_that_stop(make_jobs: MakeJobs) -> None:
    """``start()`` called as soon as the workers stopped, before the ``stop()`` call
    awaiting them resumed: that call forgot the new workers (never stopped after)."""
    jobs = make_jobs()

    @jobs.task(name="t")
    async def t() -> int:
        return 1

    await jobs.start()
    old = jobs._host
    assert old is not None
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            while not old.done():
                await anyio.lowlevel.checkpoint()
            await jobs.start()
        assert jobs.started
        assert await (await t.enqueue()).result(timeout=5) == 1
    await jobs.stop()


async def test_a_start_while_a_stop_drains_the_workers_starts_new_ones_once_it_ends(
    make_jobs: MakeJobs,
) -> None:
    """``start()`` while ``stop()`` drained the workers (a job running) joined them,
    taking them for running, and returned: they ended with the drain, no workers ran
    from then on, and the jobs enqueued after never ran. It now waits for the drain,
    then starts new workers."""
    jobs = make_jobs(shutdown_timeout=600)
    running, release = anyio.Event(), anyio.Event()

    @jobs.task(name="held")
    async def held(wait: bool) -> str:
        if wait:
            running.set()
            await release.wait()
        return "done"

    await jobs.start()
    old = jobs._host
    first = await held.enqueue(True)
    with anyio.fail_after(5):
        await running.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            await until(lambda: not jobs.runner.accepting)
            tg.start_soon(jobs.start)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert jobs._host is old  # the new start waits for the drain
            release.set()
        assert jobs.started
        assert jobs._host is not old
        assert await first.result(timeout=5) == "done"
        assert await (await held.enqueue(False)).result(timeout=5) == "done"
    await jobs.stop()


async def test_a_start_from_a_job_of_workers_that_stop_fails_instead_of_waiting_for_itself(
    make_jobs: MakeJobs,
) -> None:
    """start() waits for a drain under way, but called by a job of the draining workers
    it would wait for its own end: it fails, and the workers stop once the job ends."""
    jobs = make_jobs(shutdown_timeout=600)
    refused: list[AsyncJobsError] = []

    @jobs.task(name="restarts")
    async def restarts() -> str:
        await jobs.stop()  # asks them to stop, returns at once
        try:
            await jobs.start()
        except AsyncJobsError as error:
            refused.append(error)
        return "done"

    await jobs.start()
    job = await restarts.enqueue()
    with anyio.fail_after(5):
        assert await job.result(timeout=5) == "done"
        await jobs.stop()
    assert "start() from inside a running job" in str(refused[0])
    assert not jobs.started


def test_workers_whose_event_loop_ended_without_stop_start_again_in_the_next_one(
    tmp_path: Path,
) -> None:
    """A script's ``asyncio.run()`` (or a test's event loop) ended without ``stop()``:
    closing that loop cancelled the workers, and they gave their jobs back. ``start()``
    in the next loop took them for running and started none, so its jobs never ran;
    ``stop()`` there raised the old workers' ``CancelledError``, and ``drain()`` refused to
    run, taking them for started."""
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), clock=FakeClock())

    @jobs.task(name="double")
    async def double(n: int) -> int:
        return 2 * n

    async def run_without_stop(n: int) -> int:
        await jobs.start()
        job = await double.enqueue(n)
        result: int = await job.result(timeout=5)
        return result

    async def drain_without_workers(n: int) -> int:
        job = await double.enqueue(n)
        await drain(jobs)  # was refused: "workers are started"
        result: int = await job.result(timeout=0)
        return result

    async def in_another_store() -> int:
        async with replace_store(jobs, "sqlite:///" + str(tmp_path / "other.db")):
            return await drain_without_workers(4)

    try:
        assert asyncio.run(run_without_stop(1)) == 2
        assert asyncio.run(run_without_stop(2)) == 4
        assert asyncio.run(drain_without_workers(3)) == 6
        asyncio.run(run_without_stop(1))
        assert not jobs.started  # its loop has ended: nothing runs
        assert asyncio.run(in_another_store()) == 8  # was refused: "workers are started"
    finally:
        asyncio.run(jobs.close())
    assert not jobs.started


async def test_a_start_cancelled_while_the_workers_start_leaves_nothing_waiting(
    make_jobs: MakeJobs,
) -> None:
    """``start()`` was cancelled (a bound on the app's startup) while the workers were
    starting, and their start then failed: the future it had waited on for them to be
    ready was left pending for good (a task waiting on an event nobody sets). (The
    cancelled start stops its workers: tests/test_start_races.py.)"""
    jobs = make_jobs()

    @jobs.task(name="t")
    async def t() -> None: ...

    waiting, gate = anyio.Event(), anyio.Event()

    async def recover() -> None:  # the startup's lease recovery, held, then failing
        waiting.set()
        await gate.wait()
        raise RuntimeError("the recovery failed")

    jobs.runner.recover = recover  # type: ignore[method-assign]
    starting = anyio.CancelScope()

    async def start() -> None:
        with starting:
            await jobs.start()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await waiting.wait()
            starting.cancel()  # the start() call gives up, and stops its workers
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            gate.set()  # as their start fails
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
    assert starting.cancelled_caught
    assert jobs._host is None
    left = [task for task in asyncio.all_tasks() if "Event.wait" in repr(task.get_coro())]
    assert left == []
    await jobs.stop()  # nothing left to stop
