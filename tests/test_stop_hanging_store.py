"""``stop()`` while the store hangs in a write that its deadline does not end (a stuck
connection): the claim that shutdown lets land, and the outcomes it writes, are shielded
from cancellation, so only the store's deadline ended them (``Store.set_deadline``), and
one that does not end there held ``stop()`` for good. Each is now given up
``PAST_DEADLINE_TIME`` after the deadline, as a failed write: the jobs are left with
their leases, to run again once those expire, as after a crash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from test_stop_at_once import runs_again_once_its_lease_expires

import asyncjobs._outbox
from asyncjobs import Jobs
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]

STOPS_BY = 5.0
"""Seconds a stop may take here: ``shutdown_timeout`` and ``FINAL_WRITE_TIME`` (0.3 s
each), ``PAST_DEADLINE_TIME`` (0.2 s) after each, and a loaded machine's delays."""


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 0.3)
    monkeypatch.setattr(asyncjobs._outbox, "PAST_DEADLINE_TIME", 0.2, raising=False)


async def until(check: Callable[[], object]) -> None:
    """Yield to the loop until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            for _ in range(10):
                await anyio.lowlevel.checkpoint()


def hanging(jobs: Jobs, monkeypatch: pytest.MonkeyPatch, *names: str) -> anyio.Event:
    """The store's ``names`` hang, deadline or not, until the event is set."""
    unblocked = anyio.Event()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await unblocked.wait()
        raise AssertionError("a write the stop gave up on went on")

    for name in names:
        monkeypatch.setattr(jobs.store, name, hang)
    return unblocked


async def test_stop_ends_though_the_last_outcomes_hang(
    db_url: str, make_jobs: MakeJobs, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running job is cancelled at ``shutdown_timeout`` and its release is to be
    written, but the store's writes hang: stop() ends all the same, and the job, still
    running with its lease in the store, runs again once that expires."""
    jobs = make_jobs(shutdown_timeout=0.3)
    started, runs = anyio.Event(), []

    @jobs.task(name="t")
    async def t() -> str:
        runs.append(1)
        started.set()
        await anyio.Event().wait()
        return "never"

    await jobs.start()
    job = await t.enqueue()
    with anyio.fail_after(5):
        await started.wait()
    unblocked = hanging(jobs, monkeypatch, "finish", "finish_and_claim")
    try:
        with anyio.fail_after(STOPS_BY):  # real time: the fake clock stays put
            await jobs.stop()
    finally:
        unblocked.set()
    monkeypatch.undo()
    assert runs == [1]
    await runs_again_once_its_lease_expires(make_jobs, db_url, job, clock)


async def test_stop_ends_though_the_claim_under_way_hangs(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim is under way as the workers begin to stop, and the store hangs in it:
    shutdown lets a claim land (its jobs must reach this runner), but not for good."""
    jobs = make_jobs(shutdown_timeout=0.3)

    @jobs.task(name="t")
    async def t() -> str:
        return "done"

    await jobs.start()
    unblocked = hanging(jobs, monkeypatch, "claim", "finish_and_claim")
    try:
        jobs.runner.wake()
        await until(lambda: jobs.runner._claims_under_way)
        with anyio.fail_after(STOPS_BY):  # real time: the fake clock stays put
            await jobs.stop()
    finally:
        unblocked.set()
    assert not jobs.started
