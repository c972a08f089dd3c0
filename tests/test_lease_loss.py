"""A worker that cannot renew its leases (heartbeats failing: the store unreachable, a
disk error) stops its attempts before the leases run out, so the run another worker
(or lease recovery) starts once they have never overlaps this one; heartbeats that
recover in time stop nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from asyncjobs import Jobs, StoreError, current_job
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

LEASE = 30.0  # visibility_timeout: heartbeats every 10 s
STOPPING = "could not be renewed"  # in the warning of a job stopped for its lease


async def until(check: Callable[[], object]) -> None:
    """Yield to the loop (5 s of real time at most) until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            await anyio.lowlevel.checkpoint()


async def settle(jobs: Jobs) -> None:
    """Let woken loops run and their store calls answer (a read queues behind them)."""
    for _ in range(3):
        for _ in range(30):
            await anyio.lowlevel.checkpoint()
        await jobs.store.get("none")


async def unreachable(*args: Any, **kwargs: Any) -> Any:
    raise StoreError("the store is unreachable")


@contextmanager
def failing(jobs: Jobs, *methods: str) -> Iterator[None]:
    """``jobs``' store raises ``StoreError`` from ``methods`` (only this process's)."""
    store: Any = jobs.store
    saved = {name: getattr(store, name) for name in methods}
    for name in methods:
        setattr(store, name, unreachable)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(store, name, method)


def stop_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if STOPPING in r.getMessage()]


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


async def test_a_worker_cut_off_from_the_store_stops_its_job_before_another_can_run_it(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Its heartbeats and writes fail; another worker still reaches the store. The job
    is stopped here before its lease ends, and runs again there only after that."""
    here = make_jobs(visibility_timeout=LEASE)
    there = make_jobs(visibility_timeout=LEASE)
    timeline: list[str] = []
    started = anyio.Event()
    stopped_at: list[float] = []

    for jobs in (here, there):

        @jobs.task(name="t")
        async def t(secret: str) -> str:
            attempt = current_job().attempt
            timeline.append(f"start {attempt}")
            if attempt == 1:
                started.set()
                try:
                    await anyio.Event().wait()  # ends only when stopped
                except BaseException:
                    stopped_at.append(clock.now())
                    timeline.append("stop 1")
                    raise
            return "done"

    async with here:
        job = await here.enqueue("t", "the payload")
        with anyio.fail_after(5):
            await started.wait()
        row = await here.store.get(job.id)
        assert row is not None
        assert row.lease_until is not None
        lease_end = row.lease_until
        with failing(here, "heartbeat", "finish", "finish_and_claim", "claim", "record_worker"):
            clock.advance(LEASE / 3)  # a heartbeat fails
            await settle(here)
            clock.advance(LEASE / 3)  # a second one fails too
            await settle(here)
            assert timeline == ["start 1"]
            # Half a heartbeat interval before the lease ends, nothing renewed it: stop.
            clock.advance(LEASE / 6)
            await until(lambda: "stop 1" in timeline)
            assert stopped_at[0] < lease_end
            await settle(here)
            clock.advance(LEASE / 6 + 1)  # the lease ends: another worker takes the job
            await drain(there)
            assert timeline == ["start 1", "stop 1", "start 2"]
            info = await job.info()
            assert (info.status, info.attempts) == ("succeeded", 2)
            clock.advance(LEASE)  # more checks: the job is not stopped, nor reported, twice
            await settle(here)
    (record,) = stop_warnings(caplog)
    assert record.levelname == "WARNING"
    assert (record.job_id, record.task, record.attempt) == (job.id, "t", 1)  # type: ignore[attr-defined]
    assert "the payload" not in record.getMessage()
    info = await job.info()  # the first attempt's late outcome changed nothing
    assert (info.status, info.attempts, info.result) == ("succeeded", 2, "done")


async def test_heartbeats_that_recover_in_time_keep_the_job_running(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Guard: one heartbeat fails, the next renews the lease; the job is not stopped."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        started.set()
        await release.wait()
        return "done"

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        row = await jobs.store.get(job.id)
        assert row is not None
        assert row.lease_until is not None
        first_lease = row.lease_until
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE / 3)
            await settle(jobs)
        clock.advance(LEASE / 3)  # this heartbeat renews the lease

        async def renewed() -> None:
            while True:
                row = await jobs.store.get(job.id)
                assert row is not None
                assert row.lease_until is not None
                if row.lease_until > first_lease:
                    return

        with anyio.fail_after(5):
            await renewed()
        await settle(jobs)
        clock.advance(LEASE / 3 + 1)  # past the first lease's end
        await settle(jobs)
        clock.advance(LEASE / 3)
        await settle(jobs)
        assert jobs.runner.running[job.id].cancelled_by_user is False
        release.set()
        assert await job.result(timeout=5) == "done"
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)
    assert stop_warnings(caplog) == []


async def test_a_job_stopped_for_its_lease_is_retried_not_cancelled(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Only the heartbeats fail: the stopped attempt's outcome is written while the job
    is still this worker's. It is a failed attempt retried at once, as lease recovery
    would record it; not ``cancelled``, which nobody asked for."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started: list[int] = []

    @jobs.task(name="t")
    async def t() -> str:
        started.append(current_job().attempt)
        if len(started) == 1:
            await anyio.Event().wait()  # ends only when stopped
        return "done"

    async with jobs:
        job = await t.enqueue()
        await until(lambda: started == [1])
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE * 5 / 6)
            await until(lambda: started == [1, 2])
            assert await job.result(timeout=5) == "done"
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 2)


async def test_a_job_stopped_for_its_lease_on_its_last_attempt_is_dead(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(visibility_timeout=LEASE)
    started = anyio.Event()

    @jobs.task(name="t", retries=0)
    async def t() -> None:
        started.set()
        await anyio.Event().wait()  # ends only when stopped

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE * 5 / 6)
            with anyio.fail_after(5):
                while (await job.info()).status == "running":
                    await anyio.lowlevel.checkpoint()
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 1)
    assert info.error is not None
    assert "lease" in info.error


async def test_a_job_that_ended_is_not_stopped_while_its_outcome_waits_to_be_written(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Guard: the job succeeded, but neither its outcome nor the heartbeats can be
    written; its lease lapses all the same. There is nothing left to stop: it is not
    reported as stopped, and its outcome is kept for the next write."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        started.set()
        await release.wait()
        return "done"

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat", "finish", "finish_and_claim", "claim"):
            release.set()
            await until(lambda: jobs.runner._outbox)
            clock.advance(LEASE * 5 / 6)
            await settle(jobs)
            assert [finished.row.id for finished in jobs.runner._outbox] == [job.id]
            assert stop_warnings(caplog) == []
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)


async def test_lease_recovery_here_stops_an_attempt_before_it_requeues_its_job(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats failing, the event loop stalled past the lease: this process's own lease
    recovery may run before the heartbeat loop's watch. Its heartbeat fails too; it stops
    the attempt before it requeues the job, not after (the job would run twice)."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started = anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await anyio.Event().wait()  # ends only when stopped

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        stopping: list[bool] = []
        store_recover = jobs.store.recover

        async def recover(**kwargs: Any) -> Any:
            running = jobs.runner.running.get(job.id)  # attempt 2: 1 ended, retried
            stopping.append(
                running is None or running.cancelled_by_user or running.row.attempts > 1
            )
            return await store_recover(**kwargs)

        monkeypatch.setattr(jobs.store, "recover", recover)
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE + 1)
            await jobs.runner.recover()  # before any other loop runs
            assert stopping[:1] == [True]


async def test_a_stall_of_the_event_loop_into_the_last_half_beat_stops_nothing(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop stalls 26 s (a blocking call): no heartbeat ran, none failed, and the
    lease, which ends in 4 s, is still this worker's. The watch wakes within its last
    half beat: it asks the store first, which renews the lease; the job runs on."""
    jobs = make_jobs(visibility_timeout=LEASE, poll_interval=3600)
    started, release = anyio.Event(), anyio.Event()
    runs: list[int] = []

    @jobs.task(name="t")
    async def t() -> str:
        runs.append(current_job().attempt)
        started.set()
        await release.wait()
        return "done"

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        await settle(jobs)
        clock.advance(LEASE * 5 / 6 + 1)
        await settle(jobs)
        assert stop_warnings(caplog) == []
        release.set()
        assert await job.result(timeout=5) == "done"
    assert runs == [1]
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)


async def test_a_job_that_ignores_its_stop_is_reported_as_its_lease_ends(
    make_jobs: MakeJobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Its code catches the cancellation and goes on. Nothing can stop it; once its
    lease ends unrenewed, another worker may run the job at the same time: that is
    logged, once, as an error naming the job (as shutdown does for such a job)."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started, caught, go_on = anyio.Event(), anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> str:
        started.set()
        try:
            await anyio.Event().wait()  # ends only when stopped
        except BaseException:
            caught.set()
        await go_on.wait()
        return "done"

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat", "finish", "finish_and_claim", "claim", "recover"):
            clock.advance(LEASE * 5 / 6)
            with anyio.fail_after(5):
                await caught.wait()
            await settle(jobs)
            assert not [r for r in caplog.records if "still runs" in r.getMessage()]
            clock.advance(LEASE / 6)  # the lease ends, the job still runs
            await settle(jobs)
            clock.advance(LEASE)
            await settle(jobs)
        go_on.set()
        await until(lambda: not jobs.runner.running)
    (record,) = [r for r in caplog.records if "still runs" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert (record.job_id, record.attempt) == (job.id, 1)  # type: ignore[attr-defined]


async def test_a_failure_inside_the_lease_watch_is_logged_and_the_workers_go_on(
    make_jobs: MakeJobs,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug of ours in the watch (here: it raises once) must not take the workers down
    with it (the heartbeats run in its task group): it is logged, and it watches on."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started = anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        await anyio.Event().wait()  # ends only when stopped

    async with jobs:
        job = await t.enqueue()
        with anyio.fail_after(5):
            await started.wait()
        runner: Any = jobs.runner
        lapsing = runner._lapsing
        calls: list[float] = []

        def broken(now: float) -> Any:
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("a bug in the watch")
            return lapsing(now)

        monkeypatch.setattr(runner, "_lapsing", broken)
        clock.advance(LEASE / 3)
        await settle(jobs)
        # The lease this heartbeat writes is read from the clock once the store holds the
        # lock: its write must be over before the clock moves on, or the lease counts
        # from a later time and the stop below comes a beat later.
        renewed_to = clock.now() + LEASE
        await until(lambda: runner._confirmed.get(job.id, (0, 0.0))[1] == renewed_to)
        assert calls
        assert jobs.runner.accepting
        with failing(jobs, "heartbeat"):  # it still stops the job in time
            clock.advance(LEASE / 3)
            await settle(jobs)
            clock.advance(LEASE / 3)
            await settle(jobs)
            clock.advance(LEASE / 6)  # half a beat before the lease renewed above ends
            with anyio.fail_after(5):
                while (await job.info()).attempts < 2:
                    await settle(jobs)
    assert any("a bug in the watch" in (r.exc_text or "") for r in caplog.records)


async def test_a_job_that_shutdown_cancelled_is_not_cancelled_again_as_its_lease_lapses(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Shutdown cancelled the job, which cleans up (a rollback, say) as its lease comes
    within half a beat of its end, heartbeats failing. It is being stopped already:
    cancelled again, its cleanup would be cut short. It goes back, attempt unspent."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started, cleaning, cleaned = anyio.Event(), anyio.Event(), anyio.Event()
    cut: list[bool] = []

    @jobs.task(name="t")
    async def t() -> None:
        started.set()
        try:
            await anyio.Event().wait()  # ends only when stopped
        except asyncio.CancelledError:
            cleaning.set()
            try:
                await cleaned.wait()
            except asyncio.CancelledError:
                cut.append(True)
            raise

    await jobs.start()
    job = await t.enqueue()
    with anyio.fail_after(5):
        await started.wait()
    with failing(jobs, "heartbeat"):
        clock.advance(LEASE * 5 / 6 - 1)  # a second before the job would be stopped
        await settle(jobs)
        async with anyio.create_task_group() as stopping:
            stopping.start_soon(jobs.stop)
            with anyio.fail_after(5):
                await cleaning.wait()
            clock.advance(1)
            await settle(jobs)
            cleaned.set()
    assert cut == []
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", 0)
