"""``stop()``/``close()`` landing while ``start()`` is under way, and ``start()``
cancelled: no workers are left running either way. A close that landed once the store's
open had ended, but before the workers' task existed, found no workers to stop and
closed the store; start() then started workers, which opened the store again behind
the close. And a cancelled start (a lifespan's startup cancelled, ``asyncio.wait_for``
timing out) left its workers starting, running until a later stop or the loop's end.
Also a second start() while the first starts (either one cancelled), start() after the
workers crashed, and a start() cut short whose caller is cancelled as it closes the
store. (A stop or close during the first lease recovery: tests/test_start_bound.py; a
stop once the workers are ready: tests/test_start_ready.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from test_close_during_open import open_held
from test_start_bound import (
    GRACE,
    STOPPED_BY,
    MakeJobs,
    holding_the_jobs,
    patient_jobs,
    queued_job,
    runs_once_started,
)

import asyncjobs._shutdown
import asyncjobs.stores._opening
from asyncjobs import AsyncJobsError, Job, Jobs, StoreError, Task
from asyncjobs.stores import Store


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._shutdown, "STOP_AT_ONCE_GRACE", GRACE)


def is_open(store: Store) -> bool:
    held: Any = store
    return held._pool is not None if hasattr(held, "_pool") else bool(held._open)


def held_task(jobs: Jobs) -> tuple[Task[[], str], anyio.Event, anyio.Event]:
    """A task ``held`` whose job runs (the first event set then) until the second is set."""
    running, release = anyio.Event(), anyio.Event()

    @jobs.task(name="held")
    async def held() -> str:
        running.set()
        await release.wait()
        return "done"

    return held, running, release


async def started_with_a_held_job(
    jobs: Jobs,
) -> tuple[Task[[], str], anyio.Event, anyio.Event, asyncio.Task[None], Job[str]]:
    """Start ``jobs``' workers and enqueue a ``held_task`` job: the task, its two
    events (running, release), the workers' task and the job."""
    held, running, release = held_task(jobs)
    await jobs.start()
    host = jobs._host
    assert host is not None
    job = await held.enqueue()
    return held, running, release, host, job


def paused_after_open(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> tuple[anyio.Event, anyio.Event]:
    """The store's first open pauses once it has ended, before its caller goes on: set
    (the first event) then, it goes on once the second is set."""
    opened, go_on = anyio.Event(), anyio.Event()
    store_open = store.open

    async def open() -> None:
        await store_open()
        if not opened.is_set():
            opened.set()
            await go_on.wait()

    monkeypatch.setattr(store, "open", open)
    return opened, go_on


async def failed_start(
    jobs: Jobs, during: Callable[[Callable[[], object]], Awaitable[None]]
) -> BaseException:
    """Run ``during(begin)``, which calls ``begin()`` to start ``jobs`` beside it and
    sees start() under way: start() fails, and no workers run then. What it raised."""
    raised: list[BaseException] = []

    async def start() -> None:
        with pytest.raises((AsyncJobsError, StoreError)) as error:
            await jobs.start()
        raised.append(error.value)

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            await during(lambda: tg.start_soon(start))
    assert not jobs.started
    assert jobs._host is None
    return raised[0]


@pytest.mark.parametrize("workers", [True, False])
@pytest.mark.parametrize("stop", ["stop", "close"])
async def test_a_stop_once_the_store_opened_and_before_the_workers_start_cuts_start_short(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, stop: str, workers: bool
) -> None:
    """stop() or close() lands between the end of start()'s open and the workers' task:
    start() fails saying it was cut short, no workers start, the store is left closed
    (nothing opens it behind the close), and the job runs at the next start. With
    ``workers=False`` start() returned success, the store already closed behind it (its
    caller went on as if it were open); it fails the same way now."""
    jobs = make_jobs(workers=workers)
    job_id, _ = await queued_job(jobs)
    opened, go_on = paused_after_open(jobs.store, monkeypatch)

    async def stop_meanwhile(begin: Callable[[], object]) -> None:
        begin()
        await opened.wait()
        await getattr(jobs, stop)()
        go_on.set()

    error = await failed_start(jobs, stop_meanwhile)
    assert "cut short by stop() or close()" in str(error)
    assert not is_open(jobs.store)
    if workers:
        monkeypatch.undo()
        await runs_once_started(jobs, job_id)


@pytest.mark.parametrize("workers", [True, False])
async def test_a_close_that_waits_for_the_open_in_progress_leaves_no_workers(
    backend_url: str, make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, workers: bool
) -> None:
    """close() while start()'s open waits on another process (its migration lock), which
    lets go within ``OPEN_CLOSE_TIME``: the open ends, and start() then started workers
    (the close had found none), which opened the store again behind the close. Now
    start() fails, and the store stays closed. (With no workers, start() returned
    success, the store closed behind it.)"""
    monkeypatch.setattr(asyncjobs.stores._opening, "OPEN_CLOSE_TIME", STOPPED_BY)
    jobs = make_jobs(workers=workers)
    closing = anyio.Event()
    store_close = jobs.store.close

    async def close() -> None:
        closing.set()
        await store_close()

    monkeypatch.setattr(jobs.store, "close", close)

    async def close_meanwhile(begin: Callable[[], object]) -> None:
        async with anyio.create_task_group() as tg, open_held(jobs, backend_url) as waiting:
            begin()
            await waiting()
            tg.start_soon(jobs.close)
            await closing.wait()  # close() is past its stop(), closing the store

    error = await failed_start(jobs, close_meanwhile)
    assert "cut short by stop() or close()" in str(error)
    assert not is_open(jobs.store)


@pytest.mark.parametrize("how", ["task.cancel()", "cancel scope"])
async def test_a_cancelled_start_stops_the_workers_it_started(
    backend_url: str, make_jobs: MakeJobs, how: str
) -> None:
    """start() cancelled while the first lease recovery waits on another process's lock
    (a lifespan's startup cancelled, ``asyncio.wait_for`` timing out): the workers it
    started stop with it, in time, rather than running on until a later stop()."""
    jobs = patient_jobs(make_jobs, backend_url)
    job_id, _ = await queued_job(jobs)
    async with holding_the_jobs(jobs.store, backend_url):
        with anyio.fail_after(STOPPED_BY):
            if how == "task.cancel()":
                task = asyncio.get_running_loop().create_task(jobs.start())
                while jobs._host is None:
                    await anyio.lowlevel.checkpoint()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(jobs.start)
                        while jobs._host is None:
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()
                assert scope.cancelled_caught
        assert not jobs.started
        assert jobs._host is None
    await runs_once_started(jobs, job_id)


# -- two starts at once (two lifespans entering) ---------------------------------------


def a_recovery_held(jobs: Jobs, fails: bool = False) -> tuple[anyio.Event, anyio.Event]:
    """The workers' first lease recovery waits (the first event set then) until the
    second event is set, then ends, or fails if ``fails``."""
    waiting, gate = anyio.Event(), anyio.Event()
    recover = jobs.runner.recover

    async def held() -> None:
        waiting.set()
        await gate.wait()
        if fails:
            raise RuntimeError("the recovery failed")
        await recover()

    jobs.runner.recover = held  # type: ignore[method-assign]
    return waiting, gate


async def test_a_second_start_during_the_first_lease_recovery_waits_until_the_workers_are_ready(
    make_jobs: MakeJobs,
) -> None:
    """A second ``start()`` (another lifespan entering) while the first start() was
    still in the workers' first lease recovery returned at once, the workers not ready
    (its app served, taking them for started). It now returns once they are."""
    jobs = make_jobs()
    job_id, _ = await queued_job(jobs)
    waiting, gate = a_recovery_held(jobs)
    returned: list[str] = []

    async def start(which: str) -> None:
        await jobs.start()
        returned.append(which)

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "first")
            await waiting.wait()
            tg.start_soon(start, "second")
            for _ in range(50):
                await anyio.lowlevel.checkpoint()
            assert returned == []
            gate.set()
        assert sorted(returned) == ["first", "second"]
        assert jobs._ready
        while (info := await jobs.get(job_id)) is None or info.status != "succeeded":
            await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("how", ["recovery fails", "stop()"])
async def test_a_second_start_fails_as_the_first_when_the_workers_do_not_start(
    make_jobs: MakeJobs, how: str
) -> None:
    """The workers the first ``start()`` began do not start (their first lease recovery
    failed, or a stop() cut it short): the second start(), called meanwhile, fails too,
    with the same error, rather than returning success with no workers."""
    jobs = make_jobs()
    waiting, gate = a_recovery_held(jobs, fails=how == "recovery fails")
    raised: dict[str, BaseException] = {}

    async def start(which: str) -> None:
        with pytest.raises((RuntimeError, AsyncJobsError)) as error:
            await jobs.start()
        raised[which] = error.value

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "first")
            await waiting.wait()
            tg.start_soon(start, "second")
            for _ in range(50):
                await anyio.lowlevel.checkpoint()
            if how == "stop()":
                tg.start_soon(jobs.stop)
                for _ in range(50):
                    await anyio.lowlevel.checkpoint()
            gate.set()
    expected = "the recovery failed" if how == "recovery fails" else "cut short by stop()"
    assert expected in str(raised["first"])
    assert expected in str(raised["second"])
    assert not jobs.started


async def test_a_second_start_cut_short_says_so_though_a_third_start_began_new_workers(
    make_jobs: MakeJobs,
) -> None:
    """A second ``start()`` waits on the workers the first began, and a stop() cuts them
    short; a third start() begins new workers as soon as those have ended, before the
    second has resumed. The second read the third's stop event, not set, and said "the
    workers stopped while starting"; it says it was cut short, as the first does."""
    jobs = make_jobs()
    waiting, gate = a_recovery_held(jobs)
    raised: dict[str, BaseException] = {}
    loop = asyncio.get_running_loop()
    third: list[asyncio.Task[None]] = []

    async def start(which: str) -> None:
        try:
            await jobs.start()
        except Exception as error:
            raised[which] = error

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "first")
            await waiting.wait()
            host = jobs._host
            assert host is not None
            # Called back before the second start() is woken: the third runs first.
            host.add_done_callback(lambda _: third.append(loop.create_task(start("third"))))
            tg.start_soon(start, "second")
            await checkpoints()
            tg.start_soon(jobs.stop)
            await checkpoints()
            gate.set()
        await asyncio.wait(third)
        assert "cut short by stop()" in str(raised["first"])
        assert "cut short by stop()" in str(raised["second"])
        with contextlib.suppress(Exception):
            await jobs.close()


async def checkpoints(n: int = 50) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("when", ["while they start", "once they are ready"])
async def test_a_cancelled_start_leaves_the_workers_a_second_start_joined(
    make_jobs: MakeJobs, when: str
) -> None:
    """Two starts at once (two lifespans entering), the first one cancelled (its app's
    startup cancelled, an ``asyncio.wait_for`` around it timing out): its ``_unstart``
    stopped the workers that the second, not cancelled, waits on or has returned for.
    While they started the second failed with "cut short by stop() or close()", neither
    called; once they were ready it returned success, then the first's cancellation
    drained them and closed the store. The second start() now gets running workers."""
    from test_start_ready import as_the_workers_get_ready  # which imports this module

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
    assert is_open(jobs.store)


@pytest.mark.parametrize(
    "then", ["the second is cancelled too", "the recovery fails", "the first goes on"]
)
async def test_workers_a_cancelled_start_left_to_a_second_end_with_it(
    make_jobs: MakeJobs, then: str
) -> None:
    """Of two starts at once, the one cancelled leaves the workers to the other. The
    first cancelled, the second is left to stop them and close the store: cancelled too,
    or failing as the workers do not start (nobody else would: they ran on unseen, the
    store left open). The second cancelled, the first goes on and starts them."""
    jobs = make_jobs()
    waiting, gate = a_recovery_held(jobs, fails=then == "the recovery fails")
    first, second = anyio.CancelScope(), anyio.CancelScope()
    raised: list[str] = []

    async def start(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await jobs.start()
            except RuntimeError as error:
                raised.append(str(error))

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, first)
            await waiting.wait()
            tg.start_soon(start, second)
            await checkpoints()
            (second if then == "the first goes on" else first).cancel()
            await checkpoints()
            if then == "the second is cancelled too":
                second.cancel()
                await checkpoints()
            gate.set()
    if then == "the first goes on":
        assert (first.cancelled_caught, second.cancelled_caught) == (False, True)
        assert jobs.started
        assert is_open(jobs.store)
        return
    assert raised == ([] if then == "the second is cancelled too" else ["the recovery failed"])
    assert not jobs.started
    assert jobs._host is None
    assert not is_open(jobs.store)


# -- start() after the workers crashed --------------------------------------------------


def crashing_heartbeats(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """The workers' heartbeat loop raises a ``StoreError`` ("the store went away"), a
    crash, once the event returned is set."""
    crash = anyio.Event()

    async def heartbeat_loop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await crash.wait()
        raise StoreError("the store went away")

    monkeypatch.setattr(jobs.runner, "heartbeat_loop", heartbeat_loop)
    return crash


async def start_then_crash(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start ``jobs``' workers, then crash them (``crashing_heartbeats``) and wait until
    they have ended; the loop is put back for the next start."""
    heartbeats = jobs.runner.heartbeat_loop
    crash = crashing_heartbeats(jobs, monkeypatch)
    await jobs.start()
    crash.set()
    host = jobs._host
    assert host is not None
    await asyncio.wait({host})
    monkeypatch.setattr(jobs.runner, "heartbeat_loop", heartbeats)


async def test_start_after_the_workers_crashed_says_so_until_stop_reports_the_crash(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers crashed (a loop of theirs raised); they are kept for ``stop()`` to
    raise why. ``start()`` then did nothing, returning success with no workers running
    (no job ran). It now fails, naming the crash and telling to call stop() first; once
    stop() has raised the crash, start() starts new workers."""
    jobs = make_jobs()
    await queued_job(jobs)
    with anyio.fail_after(STOPPED_BY):
        await start_then_crash(jobs, monkeypatch)
        job = await jobs.enqueue("t")
        with pytest.raises(AsyncJobsError, match="crashed") as refused:
            await jobs.start()
        assert "StoreError: the store went away" in str(refused.value)
        assert "stop()" in str(refused.value)
        assert not jobs.started
        with pytest.raises(ExceptionGroup) as crashed:
            await jobs.stop()
        assert crashed.group_contains(StoreError, match="the store went away")
        await jobs.start()
        assert await job.result(timeout=5) == "done"


async def test_a_start_during_whose_open_the_workers_crash_refuses_them(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers crashed while a second ``start()`` (another lifespan entering) opened
    the store: it joined them once the open ended and, their ready event set, returned
    success with no workers running (its app served, no job ran). It now refuses them
    as a start() called after the crash does."""
    jobs = make_jobs()
    crash = crashing_heartbeats(jobs, monkeypatch)
    await jobs.start()
    host = jobs._host
    assert host is not None
    opened, go_on = paused_after_open(jobs.store, monkeypatch)
    raised: list[BaseException] = []

    async def start() -> None:
        with pytest.raises(AsyncJobsError) as refused:
            await jobs.start()
        raised.append(refused.value)

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await opened.wait()
            crash.set()
            await asyncio.wait({host})
            go_on.set()
        assert "crashed (StoreError: the store went away)" in str(raised[0])
        assert "call `await jobs.stop()` first" in str(raised[0])
        with pytest.raises(ExceptionGroup):
            await jobs.stop()


async def test_drain_after_the_workers_crashed_says_they_crashed(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() after the workers crashed (kept for ``stop()`` to raise why) refused with
    "drain() is for a Jobs whose workers are not started": they were not running. It now
    says they crashed, and why, and to call stop() first; after it, drain() runs."""
    jobs = make_jobs()
    await queued_job(jobs)
    with anyio.fail_after(STOPPED_BY):
        await start_then_crash(jobs, monkeypatch)
        with pytest.raises(AsyncJobsError) as refused:
            await jobs.drain()
        message = str(refused.value)
        assert "are not started" not in message
        assert "crashed (StoreError: the store went away)" in message
        assert "call `await jobs.stop()` first" in message
        assert message.startswith("drain():")
        with pytest.raises(ExceptionGroup):
            await jobs.stop()
        job = await jobs.enqueue("t")
        await jobs.drain()
        assert await job.result(timeout=0) == "done"


@pytest.mark.parametrize("when", ["before stop()", "while stop() waits"])
@pytest.mark.parametrize("call", ["stop", "close"])
async def test_stop_after_the_workers_task_was_cancelled_says_so_and_is_not_cancelled(
    make_jobs: MakeJobs, call: str, when: str
) -> None:
    """The workers' task was cancelled in this event loop, not by a stop(): stop() (and
    close()) raised its ``CancelledError`` to a caller nobody cancelled, which anyio and
    asyncio take for the caller's own cancellation (a lifespan's shutdown aborted). It
    now raises ``AsyncJobsError`` saying so, as start() refuses them meanwhile; the
    running job was given back, and start() then starts new workers, which run it."""
    jobs = make_jobs(shutdown_timeout=600)
    _, running, release, host, job = await started_with_a_held_job(jobs)
    with anyio.fail_after(STOPPED_BY):
        await running.wait()
        if when == "before stop()":
            host.cancel()
            await asyncio.wait({host})
            with pytest.raises(AsyncJobsError, match="were cancelled"):
                await jobs.start()
            with pytest.raises(AsyncJobsError, match="were cancelled") as raised:
                await getattr(jobs, call)()
        else:
            stopping = asyncio.get_running_loop().create_task(getattr(jobs, call)())
            while jobs.runner.accepting:
                await anyio.lowlevel.checkpoint()
            host.cancel()
            with pytest.raises(AsyncJobsError, match="were cancelled") as raised:
                await stopping
        assert "not by stop()" in str(raised.value)
        assert jobs._host is None
        if call == "close":
            assert not is_open(jobs.store)
        release.set()
        await jobs.start()
        assert await job.result(timeout=5) == "done"
    await jobs.stop()


@pytest.mark.parametrize("which", ["start()", "a second start()"])
async def test_a_start_whose_workers_task_is_cancelled_as_they_start_fails_and_is_not_cancelled(
    make_jobs: MakeJobs, which: str
) -> None:
    """The workers' task cancelled during their first lease recovery (not by a stop, nor
    by cancelling start()): start(), and a second start() waiting for the same workers,
    raised its ``CancelledError`` to callers nobody cancelled (an app's startup taken
    for cancelled). It fails with ``AsyncJobsError`` now, and a start() after runs."""
    jobs = make_jobs()
    job_id, _ = await queued_job(jobs)
    waiting, gate = a_recovery_held(jobs)
    raised: list[BaseException] = []

    async def start() -> None:
        try:
            await jobs.start()
        except BaseException as error:  # CancelledError too: nobody cancelled this call
            raised.append(error)

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await waiting.wait()
            if which == "a second start()":
                tg.start_soon(start)
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
            host = jobs._host
            assert host is not None
            host.cancel()
        gate.set()
        assert len(raised) == (2 if which == "a second start()" else 1)
        for error in raised:
            assert isinstance(error, AsyncJobsError), repr(error)
            assert "cancelled" in str(error)
        assert not jobs.started
        assert jobs._host is None  # forgotten: start() has said why
        await runs_once_started(jobs, job_id)


# -- a start() cut short, cancelled as it closes the store ------------------------------


class CancelledAsItCloses:
    """The store's close cancels the caller's ``scope`` as it begins (a bound on the
    app's startup running out then), and notes whether it ran to its end."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scope = anyio.CancelScope()
        self.closed = False
        store_close = store.close

        async def close() -> None:
            self.scope.cancel()
            await store_close()
            self.closed = True

        monkeypatch.setattr(store, "close", close)


@pytest.mark.parametrize("when", ["during the open", "during the first recovery"])
async def test_a_start_cut_short_and_cancelled_as_it_closes_the_store_closes_it(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """start() cut short by stop() (during the store's open, or the workers' first lease
    recovery) closes the store, as a failing start does; its caller cancelled then
    cut that close short, unshielded, leaving the store's connections open (SQLite's
    threads keep the process from exiting). The close is shielded now, as a cancelled
    start's is."""
    jobs = make_jobs()
    await queued_job(jobs)
    if when == "during the open":
        opened, go_on = paused_after_open(jobs.store, monkeypatch)
    else:
        opened, go_on = a_recovery_held(jobs)
    closing = CancelledAsItCloses(jobs.store, monkeypatch)

    async def start() -> None:
        # Cut short, then cancelled: it raises either (the close is what matters here).
        with closing.scope, contextlib.suppress(AsyncJobsError):
            await jobs.start()

    with anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await opened.wait()
            tg.start_soon(jobs.stop)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            go_on.set()
    assert closing.scope.cancel_called
    assert closing.closed
    assert not jobs.started
