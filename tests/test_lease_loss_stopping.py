"""A job stopped because its lease could not be renewed (heartbeats failing), while it
stops: this process's own lease recovery, a cancel by the user, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from test_lease_loss import LEASE, failing, settle, until

import asyncjobs._slots
from asyncjobs import Jobs
from asyncjobs._execution import LEASE_LOST
from asyncjobs.testing import FakeClock, drain

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
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: a job that ignores its stop holds up the recovery half a heartbeat
    interval, not for good (other workers' jobs wait on it)."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=0)
    started, cleaning, cleaned = cleaning_task(jobs)

    async with jobs:
        await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        recovered_while_cleaning: list[bool] = []
        store_recover = jobs.store.recover

        async def recover(**kwargs: Any) -> Any:
            recovered_while_cleaning.append(cleaning.is_set() and not cleaned.is_set())
            return await store_recover(**kwargs)

        monkeypatch.setattr(jobs.store, "recover", recover)
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE + 1)
            with anyio.fail_after(5):  # the recovery ends, the cleanup still running
                async with anyio.create_task_group() as recovering:
                    recovering.start_soon(jobs.runner.recover)
                    await cleaning.wait()
                    await settle(jobs)
                    clock.advance(LEASE / 6)
            assert True in recovered_while_cleaning
            cleaned.set()


async def test_a_job_the_user_cancels_as_it_stops_for_its_lease_says_it_was_cancelled(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Stopped for its lease, its cleanup running, the job is cancelled by the user: it
    ends cancelled, and its error says so, not 'lease lost' (nobody took it over)."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started, cleaning, cleaned = cleaning_task(jobs)

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat"):
            clock.advance(LEASE * 5 / 6)
            with anyio.fail_after(5):
                await cleaning.wait()
            assert await job.cancel()
            cleaned.set()
            with anyio.fail_after(5):
                while (await job.info()).status == "running":
                    await settle(jobs)
    info = await job.info()
    assert info.status == "cancelled"
    assert info.error is not None
    assert "lease lost" not in info.error
    assert "cancelled" in info.error


async def test_a_job_the_user_cancels_after_it_stopped_for_its_lease_says_so(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """As above, the attempt over already, its outcome not written yet (the store
    unreachable for its writes too): the user's cancel is what the job shows."""
    jobs = make_jobs(visibility_timeout=LEASE)
    started, _, cleaned = cleaning_task(jobs)
    cleaned.set()

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "heartbeat", "finish", "finish_and_claim", "claim"):
            clock.advance(LEASE * 5 / 6)
            await until(lambda: jobs.runner._outbox)
            assert await job.cancel()
        await jobs.runner.flush_outbox()  # the store reachable again
    info = await job.info()
    assert info.status == "cancelled"
    assert info.error is not None
    assert "lease lost" not in info.error


async def test_a_job_cancelled_elsewhere_after_it_stopped_for_its_lease_says_so(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """As above, cancelled from another process: the heartbeat that reaches the store
    again finds the job no longer this worker's, and its outcome says cancelled."""
    jobs = make_jobs(visibility_timeout=LEASE)
    elsewhere = make_jobs(visibility_timeout=LEASE)
    started, _, cleaned = cleaning_task(jobs)
    cleaned.set()

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "finish", "finish_and_claim", "claim"):
            with failing(jobs, "heartbeat"):
                clock.advance(LEASE * 5 / 6)
                await until(lambda: jobs.runner._outbox)
            assert await elsewhere.cancel(job.id)
            await jobs.runner.heartbeat_once()  # the store reachable again, but for writes
        await jobs.runner.flush_outbox()
    info = await job.info()
    assert info.status == "cancelled"
    assert info.error is not None
    assert "lease lost" not in info.error


async def test_a_job_stopped_for_its_lease_while_shutdown_waits_for_it_is_given_back(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Shutdown waits for the running job; heartbeats failing, its lease comes within
    half a beat of its end first, and it is stopped. It goes back, attempt unspent, as
    if shutdown had cancelled it a moment later: nothing in its code failed."""
    jobs = make_jobs(visibility_timeout=LEASE, shutdown_timeout=LEASE * 10)
    started, cleaning, cleaned = cleaning_task(jobs)
    cleaned.set()

    await jobs.start()
    job = await jobs.enqueue("t")
    with anyio.fail_after(5):
        await started.wait()
    with failing(jobs, "heartbeat"):
        async with anyio.create_task_group() as stopping:
            stopping.start_soon(jobs.stop)
            await until(lambda: not jobs.runner.accepting)
            await settle(jobs)
            clock.advance(LEASE * 5 / 6)
            with anyio.fail_after(5):
                await cleaning.wait()
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", 0)


@pytest.mark.parametrize(("retries", "status"), [(0, "dead"), (1, "cancelled")])
async def test_a_failure_whose_text_reads_like_a_lost_lease_keeps_its_error_when_cancelled(
    make_jobs: MakeJobs, retries: int, status: str
) -> None:
    """The job fails on its own (its lease held), its traceback starting with the very
    words a lost lease's error starts with; the user cancels it before its outcome is
    written. Its outcome is what it reached first, with its own error: dead on its last
    attempt, else cancelled (not retried). It is not taken for one stopped for its lease."""
    jobs = make_jobs(visibility_timeout=LEASE)
    head, _, rest = LEASE_LOST.partition(": ")
    # An exception never raised, as the cause: its traceback shows "type: text" first.
    lookalike = type(head, (Exception,), {"__module__": "builtins"})

    started, fail = anyio.Event(), anyio.Event()

    @jobs.task(name="t", retries=retries)
    async def t() -> None:
        started.set()
        await fail.wait()
        raise RuntimeError("the job's own failure") from lookalike(rest)

    async with jobs:
        job = await jobs.enqueue("t")
        with anyio.fail_after(5):
            await started.wait()
        with failing(jobs, "finish", "finish_and_claim", "claim"):
            fail.set()
            await until(lambda: jobs.runner._outbox)
            assert await job.cancel()
        await jobs.runner.flush_outbox()  # the store reachable again
    info = await job.info()
    assert info.status == status
    assert info.error is not None
    assert info.error.startswith(LEASE_LOST)
    assert "the job's own failure" in info.error


@contextlib.asynccontextmanager
async def an_attempt_outliving_shutdown(jobs: Jobs, clock: FakeClock) -> AsyncIterator[None]:
    """With ``jobs`` built with ``visibility_timeout=1`` and ``CANCEL_GRACE`` made short:
    task "t" starts; its first attempt, stopped for its lease, ignores its stop and goes
    on; its job runs again here and ends, and the workers stop, the old attempt left
    running. It ends on leaving the block."""
    lease = jobs.settings.visibility_timeout  # half a heartbeat interval: 1/6 of it
    runs: list[int] = []
    caught, zombie_ends = anyio.Event(), anyio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        runs.append(len(runs) + 1)
        if len(runs) > 1:
            return
        while not zombie_ends.is_set():
            try:
                await zombie_ends.wait()
            except asyncio.CancelledError:  # ignored: it goes on
                caught.set()

    try:
        await jobs.start()
        await jobs.enqueue("t")
        await until(lambda: runs == [1])
        with failing(jobs, "heartbeat"):
            clock.advance(lease * 5 / 6)  # stopped for its lease: it goes on
            with anyio.fail_after(5):
                await caught.wait()
            clock.advance(lease / 6 + 1)  # its lease is over
            async with anyio.create_task_group() as recovering:
                recovering.start_soon(jobs.runner.recover)  # requeues it, in half a beat
                await settle(jobs)
                clock.advance(lease / 6)
            await until(lambda: runs == [1, 2])
        await jobs.stop()  # the old attempt is left running
        yield
    finally:
        zombie_ends.set()


async def test_a_drain_after_a_stopped_attempt_outlived_shutdown_does_not_wait_for_it_for_good(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt stopped for its lease ignores its stop; its job runs again here and
    ends, and shutdown goes on without the old attempt, which still runs. A drain() then
    (time no longer moving) begins with lease recovery, which waits for such attempts
    half a heartbeat interval: of real time too, not of a fake clock nobody advances."""
    monkeypatch.setattr(asyncjobs._slots, "CANCEL_GRACE", 0.1)
    jobs = make_jobs(visibility_timeout=1.0, shutdown_timeout=0)
    async with an_attempt_outliving_shutdown(jobs, clock):
        with anyio.move_on_after(3) as waited:  # real time: the fake clock stays put
            await drain(jobs)
        assert not waited.cancelled_caught


async def test_an_attempt_that_outlived_shutdown_takes_no_slot_after_a_restart(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """An attempt stopped for its lease ignores its stop; its job runs again here, and
    shutdown goes on without the old attempt, which still runs. Started again, the same
    ``Jobs`` has every slot: the old attempt, forgotten at shutdown (and said so), takes
    none (two jobs that each wait for the other run together, at concurrency 2)."""
    monkeypatch.setattr(asyncjobs._slots, "CANCEL_GRACE", 0.1)
    jobs = make_jobs(visibility_timeout=1.0, shutdown_timeout=0, concurrency=2)
    pair: list[anyio.Event] = [anyio.Event(), anyio.Event()]

    @jobs.task(name="pair")
    async def pair_task(i: int) -> None:
        pair[i].set()
        await pair[1 - i].wait()

    async with an_attempt_outliving_shutdown(jobs, clock):
        await jobs.start()
        first = await jobs.enqueue("pair", 0)
        second = await jobs.enqueue("pair", 1)
        with anyio.fail_after(5):
            assert await first.result() is None
            assert await second.result() is None
        assert "outlived" in caplog.text
