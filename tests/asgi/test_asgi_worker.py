"""Enqueue-only processes (``workers=False``) and the worker-only runtime ``run_worker``."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import anyio
import anyio.abc
import pytest

import asyncjobs._lifecycle
import asyncjobs._shutdown
from asyncjobs import Jobs, JobStatus, StoreError
from asyncjobs._worker import run_worker
from asyncjobs.testing import FakeClock, drain


async def test_enqueue_only_jobs_never_runs_jobs_even_when_started(
    db_url: str, clock: FakeClock
) -> None:
    ran: list[int] = []
    async with Jobs(db_url, workers=False, clock=clock) as web:

        @web.task(name="work")
        async def work(n: int) -> None:
            ran.append(n)

        job = await web.enqueue(work, 1)
        assert not web.started
        assert (await job.info()).status == JobStatus.QUEUED

    worker = Jobs(db_url, clock=clock)
    try:

        @worker.task(name="work")
        async def work_here(n: int) -> None:
            ran.append(n)

        await drain(worker)
    finally:
        await worker.close()
    assert ran == [1]


async def test_run_worker_runs_jobs_from_other_processes_and_drains_on_sigterm(
    tmp_path: Path,
) -> None:
    url = "sqlite:///" + str(tmp_path / "jobs.db")
    # The worker's module may build its Jobs with workers=False (shared with the web
    # app); run_worker runs the workers anyway.
    worker = Jobs(url, workers=False, poll_interval=0.05, shutdown_timeout=10)
    web = Jobs(url, workers=False)
    started, release = anyio.Event(), anyio.Event()

    @worker.task(name="work")
    async def work(n: int) -> int:
        started.set()
        await release.wait()
        return n * 10

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_worker, worker)
                job = await web.enqueue("work", 4)  # no local wake-up: found by polling
                await started.wait()
                os.kill(os.getpid(), signal.SIGTERM)
                while not worker._stop_requested.is_set():
                    await worker.clock.sleep(0.01)
                assert worker.started  # still draining: the running job is not cut off
                release.set()
        info = await web.get(job.id)
        assert info is not None
        assert info.status == JobStatus.SUCCEEDED
        assert info.result == 40
        assert not worker.started
        assert not worker.settings.workers  # as it was built: enqueue-only again
    finally:
        await web.close()
        await worker.close()


@pytest.mark.parametrize("cancellable", [True, False], ids=["cancellable", "in-a-thread"])
async def test_a_signal_while_the_store_opens_stops_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cancellable: bool
) -> None:
    """The store's open may wait (a lock held by another process: five busy timeouts,
    some 25 s on SQLite): SIGTERM was heard only once it gave up, and the worker then
    exited as failed ("database is locked"). It now stops at once if the wait can be
    cut short, and quietly (the failure logged) once it ends if it cannot (SQLite
    waits in its connection thread)."""
    caplog.set_level(logging.INFO, logger="asyncjobs")
    worker = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), poll_interval=0.05)

    @worker.task(name="noop")
    async def noop() -> None: ...

    opening, gave_up = anyio.Event(), anyio.Event()

    async def open_waiting_on_a_lock() -> None:
        opening.set()
        with anyio.CancelScope(shield=not cancellable):
            await gave_up.wait()
        raise StoreError("database is locked")

    worker.store.open = open_waiting_on_a_lock  # type: ignore[method-assign]
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_worker, worker)
                await opening.wait()
                os.kill(os.getpid(), signal.SIGTERM)
                try:
                    while "received SIGTERM while starting" not in caplog.text:
                        await worker.clock.sleep(0.01)
                finally:  # also on a timeout: a shielded wait would hold the test for good
                    gave_up.set()
        assert not worker.started
        assert ("database is locked" in caplog.text) is not cancellable
    finally:
        await worker.close()


async def test_a_signal_during_the_first_lease_recovery_stops_the_worker_promptly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the workers' first lease recovery hangs (a stuck connection): the
    worker stops within the stop's grace (and a try past it), not once ``START_TIME``
    (60 s) ran out. No workers started; the jobs stay for the next start."""
    caplog.set_level(logging.INFO, logger="asyncjobs")
    monkeypatch.setattr(asyncjobs._shutdown, "STOP_AT_ONCE_GRACE", 0.2)
    monkeypatch.setattr(asyncjobs._lifecycle, "PAST_START_TIME", 0.2)
    worker = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), poll_interval=0.05)

    @worker.task(name="noop")
    async def noop() -> None: ...

    recovering, unblocked = anyio.Event(), anyio.Event()

    async def recover(*args: object, **kwargs: object) -> list[object]:
        recovering.set()
        await unblocked.wait()
        return []

    monkeypatch.setattr(worker.store, "recover", recover)
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_worker, worker)
                await recovering.wait()
                os.kill(os.getpid(), signal.SIGTERM)
        assert "received SIGTERM while starting" in caplog.text
        assert not worker.started
    finally:
        unblocked.set()
        await worker.close()


async def test_run_worker_raises_when_the_workers_cannot_start(tmp_path: Path) -> None:
    worker = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), poll_interval=0.05)

    @worker.task(name="noop")
    async def noop() -> None: ...

    async def crash() -> None:
        raise RuntimeError("recovering leases broke")

    worker.runner.recover = crash  # type: ignore[method-assign]
    before = set(threading.enumerate())
    try:
        with anyio.fail_after(10), pytest.raises(RuntimeError, match="recovering leases broke"):
            await run_worker(worker)
        # The store is closed too: its connection thread would keep the process alive.
        assert not store_threads(before)
    finally:
        await worker.close()


async def test_run_worker_closes_the_store_when_the_workers_crash(tmp_path: Path) -> None:
    worker = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), poll_interval=0.05)

    @worker.task(name="noop")
    async def noop() -> None: ...

    async def heartbeat_loop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await anyio.lowlevel.checkpoint()
        raise StoreError("the store went away")

    worker.runner.heartbeat_loop = heartbeat_loop  # type: ignore[method-assign]
    before = set(threading.enumerate())
    try:
        with anyio.fail_after(10), pytest.raises(ExceptionGroup) as crashed:
            await run_worker(worker)
        assert crashed.group_contains(StoreError, match="the store went away")
        assert not store_threads(before)
    finally:
        await worker.close()


def store_threads(before: set[threading.Thread]) -> list[str]:
    """aiosqlite's connection threads started since ``before`` that do not end (they are
    not daemons: they keep the process from exiting). One that is ending gets 2 s."""
    started = set(threading.enumerate()) - before
    stores = [t for t in started if "_connection_worker_thread" in t.name]
    for thread in stores:
        thread.join(timeout=2)
    return [t.name for t in stores if t.is_alive()]
