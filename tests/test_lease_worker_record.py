"""The worker record (``jobs.stats()["workers"]``, the dashboard's bookkeeping) is
written apart from the lease renewals: a write of it that hangs (a locked table, a
stuck connection) holds up no heartbeat, and no job is stopped for its lease."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from test_lease_loss import LEASE, settle, stop_warnings, until

import asyncjobs._leases
from asyncjobs import Jobs
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


async def test_a_worker_record_that_hangs_holds_up_no_heartbeat(
    make_jobs: MakeJobs,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's writes of the worker record hang for two leases' time, and so does
    lease recovery's (whose loop renews leases too, every half lease): the heartbeats
    renew the job's lease every interval all the same, and the job runs on."""
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
        store: Any = jobs.store
        store_record, store_heartbeat = store.record_worker, store.heartbeat
        unblocked = anyio.Event()
        records: list[float] = []
        beats: list[float] = []

        async def record_worker(*args: Any, **kwargs: Any) -> None:
            records.append(clock.now())
            await unblocked.wait()
            await store_record(*args, **kwargs)

        async def recover(*args: Any, **kwargs: Any) -> Any:
            await unblocked.wait()
            return []

        async def heartbeat(*args: Any, **kwargs: Any) -> Any:
            asked_at = clock.now()
            owned = await store_heartbeat(*args, **kwargs)
            beats.append(asked_at)  # once the store renewed the leases
            return owned

        monkeypatch.setattr(store, "record_worker", record_worker)
        monkeypatch.setattr(store, "recover", recover)
        monkeypatch.setattr(store, "heartbeat", heartbeat)
        try:
            for step in range(1, 13):  # half a heartbeat interval each: the watch wakes on time
                clock.advance(LEASE / 6)
                if step % 2 == 0:  # a heartbeat is due: it renews the lease now
                    await until(lambda: clock.now() in beats)
                await settle(jobs)
            assert records  # the worker record was tried, and hangs
            assert stop_warnings(caplog) == []
            assert jobs.runner.running[job.id].cancelled_by_user is False
            row = await jobs.store.get(job.id)
            assert row is not None
            assert row.lease_until is not None
            assert row.lease_until > clock.now() + LEASE / 2  # renewed by the heartbeats
        finally:  # else a failure above would hang shutdown's last worker record
            unblocked.set()
        release.set()
        assert await job.result(timeout=5) == "done"
    info = await job.info()
    assert (info.status, info.attempts) == ("succeeded", 1)


async def test_stop_ends_though_the_last_worker_record_hangs(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown's last worker record (stopped) hangs, under a fake clock nobody
    advances: it is given up after ``FINAL_RECORD_TIME`` of real time, and stop() ends."""
    monkeypatch.setattr(asyncjobs._leases, "FINAL_RECORD_TIME", 0.2)
    jobs = make_jobs()
    await jobs.start()
    unblocked = anyio.Event()

    async def record_worker(*args: Any, **kwargs: Any) -> None:
        await unblocked.wait()

    monkeypatch.setattr(jobs.store, "record_worker", record_worker)
    try:
        with anyio.move_on_after(3) as waited:  # real time: the fake clock stays put
            await jobs.stop()
    finally:
        unblocked.set()  # (a stop still under way ends now)
    assert not waited.cancelled_caught


async def test_start_ends_though_the_first_worker_record_hangs(
    make_jobs: MakeJobs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker record written as the workers start hangs (a locked workers table),
    under a fake clock nobody advances: it is given up after ``FIRST_RECORD_TIME`` of
    real time, start() ends (the app's startup with it), and jobs run."""
    monkeypatch.setattr(asyncjobs._leases, "FIRST_RECORD_TIME", 0.2)
    jobs = make_jobs()

    @jobs.task(name="t")
    async def t() -> str:
        return "done"

    unblocked = anyio.Event()

    async def record_worker(*args: Any, **kwargs: Any) -> None:
        await unblocked.wait()

    monkeypatch.setattr(jobs.store, "record_worker", record_worker)
    try:
        with anyio.move_on_after(3) as waited:  # real time: the fake clock stays put
            await jobs.start()
        assert not waited.cancelled_caught
        job = await t.enqueue()
        with anyio.fail_after(5):
            assert await job.result() == "done"
        assert "recording this worker" in caplog.text
    finally:
        unblocked.set()  # (a start still under way ends now)
