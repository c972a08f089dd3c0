"""A stop once the workers are ready, a moment before ``start()`` returned (``asyncjobs
worker``'s SIGTERM just then, ``stop()``, a cancelled start()): they have started, so
it drains them as any stop does. Taken for a stop while starting, it stopped them at
once, cancelling the running jobs. (Stops while they start: tests/test_start_races.py.)"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from test_start_bound import STOPPED_BY, MakeJobs
from test_start_races import is_open

import asyncjobs._lifecycle
import asyncjobs._shutdown
from asyncjobs import AsyncJobsError, Jobs, StoreError
from asyncjobs._worker import run_worker


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._shutdown, "STOP_AT_ONCE_GRACE", 0.2)


def ready_once_a_job_runs(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """The workers get ready (``start()`` about to return) only once a job runs there,
    as when one runs as soon as they are ready, a moment before start() returns. The
    job sets the event returned."""
    running = anyio.Event()
    serve = jobs.runner.serve

    async def serve_then_ready(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(serve, task_status=anyio.TASK_STATUS_IGNORED))
            await running.wait()
            task_status.started()

    monkeypatch.setattr(jobs.runner, "serve", serve_then_ready)
    return running


def stopping_waits(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """Set once the stopping workers wait for their running jobs (told to stop at once,
    they cancel them right after)."""
    waiting = anyio.Event()
    wait_idle = jobs.runner.wait_idle

    async def wait_idle_seen() -> None:
        waiting.set()
        await wait_idle()

    monkeypatch.setattr(jobs.runner, "wait_idle", wait_idle_seen)
    return waiting


@contextmanager
def as_the_workers_get_ready(act: Callable[[], object]) -> Iterator[None]:
    """Calls ``act`` as the workers log that they started: they are ready, and
    ``start()`` has not returned yet."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("asyncjobs workers started"):
                act()

    handler, logger = Handler(), logging.getLogger("asyncjobs")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Held:
    """A job of task ``held``: runs until released, or cancelled (said in ``cancelled``)."""

    def __init__(self, jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = anyio.Event()
        self.cancelled = False
        self.running = ready_once_a_job_runs(jobs, monkeypatch)
        self.draining = stopping_waits(jobs, monkeypatch)

        @jobs.task(name="held")
        async def held() -> str:
            self.running.set()
            try:
                await self.released.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled = True
                raise
            return "done"

        self.task = held

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()  # also when the test fails: else stopping waits for it

    async def not_cancelled_while_draining(self) -> None:
        """The workers drain: they wait for the job (a stop at once would cancel it)."""
        await self.draining.wait()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert not self.cancelled


async def test_a_signal_once_the_workers_are_ready_drains_though_start_has_not_returned(
    make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asyncjobs worker``: SIGTERM once the workers are ready, a moment before
    ``start()`` returned (a job already running), was taken for a signal while
    starting, which cancels start(): delivered before start() returned, that stopped
    the workers at once (the job cancelled and given back); after, they were closed
    shielded, deaf to a second signal (a drain of up to shutdown_timeout that nothing
    cut short). It now drains like any first signal, and a second one stops at once."""
    caplog.set_level(logging.INFO, logger="asyncjobs")
    jobs = make_jobs(shutdown_timeout=5)
    held = Held(jobs, monkeypatch)
    job = await held.task.enqueue()
    raised: list[AsyncJobsError] = []

    async def run() -> None:
        try:
            await run_worker(jobs)
        except AsyncJobsError as error:
            raised.append(error)

    with (
        held,
        as_the_workers_get_ready(lambda: os.kill(os.getpid(), signal.SIGTERM)),
        anyio.fail_after(STOPPED_BY + 5),
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await held.not_cancelled_while_draining()
            assert "received SIGTERM: draining" in caplog.text
            os.kill(os.getpid(), signal.SIGTERM)
    assert "stopped at once on a second signal" in str(raised)
    assert "received SIGTERM while draining: stopping at once" in caplog.text
    assert held.cancelled
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", 0)  # given back, attempt unspent


async def test_a_start_cancelled_once_the_workers_are_ready_drains_them(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() cancelled once the workers are ready, before it returned (a bound on the
    app's startup running out just then), a job already running: the workers stopped
    at once, the job cancelled and given back. A stop once they are ready drains: the
    cancelled start waits for the job (within shutdown_timeout), then closes the store
    as a start that fails does."""
    jobs = make_jobs(shutdown_timeout=600)
    held = Held(jobs, monkeypatch)
    job = await held.task.enqueue()
    starting = anyio.CancelScope()

    async def start() -> None:
        with starting:
            await jobs.start()

    with held, as_the_workers_get_ready(starting.cancel), anyio.fail_after(STOPPED_BY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await held.not_cancelled_while_draining()
            held.released.set()
    assert starting.cancelled_caught
    assert not jobs.started
    assert jobs._host is None
    assert not is_open(jobs.store)
    assert await job.result(timeout=0) == "done"


async def test_a_stop_once_the_workers_are_ready_drains_and_start_succeeds(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() once the workers are ready, before start() returned, a job already
    running: the workers drain (the job finishes), and start(), whose workers did
    start, returns as it does when the stop comes a moment later."""
    jobs = make_jobs(shutdown_timeout=600)
    held = Held(jobs, monkeypatch)
    job = await held.task.enqueue()
    stops: list[asyncio.Task[None]] = []

    def stop() -> None:
        stops.append(asyncio.get_running_loop().create_task(jobs.stop()))

    with held, as_the_workers_get_ready(stop), anyio.fail_after(STOPPED_BY):
        await jobs.start()
        await held.not_cancelled_while_draining()
        held.released.set()
        await stops[0]
    assert await job.result(timeout=0) == "done"
    assert not jobs.started


def start_resumes_once_the_workers_crashed(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers crash (their heartbeat loop raises a ``StoreError``) right after they
    got ready, and ``start()`` resumes only once they have ended and a SIGTERM has been
    received (as on a busy event loop): its wait for them (``asyncio.wait`` in
    ``_lifecycle``) is held that long."""
    crash, received = anyio.Event(), anyio.Event()

    async def heartbeat_loop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await crash.wait()
        raise StoreError("the store went away")

    monkeypatch.setattr(jobs.runner, "heartbeat_loop", heartbeat_loop)
    wait = asyncio.wait

    async def held_wait(aws: Any, **kwargs: Any) -> Any:
        outcome = await wait(aws, **kwargs)
        host = jobs._host
        if crash.is_set() or host is None or host not in aws or not jobs._workers_ready.is_set():
            return outcome
        crash.set()
        await wait({host})
        os.kill(os.getpid(), signal.SIGTERM)
        await received.wait()
        return outcome

    class Received(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("received SIGTERM"):
                received.set()

    held = types.ModuleType("asyncio")
    held.__dict__.update(vars(asyncio), wait=held_wait)
    monkeypatch.setattr(asyncjobs._lifecycle, "asyncio", held)
    logger = logging.getLogger("asyncjobs")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, Received()])


async def test_a_signal_after_the_workers_crashed_before_start_resumed_makes_the_worker_fail(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asyncjobs worker``: its workers crashed right after they got ready, and SIGTERM
    came before ``start()`` resumed. Taken for a signal while starting (the crashed
    workers were not running), it cancelled start() and exited 0, the crash only logged;
    a moment later, the same crash made it exit 1. It raises the crash now."""
    jobs = make_jobs()
    start_resumes_once_the_workers_crashed(jobs, monkeypatch)
    with anyio.fail_after(STOPPED_BY), pytest.raises(ExceptionGroup) as raised:
        await run_worker(jobs)
    assert raised.group_contains(StoreError, match="the store went away")
    assert not jobs.started
