"""``close()`` while the store hangs (a stuck connection, a write its deadline does not
end): it waits for the enqueues in flight, and closes the store, within bounds, so that
a web app's shutdown, and ``asyncjobs worker``'s exit, ends. An enqueue it gave up on
fails in its caller, named in the log, instead of hanging; one that gets through in
time is waited for."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import asyncjobs._outbox
import asyncjobs._shutdown
from asyncjobs import Jobs, StoreError, Task
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]
Enqueuing = tuple[Jobs, Task[[], None]]

CLOSES_BY = 5.0
"""Seconds a close may take here: ``CLOSE_TIME`` (0.3 s) and ``PAST_DEADLINE_TIME``
(0.2 s) after it, and a loaded machine's delays."""


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._shutdown, "CLOSE_TIME", 0.3, raising=False)
    monkeypatch.setattr(asyncjobs._outbox, "PAST_DEADLINE_TIME", 0.2)


@pytest.fixture
async def enqueuing(make_jobs: MakeJobs) -> Enqueuing:
    """An enqueue-only ``Jobs`` with a task ``t``, its store open."""
    jobs = make_jobs(workers=False)

    @jobs.task(name="t")
    async def t() -> None:
        pass

    await jobs.store.open()
    return jobs, t


async def until(check: Callable[[], object]) -> None:
    """Yield to the loop until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            for _ in range(10):
                await anyio.lowlevel.checkpoint()


def inserts_hang(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """The store's inserts hang, deadline or not, until the event is set."""
    unblocked = anyio.Event()

    async def insert(*args: Any, **kwargs: Any) -> Any:
        await unblocked.wait()
        raise AssertionError("an insert close() gave up on went on")

    monkeypatch.setattr(jobs.store, "insert", insert)
    return unblocked


@pytest.mark.parametrize("keyed", [False, True], ids=["group-commit", "keyed"])
async def test_close_gives_up_on_an_enqueue_that_hangs_and_its_caller_hears_of_it(
    enqueuing: Enqueuing,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    keyed: bool,
) -> None:
    """Under a fake clock nobody advances: close() ends shortly after ``CLOSE_TIME`` of
    real time, the enqueue's caller gets ``StoreError``, and the log names the job."""
    jobs, t = enqueuing
    unblocked = inserts_hang(jobs, monkeypatch)
    heard: list[BaseException] = []

    async def enqueue() -> None:
        try:
            if keyed:
                await t.options(idempotency_key="k").enqueue()
            else:
                await t.enqueue()
        except StoreError as error:
            heard.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enqueue)
        try:  # in the group: a hanging enqueue would hold its exit
            await until(lambda: not (jobs._inserts.idle and jobs._keyed_inserts.idle))
            with anyio.fail_after(CLOSES_BY), caplog.at_level(logging.ERROR, "asyncjobs"):
                await jobs.close()
            with anyio.fail_after(CLOSES_BY):
                await until(lambda: heard)
        finally:
            unblocked.set()
    assert "gave up on it" in str(heard[0])
    given_up = [r for r in caplog.records if "gave up on the enqueue of job" in r.message]
    assert len(given_up) == 1
    assert getattr(given_up[0], "task", None) == "t"
    assert getattr(given_up[0], "job_id", None)


async def test_close_waits_for_an_enqueue_that_gets_through(
    enqueuing: Enqueuing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enqueue in flight whose write comes back while close() waits is written, and
    its caller gets its job: nothing committed is given up on."""
    jobs, t = enqueuing
    insert = jobs.store.insert
    unblocked, waiting = anyio.Event(), anyio.Event()

    async def slow_insert(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        await unblocked.wait()
        return await insert(*args, **kwargs)

    monkeypatch.setattr(jobs.store, "insert", slow_insert)
    ids: list[str] = []

    async def enqueue() -> None:
        ids.append((await t.enqueue()).id)

    async def let_it_through() -> None:
        await waiting.wait()
        for _ in range(10):  # close() is waiting by then
            await anyio.lowlevel.checkpoint()
        unblocked.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(enqueue)
        await until(lambda: waiting.is_set())
        tg.start_soon(let_it_through)
        with anyio.fail_after(CLOSES_BY):
            await jobs.close()
    monkeypatch.undo()
    assert len(ids) == 1
    assert await jobs.get(ids[0]) is not None
    await jobs.close()


async def test_close_gives_up_on_enqueues_queued_behind_a_write_that_hangs(
    enqueuing: Enqueuing, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An enqueue waiting in the group commit's queue behind the flush that hangs is
    given up on too (not flushed into the store being closed): both callers hear of it,
    and both jobs are named."""
    jobs, t = enqueuing
    unblocked = inserts_hang(jobs, monkeypatch)
    heard: list[BaseException] = []

    async def enqueue() -> None:
        try:
            await t.enqueue()
        except StoreError as error:
            heard.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enqueue)
        try:
            await until(lambda: not jobs._inserts.idle)
            tg.start_soon(enqueue)
            await until(lambda: jobs._inserts._queue)
            with anyio.fail_after(CLOSES_BY), caplog.at_level(logging.ERROR, "asyncjobs"):
                await jobs.close()
            with anyio.fail_after(CLOSES_BY):
                await until(lambda: len(heard) == 2)
        finally:
            unblocked.set()
    given_up = {
        getattr(r, "job_id", None)
        for r in caplog.records
        if "gave up on the enqueue of job" in r.message
    }
    assert len(given_up) == 2
    assert jobs._inserts.idle
