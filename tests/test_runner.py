"""The runner: retries and backoff, timeouts, dead letters, cancel, priorities, queues,
which settings apply, unknown tasks, corrupt rows, and workers in the loop."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from asyncjobs import Jobs, JobStatus, Retry, StoreError, _execution, current_job
from asyncjobs._clock import SystemClock
from asyncjobs.stores import SQLiteStore
from asyncjobs.stores._outcomes import Outcome
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]
T = TypeVar("T")


def db_path(db_url: str) -> str:
    return db_url.removeprefix("sqlite:///")


def run_sql(db_url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    with sqlite3.connect(db_path(db_url)) as db:
        db.execute(sql, params)
    db.close()


async def drain_while(jobs: Jobs, started: anyio.Event, then: Callable[[], Any]) -> None:
    """Drain in a task group; once ``started`` fires await ``then()`` (advance, cancel...)."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            result = then()
            if result is not None:
                await result


# -- retries, backoff, dead letters --------------------------------------------------


async def test_failure_retries_with_exponential_backoff_then_dead(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the jitter drawn at its top, the delays are exactly base * 2**(n-1), capped."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    jobs = make_jobs(backoff_base=10, max_backoff=25)
    runs: list[float] = []

    @jobs.task(retries=3)
    async def flaky() -> None:
        runs.append(clock.now())
        raise RuntimeError("boom")

    job = await flaky.enqueue()
    for attempt, delay in [(1, 10.0), (2, 20.0), (3, 25.0)]:
        await drain(jobs)
        info = await job.info()
        assert (info.status, info.attempts, info.max_attempts) == ("scheduled", attempt, 4)
        assert info.run_at.timestamp() == pytest.approx(clock.now() + delay)
        assert "RuntimeError: boom" in (info.error or "")
        clock.advance(delay - 0.5)
        await drain(jobs)
        assert len(runs) == attempt  # not yet due
        clock.advance(0.501)  # past run_at, whatever float rounding did to the sum
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 4)
    assert info.finished_at is not None
    assert len(runs) == 4
    clock.advance(10_000)
    await drain(jobs)
    assert len(runs) == 4  # dead stays dead


async def test_backoff_is_jittered_within_its_bound(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(backoff_base=8, max_backoff=1000)

    @jobs.task(retries=5)
    async def fails(i: int) -> None:
        raise RuntimeError(str(i))

    made = await jobs.enqueue_many([fails.spec(i) for i in range(40)])
    await drain(jobs)  # first attempt of each: delay in [0, 8]
    clock.advance(8.001)
    await drain(jobs)  # second attempt of each: delay in [0, 16]
    infos = [await job.info() for job in made]
    assert {info.attempts for info in infos} == {2}
    delays = [info.run_at.timestamp() - clock.now() for info in infos]
    assert all(0 <= d <= 16 + 1e-6 for d in delays)
    assert max(delays) > 8  # the bound doubled
    assert len({round(d, 6) for d in delays}) > 30  # full jitter, not one shared delay


async def test_retry_signal_uses_its_delay_and_spends_an_attempt(
    jobs: Jobs, clock: FakeClock
) -> None:
    runs: list[int] = []

    @jobs.task(retries=1)
    async def later() -> None:
        runs.append(1)
        raise Retry(delay=42, reason="upstream busy")

    job = await later.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("scheduled", 1)
    assert info.run_at.timestamp() == pytest.approx(clock.now() + 42)
    assert "upstream busy" in (info.error or "")
    clock.advance(41)
    await drain(jobs)
    assert len(runs) == 1
    clock.advance(1.001)
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, len(runs)) == ("dead", 2, 2)


async def test_a_retry_delay_given_as_a_decimal_is_waited_out(jobs: Jobs, clock: FakeClock) -> None:
    """It passed Retry's check, then failed inside the runner: the attempt was recorded
    as an internal asyncjobs error, not as the retry the task asked for."""

    @jobs.task(retries=1)
    async def priced() -> None:
        raise Retry(delay=Decimal("1.5"), reason="quote pending")

    job = await priced.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("scheduled", 1)
    assert info.run_at.timestamp() == pytest.approx(clock.now() + 1.5)
    assert info.error == "Retry: quote pending"


async def test_a_retry_signal_from_a_task_group_inside_the_job_keeps_its_delay(
    jobs: Jobs, clock: FakeClock
) -> None:
    async def call_api() -> None:
        raise Retry(delay=600, reason="rate limited")

    @jobs.task(retries=1)
    async def fan_out() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(call_api())

    job = await fan_out.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("scheduled", 1)
    assert info.run_at.timestamp() == pytest.approx(clock.now() + 600)
    assert info.error == "Retry: rate limited"


class Aborted(BaseException):
    """A library's own BaseException (as pytest's outcomes are), not a cancellation."""


async def test_a_job_raising_a_base_exception_fails_like_any_other(jobs: Jobs) -> None:
    @jobs.task(retries=0)
    async def abort() -> None:
        raise Aborted("gave up")

    @jobs.task(retries=0)
    async def in_a_group() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(abort())

    jobs_made = [await abort.enqueue(), await in_a_group.enqueue()]
    await drain(jobs)
    for job in jobs_made:
        info = await job.info()
        assert info.status == JobStatus.DEAD
        assert "Aborted: gave up" in (info.error or "")


async def test_timeout_counts_as_a_failure(jobs: Jobs, clock: FakeClock) -> None:
    started: list[anyio.Event] = [anyio.Event(), anyio.Event()]
    ends: list[str] = []

    @jobs.task(timeout=30, retries=1)
    async def hangs() -> None:
        started[len(ends)].set()
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            ends.append("cut off")
            raise

    job = await hangs.enqueue()

    async def at_29_then_31() -> None:
        clock.advance(29)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert ends == []  # 29 s in: still running
        clock.advance(2)

    await drain_while(jobs, started[0], at_29_then_31)
    info = await job.info()
    assert (info.status, info.attempts, ends) == ("scheduled", 1, ["cut off"])
    assert "timeout" in (info.error or "")
    clock.advance(info.run_at.timestamp() - clock.now() + 1)
    await drain_while(jobs, started[1], lambda: clock.advance(31))
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 2)
    assert "ran longer than its 30.0s timeout" in (info.error or "")


async def test_a_job_cut_off_by_its_timeout_can_still_await_its_cleanup(
    jobs: Jobs, clock: FakeClock
) -> None:
    """Its timeout cancels the job once, as asyncio.timeout() and asyncio.wait_for() do
    (and as a cancel or shutdown does here), so its ``finally`` and ``async with`` exits
    can still await: close a connection, roll back. It used to be cancelled again at
    every await of its cleanup, which left connections open and transactions pending."""
    started = anyio.Event()
    cleanup: list[str] = []

    @jobs.task(timeout=30, retries=0)
    async def holds_a_connection() -> None:
        try:
            started.set()
            await anyio.Event().wait()
        finally:
            cleanup.append("closing")
            await anyio.lowlevel.checkpoint()  # e.g. await conn.close()
            cleanup.append("closed")

    job = await holds_a_connection.enqueue()
    await drain_while(jobs, started, lambda: clock.advance(31))
    info = await job.info()
    assert (info.status, cleanup) == ("dead", ["closing", "closed"])
    assert "ran longer than its 30.0s timeout" in (info.error or "")


async def test_a_timeout_that_passes_with_the_end_of_a_sleep_cuts_the_job_off(
    jobs: Jobs, clock: FakeClock
) -> None:
    """One advance past both the timeout and the end of the job's sleep: the timeout came
    first, as it would in real time."""
    started = anyio.Event()

    @jobs.task(timeout=30, retries=0)
    async def naps() -> None:
        started.set()
        await clock.sleep(31)

    job = await naps.enqueue()
    await drain_while(jobs, started, lambda: clock.advance(40))
    assert (await job.info()).status == "dead"


@pytest.mark.parametrize("timeout", [None, 30])
async def test_a_cancelled_error_the_job_raises_itself_is_a_failure(
    jobs: Jobs, clock: FakeClock, timeout: int | None
) -> None:
    runs: list[int] = []

    @jobs.task(retries=1, timeout=timeout)
    async def awaits_a_cancelled_future() -> None:
        runs.append(current_job().attempt)
        if len(runs) > 5:  # without the fix it ran again at once, forever
            raise RuntimeError("ran again and again")
        future = asyncio.get_running_loop().create_future()
        future.cancel()  # by someone else, e.g. a connection pool giving up a request
        await future  # nobody cancelled this job: it is not shutdown, it failed

    job = await awaits_a_cancelled_future.enqueue()
    with anyio.fail_after(5):
        await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, runs) == ("scheduled", 1, [1])  # backing off
    assert "CancelledError" in (info.error or "")
    clock.advance(info.run_at.timestamp() - clock.now() + 1)
    with anyio.fail_after(5):
        await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, runs) == ("dead", 2, [1, 2])


async def test_manual_retry_of_a_dead_job_gives_one_more_attempt(jobs: Jobs) -> None:
    runs: list[int] = []

    @jobs.task(retries=0)
    async def once_broken() -> str:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first time")
        return "ok"

    job = await once_broken.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, info.max_attempts) == ("dead", 1, 1)
    assert await jobs.retry(job.id) is True
    info = await job.info()
    assert info.status == "queued"
    assert info.max_attempts >= info.attempts + 1
    assert info.finished_at is None
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, info.result) == ("succeeded", 2, "ok")
    assert await jobs.retry(job.id) is False  # only dead or cancelled jobs


async def test_manual_retry_of_a_dead_job_that_fails_again_is_dead_again(jobs: Jobs) -> None:
    @jobs.task(retries=1)
    async def broken() -> None:
        raise RuntimeError("always")

    job = await broken.enqueue()
    await drain(jobs)
    jobs.clock.advance(10)  # type: ignore[attr-defined]
    await drain(jobs)
    assert (await job.info()).status == "dead"
    await jobs.retry(job.id)
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 3)  # exactly one more attempt


# -- cancel --------------------------------------------------------------------------


async def test_cancel_a_queued_job(jobs: Jobs) -> None:
    runs: list[int] = []

    @jobs.task
    async def t() -> None:
        runs.append(1)

    job = await t.enqueue()
    assert await job.cancel() is True
    assert await job.cancel() is False
    await drain(jobs)
    info = await job.info()
    assert (info.status, runs) == ("cancelled", [])
    assert info.finished_at is not None
    assert await jobs.retry(job.id) is True  # a cancelled job can be retried
    await drain(jobs)
    assert ((await job.info()).status, runs) == ("succeeded", [1])


@pytest.mark.parametrize("timeout", [None, 30])
async def test_cancel_a_running_job_stops_it(jobs: Jobs, timeout: int | None) -> None:
    started = anyio.Event()
    stopped: list[bool] = []

    @jobs.task(timeout=timeout)
    async def long() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            stopped.append(True)
            raise

    job = await long.enqueue()
    await drain_while(jobs, started, job.cancel)
    info = await job.info()
    assert (info.status, stopped) == ("cancelled", [True])
    assert await job.cancel() is False


@pytest.mark.parametrize("retries", [0, 2])
@pytest.mark.parametrize("raises", ["an error", "Retry"])
async def test_a_running_job_whose_cleanup_raises_as_it_is_cancelled_ends_cancelled(
    jobs: Jobs, retries: int, raises: str
) -> None:
    """The cancel cuts the job off, and its cleanup raises (the connection it closes is
    gone) or asks for a retry: the job ends cancelled, as the user asked, on its last
    attempt too (not dead), with what it raised in its error."""
    started = anyio.Event()

    @jobs.task(retries=retries)
    async def long() -> None:
        started.set()
        try:
            await anyio.Event().wait()
        finally:
            if raises == "Retry":
                raise Retry(delay=5)
            raise ConnectionError("the connection was gone")

    job = await long.enqueue()
    await drain_while(jobs, started, job.cancel)
    info = await job.info()
    assert (info.status, info.attempts) == ("cancelled", 1)
    assert (
        "Retry" in (info.error or "")
        if raises == "Retry"
        else "ConnectionError" in (info.error or "")
    )


async def test_a_job_cancelled_here_while_a_claim_here_takes_it_never_runs(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands while this process's claim, committed, is on its way back: the
    job is running in the store (asked to stop) but not yet in the runner's hands. It
    must be stopped at once, as every local cancel is, not run until a heartbeat."""
    runs: list[int] = []

    @jobs.task
    async def t() -> None:
        runs.append(1)

    job = await t.enqueue()
    claimed, go = anyio.Event(), anyio.Event()
    claim = jobs.store.claim

    async def claim_then_pause(request: Any, *, now: float) -> Any:
        rows = await claim(request, now=now)
        if rows:
            claimed.set()
            await go.wait()
        return rows

    monkeypatch.setattr(jobs.store, "claim", claim_then_pause)

    async def cancel() -> None:
        assert await job.cancel() is True
        go.set()

    await drain_while(jobs, claimed, cancel)
    info = await job.info()
    assert (info.status, runs) == ("cancelled", [])


# -- ordering and queues -------------------------------------------------------------


async def test_higher_priority_first_and_fifo_within_a_priority(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(concurrency=1)
    order: list[str] = []

    @jobs.task
    async def t(name: str) -> None:
        order.append(name)

    for name, priority in [("a0", 0), ("b5", 5), ("c0", 0), ("d-1", -1), ("e5", 5), ("f9", 9)]:
        await jobs.enqueue(t.options(priority=priority), name)
    await drain(jobs)
    assert order == ["f9", "b5", "e5", "a0", "c0", "d-1"]


async def test_task_priority_is_the_default_and_options_win(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(concurrency=1)
    order: list[str] = []

    @jobs.task(priority=3)
    async def urgent(name: str) -> None:
        order.append(name)

    @jobs.task
    async def normal(name: str) -> None:
        order.append(name)

    await normal.enqueue("normal")
    await urgent.options(priority=-5).enqueue("demoted")
    await urgent.enqueue("urgent")
    await drain(jobs)
    assert order == ["urgent", "normal", "demoted"]


async def test_workers_serve_only_their_queues(make_jobs: MakeJobs) -> None:
    ran: list[str] = []

    def register(jobs: Jobs) -> None:
        @jobs.task(name="mail", queue="email")
        async def mail() -> None:
            ran.append(f"mail@{jobs.settings.queues}")

        @jobs.task(name="report")
        async def report() -> None:
            ran.append(f"report@{jobs.settings.queues}")

    email_only = make_jobs(queues=["email"])
    everything = make_jobs()
    register(email_only)
    register(everything)
    await email_only.enqueue("report")
    await email_only.enqueue("mail")
    second = await email_only.enqueue("report")
    await everything.enqueue("mail")
    await drain(email_only)
    assert ran == ["mail@('email',)", "mail@('email',)"]
    assert (await second.info()).status == "queued"
    await drain(everything)
    assert sorted(ran[2:]) == ["report@None", "report@None"]


async def test_queue_option_at_enqueue_moves_the_job(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(queues=["low"])
    ran: list[int] = []

    @jobs.task(queue="high")
    async def t(i: int) -> None:
        ran.append(i)

    await t.enqueue(1)
    await t.options(queue="low").enqueue(2)
    await drain(jobs)
    assert ran == [2]


# -- which settings apply ------------------------------------------------------------


async def test_job_enqueued_by_name_takes_the_claiming_workers_definition(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    producer = make_jobs(workers=False)
    worker = make_jobs()

    @worker.task(name="charge", retries=1)
    async def charge(amount: int) -> None:
        raise RuntimeError(f"declined {amount}")

    job = await producer.enqueue("charge", 5)
    assert (await job.info()).max_attempts == 4  # the producer's guess: default retries
    await drain(worker)
    info = await job.info()
    assert (info.status, info.attempts, info.max_attempts) == ("scheduled", 1, 2)
    clock.advance(3600)
    await drain(worker)
    info = await job.info()
    assert (info.status, info.attempts) == ("dead", 2)


async def test_options_given_at_enqueue_win_over_the_workers_definition(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    producer = make_jobs(workers=False)
    worker = make_jobs()
    started = anyio.Event()

    @producer.task(name="sync")
    async def sync_stub() -> None: ...

    @worker.task(name="sync", retries=0, timeout=1000)
    async def sync() -> None:
        started.set()
        await anyio.Event().wait()

    job = await producer.enqueue(sync_stub.options(retries=2, timeout=5))
    await drain_while(worker, started, lambda: clock.advance(6))  # the 5 s timeout applies
    info = await job.info()
    assert (info.status, info.attempts, info.max_attempts) == ("scheduled", 1, 3)
    assert "5.0s timeout" in (info.error or "")


# -- what this process cannot run ----------------------------------------------------


async def test_a_job_whose_task_is_unknown_here_is_never_claimed(jobs: Jobs) -> None:
    @jobs.task
    async def known() -> None: ...

    stranger = await jobs.enqueue("other_service.task", 1)
    mine = await known.enqueue()
    await drain(jobs)
    assert (await mine.info()).status == "succeeded"
    info = await stranger.info()
    assert (info.status, info.attempts, info.started_at) == ("queued", 0, None)


async def test_workers_with_no_task_wait_for_their_poll_when_a_delayed_job_comes_due(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    """An app that starts workers but defines no task (it enqueues for another service)
    does not wake again and again for another service's job that came due: on SQLite
    that loop never waited, and froze the app's event loop."""
    producer = make_jobs(workers=False)

    @producer.task(name="reports.build")
    async def build() -> None: ...

    app = make_jobs()
    reads = 0
    next_run_at = app.store.next_run_at

    async def counted() -> float | None:
        nonlocal reads
        reads += 1
        await anyio.lowlevel.checkpoint()  # a loop that never waits lets the test go on
        return await next_run_at()

    app.store.next_run_at = counted  # type: ignore[method-assign]
    job = await build.options(delay=10).enqueue()
    async with app:
        clock.advance(10)
        for _ in range(100):
            await anyio.lowlevel.checkpoint()
        assert reads < 5
    assert (await job.info()).status == "queued"


async def test_corrupt_payload_sends_the_job_to_dead_without_a_crash_loop(
    jobs: Jobs, db_url: str
) -> None:
    ran: list[int] = []

    @jobs.task
    async def t(i: int) -> None:
        ran.append(i)

    bad = await t.enqueue(1)
    good = await t.enqueue(2)
    run_sql(db_url, "UPDATE asyncjobs_jobs SET payload = '{not json' WHERE id = ?", (bad.id,))
    with anyio.fail_after(5):
        await drain(jobs)
    info = await bad.info()
    assert (info.status, info.attempts) == ("dead", 1)
    assert "payload cannot be decoded" in (info.error or "")
    assert (await good.info()).status == "succeeded"
    assert ran == [2]
    await drain(jobs)
    assert (await bad.info()).attempts == 1
    # Nested deeper than the decoder goes: corrupt too, not a failure to retry.
    deep = await t.enqueue(3)
    run_sql(db_url, "UPDATE asyncjobs_jobs SET payload = ? WHERE id = ?", ("[" * 100_000, deep.id))
    await drain(jobs)
    info = await deep.info()
    assert (info.status, info.attempts) == ("dead", 1)
    assert "payload cannot be decoded" in (info.error or "")
    assert ran == [2]


async def test_corrupt_options_send_the_job_to_dead_and_do_not_block_claims(
    jobs: Jobs, db_url: str
) -> None:
    @jobs.task
    async def t(i: int) -> int:
        return i

    bad = await t.options(retries=2).enqueue(1)
    good = await t.enqueue(2)
    run_sql(db_url, "UPDATE asyncjobs_jobs SET options = '{oops' WHERE id = ?", (bad.id,))
    with anyio.fail_after(5):
        await drain(jobs)
    assert (await good.info()).status == "succeeded"
    info = await bad.info()
    assert info.status == "dead"
    assert "cannot be decoded" in (info.error or "")


@pytest.mark.parametrize("stored", ['"soon"', "-1", "0", "true", "NaN", "[5]"])
async def test_a_stored_timeout_that_is_no_duration_sends_the_job_dead_unrun(
    jobs: Jobs, db_url: str, stored: str
) -> None:
    """As corrupt options: a timeout that is not a number of seconds > 0 was run with
    (no timeout at all, its alarm failing unseen, or one already past)."""
    runs: list[int] = []

    @jobs.task
    async def t(i: int) -> int:
        runs.append(i)
        return i

    bad = await t.options(timeout=30).enqueue(1)
    run_sql(
        db_url, "UPDATE asyncjobs_jobs SET options = ? WHERE id = ?",
        ('{"timeout": ' + stored + "}", bad.id),
    )  # fmt: skip
    with anyio.fail_after(5):
        await drain(jobs)
    info = await bad.info()
    assert (info.status, runs) == ("dead", [])
    assert "cannot be decoded" in (info.error or "")
    assert "timeout" in (info.error or "")


async def test_a_result_that_is_not_json_sends_the_job_dead_without_running_it_again(
    jobs: Jobs,
) -> None:
    """Its code ran to the end: a retry would repeat its side effects for nothing."""
    runs = 0

    @jobs.task(retries=3)
    async def returns_bytes() -> bytes:
        nonlocal runs
        runs += 1
        return b"raw"

    job = await returns_bytes.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts, runs) == ("dead", 1, 1)
    assert "NotSerializable: the result of task" in (info.error or "")
    assert "(decode or base64-encode it first)" in (info.error or "")


async def test_a_result_over_the_size_a_result_may_take_sends_the_job_dead(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_execution, "MAX_RESULT_BYTES", 1000)

    @jobs.task(retries=3)
    async def report(size: int) -> str:
        return "x" * size

    fits, too_large = await report.enqueue(998), await report.enqueue(999)  # + 2 quotes
    await drain(jobs)
    assert await fits.result(timeout=1) == "x" * 998
    info = await too_large.info()
    assert (info.status, info.attempts) == (JobStatus.DEAD, 1)
    assert "1001 bytes, over the 1000" in (info.error or "")


async def test_a_huge_error_is_kept_cut_to_its_start_and_end(jobs: Jobs) -> None:
    """An exception whose text is megabytes is not written whole at every attempt."""

    @jobs.task(retries=0)
    async def loud() -> None:
        raise ValueError("start " + "x" * 3_000_000 + " the end")

    job = await loud.enqueue()
    await drain(jobs)
    info = await job.info()
    assert info.status == JobStatus.DEAD
    error = info.error or ""
    assert len(error) < _execution.MAX_ERROR_CHARS + 100
    assert error.startswith("Traceback")
    assert error.rstrip().endswith("x" * 100 + " the end")  # the end names the exception
    assert "characters cut ..." in error


class UnformattableError(Exception):
    """An exception the traceback module cannot format on Python 3.11: its notes raise."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise RuntimeError("the notes of this exception cannot be read")


async def test_a_job_whose_traceback_cannot_be_formatted_still_fails_visibly(
    jobs: Jobs, clock: FakeClock
) -> None:
    """Its attempt is recorded as a failure naming what it raised: not left running,
    unexplained, until its lease expires and the job runs again."""

    @jobs.task(retries=1)
    async def odd() -> None:
        raise UnformattableError("what the job raised")

    job = await odd.enqueue()
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == (JobStatus.SCHEDULED, 1)
    assert "UnformattableError: what the job raised" in (info.error or "")
    clock.advance(3600)
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.attempts) == (JobStatus.DEAD, 2)
    assert (info.error or "").splitlines()[-1].endswith("UnformattableError: what the job raised")


async def limit_value_length(jobs: Jobs, limit: int) -> None:
    """Make the store's writing connections refuse any value over ``limit`` bytes, as
    SQLite refuses one over a gigabyte (``SQLITE_LIMIT_LENGTH``)."""
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    await store.open()
    await store._call(lambda db: db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit))
    if store._inline is not None:
        store._inline._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)


async def test_an_outcome_the_store_refuses_for_good_is_recorded_as_a_failed_attempt(
    jobs: Jobs, clock: FakeClock
) -> None:
    """It holds back neither the other outcomes nor the claims that carry them."""
    huge = True

    @jobs.task(retries=1)
    async def report() -> str:
        return "x" * (200_000 if huge else 10)

    @jobs.task
    async def small(n: int) -> int:
        return n

    await limit_value_length(jobs, 100_000)
    big = await report.enqueue()
    others = [await small.enqueue(n) for n in range(5)]
    await drain(jobs)
    assert [await job.result(timeout=1) for job in others] == list(range(5))
    info = await big.info()
    assert info.status == JobStatus.SCHEDULED, "retried after backoff, like any failure"
    assert "refused its outcome" in (info.error or "")
    assert "too big" in (info.error or "")

    clock.advance(3600)
    later = await small.enqueue(5)
    await drain(jobs)
    assert (await big.info()).status == JobStatus.DEAD, "out of attempts: dead, visible"
    assert await later.result(timeout=1) == 5

    huge = False  # fixed, then retried by hand
    assert await jobs.retry(big.id)
    await drain(jobs)
    assert await big.result(timeout=1) == "x" * 10


async def test_an_outcome_whose_writes_meet_a_locked_file_is_kept_not_failed(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the write lock past the busy timeout, then lets go: the
    store failed, not the outcome. It is written by the next write; the job ran once."""
    jobs = make_jobs()
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    store.busy_timeout = 0.02  # each refused write gives up after a few of these
    runs: list[int] = []

    @jobs.task(retries=0)
    async def work() -> str:
        runs.append(1)
        return "done"

    job = await work.enqueue()
    runner = jobs.runner
    assert await runner.claim() == 1
    with anyio.fail_after(5):
        while runner.running:
            await anyio.lowlevel.checkpoint()
    other = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    store_finish, refused = store.finish, []

    async def locked_twice(outcomes: list[Outcome], *, now: float) -> list[str]:
        try:
            return await store_finish(outcomes, now=now)
        except StoreError:
            refused.append(len(outcomes))
            other.execute("COMMIT")  # the other process's write ends just then
            raise

    monkeypatch.setattr(store, "finish", locked_twice)
    try:
        assert await runner.flush_outbox() == 0  # refused, logged, kept
    finally:
        other.close()
    assert refused == [1]  # not tried again at once, nor in pieces
    assert (await job.info()).status == JobStatus.RUNNING  # its lease covers it
    assert await runner.flush_outbox() == 1
    assert await job.result(timeout=1) == "done"
    assert runs == [1]


async def test_outcomes_written_one_at_a_time_keep_their_leases(
    make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox is written apart (one outcome is refused); a slow single write lasts
    longer than a lease, with heartbeats as usual: the others' leases hold."""
    jobs = make_jobs(visibility_timeout=60)
    runs: list[str] = []

    @jobs.task(retries=1)
    async def huge() -> str:
        runs.append("huge")
        return "x" * 200_000

    @jobs.task
    async def small() -> str:
        runs.append("small")
        return "ok"

    await limit_value_length(jobs, 100_000)
    first, second = await huge.enqueue(), await small.enqueue()
    store_finish = jobs.store.finish

    async def slow_for_huge(outcomes: list[Outcome], *, now: float) -> list[str]:
        if [o.job_id for o in outcomes] == [first.id]:
            for _ in range(4):  # 4/3 of a lease, heartbeats every third of one
                clock.advance(20)
                await jobs.runner.heartbeat_once()
            await jobs.runner.recover()  # as any worker's maintenance would
        return await store_finish(outcomes, now=now)

    monkeypatch.setattr(jobs.store, "finish", slow_for_huge)
    await drain(jobs)
    assert await second.result(timeout=1) == "ok"
    assert runs.count("small") == 1


async def while_another_process_writes(
    jobs: Jobs, clock: FakeClock, call: Callable[[], Coroutine[Any, Any, T]]
) -> T:
    """Run ``call()`` while another connection holds the write lock; the lock is held
    for 5 s of ``clock``'s time after ``call`` began, then let go."""
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.get_running_loop().create_task(call())
        await anyio.lowlevel.checkpoint()  # it reads the clock and asks for the lock
        assert not waiting.done()
        clock.advance(5)
        other.execute("COMMIT")
        with anyio.fail_after(5):
            return await waiting
    finally:
        other.close()


@pytest.mark.parametrize("synchronous", ["normal", "full"])  # on the loop, in the thread
async def test_a_claim_that_waited_for_the_write_lock_leases_from_when_it_got_it(
    make_jobs: MakeJobs, clock: FakeClock, synchronous: str
) -> None:
    """Counted from before the wait, the lease was written short by it: already expired
    under heavy contention (3.7 s stale with visibility_timeout=2), so another worker's
    recovery could take a job that was running."""
    jobs = make_jobs(visibility_timeout=2, synchronous=synchronous)

    @jobs.task
    async def work() -> None: ...

    job = await work.enqueue()
    assert await while_another_process_writes(jobs, clock, jobs.runner.claim) == 1
    row = await jobs.store.get(job.id)  # its outcome is not written yet: still leased
    assert row is not None
    assert row.status == "running"
    assert (row.started_at, row.lease_until) == (clock.now(), clock.now() + 2)


async def test_a_heartbeat_that_waited_for_the_write_lock_extends_from_when_it_got_it(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(visibility_timeout=2)

    @jobs.task
    async def work() -> None: ...

    job = await work.enqueue()
    assert await jobs.runner.claim() == 1  # held here: running, or its outcome unwritten
    await while_another_process_writes(jobs, clock, jobs.runner.heartbeat_once)
    row = await jobs.store.get(job.id)
    assert row is not None
    assert (row.status, row.lease_until) == ("running", clock.now() + 2)


@pytest.mark.parametrize("synchronous", ["normal", "full"])  # on the loop, in the thread
async def test_a_dispatched_job_whose_insert_waited_for_the_write_lock_leases_from_its_insert(
    make_jobs: MakeJobs, clock: FakeClock, synchronous: str
) -> None:
    """Counted from the enqueue call, the lease of a job inserted running was short by
    the insert's wait for another process's write lock: past visibility_timeout it was
    expired when written, for that process's lease recovery to take while it ran here."""
    jobs = make_jobs(concurrency=2, visibility_timeout=2, synchronous=synchronous)
    release = anyio.Event()

    @jobs.task(name="hold")
    async def hold() -> None:
        await release.wait()

    async with jobs:
        with anyio.fail_after(5):
            while jobs.runner._backlog:  # until its first claim found the queue empty
                await anyio.lowlevel.checkpoint()
        try:
            job = await while_another_process_writes(jobs, clock, hold.enqueue)
            row = await jobs.store.get(job.id)
            assert row is not None
            assert (row.status, row.worker) == ("running", jobs.runner.worker_id)
            assert (row.started_at, row.lease_until) == (clock.now(), clock.now() + 2)
            assert jobs.runner.running[job.id].row.lease_until == clock.now() + 2
        finally:
            release.set()
        await job.result(timeout=5)


# -- workers in the event loop -------------------------------------------------------


async def test_workers_never_exceed_the_concurrency_bound(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(concurrency=3, clock=SystemClock())
    now_running = 0
    peak = 0

    @jobs.task
    async def busy(i: int) -> int:
        nonlocal now_running, peak
        now_running += 1
        peak = max(peak, now_running)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        now_running -= 1
        return i

    made = await jobs.enqueue_many([busy.spec(i) for i in range(40)])
    async with jobs:
        results = [await job.result(timeout=10) for job in made]
    assert results == list(range(40))
    assert peak == 3


async def test_a_local_enqueue_wakes_idle_workers_at_once(make_jobs: MakeJobs) -> None:
    """The fake clock never moves, so neither the poll nor change detection can fire."""
    jobs = make_jobs(poll_interval=3600)

    @jobs.task
    async def hello(name: str) -> str:
        return f"hello {name}"

    async with jobs:
        for name in ["a", "b", "c"]:
            with anyio.fail_after(5):
                job = await hello.enqueue(name)
                assert await job.result(timeout=5) == f"hello {name}"


async def test_workers_see_jobs_another_connection_wrote(make_jobs: MakeJobs) -> None:
    """Another process's insert is seen through PRAGMA data_version, well before the poll."""
    worker = make_jobs(poll_interval=3600, clock=SystemClock())
    producer = make_jobs(workers=False, clock=SystemClock())

    @worker.task(name="ping")
    async def ping() -> str:
        return "pong"

    async with worker:
        await drain_idle(worker)
        job = await producer.enqueue("ping")
        assert await job.result(timeout=5) == "pong"


async def drain_idle(jobs: Jobs) -> None:
    """Let the claim loop reach its idle wait."""
    for _ in range(50):
        await anyio.lowlevel.checkpoint()


async def test_jobs_without_tasks_starts_and_stops(make_jobs: MakeJobs, tmp_path: Path) -> None:
    jobs = make_jobs()
    async with jobs:
        assert jobs.started
    assert not jobs.started


async def test_status_enum_compares_to_plain_strings() -> None:
    assert JobStatus("dead") is JobStatus.DEAD
    dead: str = JobStatus.DEAD
    assert dead == "dead"
    assert {s.value for s in JobStatus} == {
        "waiting", "scheduled", "queued", "running", "succeeded", "dead", "cancelled",
    }  # fmt: skip


async def until(check: Callable[[], object]) -> None:
    """Wait (loop turns, 5 s at most) until ``check()`` is true."""
    with anyio.fail_after(5):
        while not check():
            await anyio.lowlevel.checkpoint()


async def claim_again_here(jobs: Jobs, clock: FakeClock, started: list[int]) -> None:
    """The job whose attempt 0 runs here loses its lease (heartbeats fail: the store
    stalled), another process's recovery requeues it (this one's would wait for the
    attempt to end), and this worker claims it again: attempt 1 starts."""
    store: Any = jobs.store
    heartbeat = store.heartbeat

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("store unreachable")

    store.heartbeat = unreachable  # the lease is not extended
    try:
        clock.advance(jobs.settings.visibility_timeout + 1)
        await jobs.store.recover(now=clock.now())  # requeued
        jobs.runner.wake()  # this worker claims it again
        await until(lambda: started == [0, 1])
    finally:
        store.heartbeat = heartbeat


async def test_a_job_claimed_again_while_its_stale_attempt_runs_here_stops_that_attempt(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The store stalled past the lease, so recovery requeued a job that still ran here,
    and this worker claimed it again: one copy runs, the newer one, and the runner
    tracks it to its end (concurrency, shutdown)."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=0)  # a failure must not hang close
    started: list[int] = []
    stopped: list[int] = []
    gates = [anyio.Event(), anyio.Event()]

    @jobs.task(name="long")
    async def long() -> str:
        attempt = len(started)
        started.append(attempt)
        try:
            await gates[attempt].wait()
        except BaseException:
            stopped.append(attempt)
            raise
        return f"attempt {attempt}"

    async with jobs:
        job = await long.enqueue()
        await until(lambda: started == [0])
        await claim_again_here(jobs, clock, started)
        await until(lambda: stopped == [0])  # the stale attempt was stopped
        assert list(jobs.runner.running) == [job.id]
        gates[1].set()
        with anyio.fail_after(5):
            assert await job.result() == "attempt 1"
    info = await jobs.get(job.id)
    assert info is not None
    assert (info.status, info.attempts) == ("succeeded", 2)


async def test_a_stale_attempt_being_stopped_keeps_its_slot_until_it_ends(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The attempt stopped because its job was claimed again here still ran (its cleanup
    took a while) once the newer one started in its slot: a third job started beside
    them, one more than ``concurrency``."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=0)
    started: list[int] = []
    cleanup, gate = anyio.Event(), anyio.Event()
    others: list[str] = []

    @jobs.task(name="long")
    async def long() -> None:
        attempt = len(started)
        started.append(attempt)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            if attempt == 0:
                await cleanup.wait()  # stopped, it cleans up a while
            raise

    @jobs.task(name="other")
    async def other() -> None:
        others.append("ran")

    async with jobs:
        await long.enqueue()
        await until(lambda: started == [0])
        await claim_again_here(jobs, clock, started)
        job = await other.enqueue()  # both slots are taken: attempt 0 still cleans up
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        info = await job.info()
        assert (info.status, others) == ("queued", [])
        cleanup.set()
        await until(lambda: others == ["ran"])  # attempt 0 ended: its slot is free
        gate.set()


class _ClaimsOutlastThePoll(FakeClock):
    """A clock that is a second later at every read: every claim outlasts a poll
    interval of half a second."""

    def __init__(self) -> None:
        super().__init__()
        self._reads = 0

    def now(self) -> float:
        self._reads += 1
        return super().now() + self._reads


async def test_an_idle_runner_whose_poll_interval_passed_during_its_claim_lets_stop_in(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a poll interval shorter than a claim (Jobs(poll_interval=1e-6) on a real
    clock), the idle runner found its wake-up time passed and claimed again at once,
    forever: on SQLite the claim and the reads around it need not yield to the event
    loop, and outside its shielded claim the loop never did, so stop() (which cancels
    it) never ended: the process hung at shutdown, at 100% CPU."""
    jobs = make_jobs(clock=_ClaimsOutlastThePoll(), poll_interval=0.5)

    @jobs.task(name="t")
    async def t() -> None: ...

    claims = 0
    claim = jobs.store.claim

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        if claims > 1000:  # stop() starved: a failed claim makes the runner sleep (on
            # this clock, for good), so that this test goes on to fail instead of hanging
            raise StoreError("stop() starved")
        return await claim(*args, **kwargs)

    monkeypatch.setattr(jobs.store, "claim", counted)
    await jobs.start()
    await jobs.stop()
    assert claims < 1000
