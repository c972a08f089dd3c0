"""``close()`` cancelled (a bound on the app's shutdown, ``anyio.fail_after`` around
``jobs.close()``, a server's forced exit): the store still ends closed, and no write
opens it again behind its close. close() closed the store in its ``finally``,
unshielded: cancelled there, the close was cut short and the store's connections left
open (SQLite's threads keep the process from exiting). Cancelled while the workers
drain (``stop()`` shields them: they go on), the store is theirs until they end: they
close it then, after their last outcomes; an asyncio cancellation, which reaches an
await once, closed it under them instead, and their last write opened it again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import anyio
import pytest
from test_start_races import held_task, is_open, started_with_a_held_job

import asyncjobs._outbox
import asyncjobs._shutdown
from asyncjobs import Job, Jobs, JobsMiddleware
from asyncjobs.stores import Store

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncjobs._shutdown, "CLOSE_TIME", 0.3)
    monkeypatch.setattr(asyncjobs._outbox, "PAST_DEADLINE_TIME", 0.2)


async def until(check: Callable[[], object]) -> None:
    """Yield to the loop until ``check()``."""
    with anyio.fail_after(5):
        while not check():
            for _ in range(10):
                await anyio.lowlevel.checkpoint()


class StoreWatch:
    """What happens to the store from now on, in order: ``"closed"`` once a close has
    run to its end, ``"opened"`` once a use opened it (again)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        store_close, store_open = store.close, store.open

        async def close() -> None:
            await store_close()
            self.events.append("closed")

        async def open() -> None:
            was_open = is_open(store)
            await store_open()
            if not was_open:
                self.events.append("opened")

        monkeypatch.setattr(store, "close", close)
        monkeypatch.setattr(store, "open", open)


@contextlib.contextmanager
def released_at_exit(release: anyio.Event) -> Iterator[None]:
    """Set ``release`` at the block's exit: also when the test fails, else the workers'
    drain would wait for the job (the fixture's close)."""
    try:
        yield
    finally:
        release.set()


@pytest.mark.parametrize("cancel", ["cancel scope", "task.cancel()"])
async def test_a_close_cancelled_as_it_closes_the_store_still_closes_it(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, cancel: str
) -> None:
    """No workers run: the store's close, its caller cancelled as it begins, runs to its
    end; also under asyncio's own cancellation (``asyncio.timeout``, ``asyncio.run``
    ending), which an anyio shield lets through."""
    jobs = make_jobs(workers=False)
    await jobs.enqueue("t")  # opens the store
    scope = anyio.CancelScope()
    closing: list[asyncio.Task[None]] = []
    watch = StoreWatch(jobs.store, monkeypatch)
    watched_close = jobs.store.close

    async def cancelled_as_it_begins() -> None:
        if cancel == "cancel scope":
            scope.cancel()
        else:
            closing[0].cancel()
        await watched_close()

    monkeypatch.setattr(jobs.store, "close", cancelled_as_it_begins)

    async def close() -> None:
        with scope:
            await jobs.close()

    closing.append(asyncio.get_running_loop().create_task(close()))
    with anyio.fail_after(5), contextlib.suppress(asyncio.CancelledError):
        await closing[0]
    assert scope.cancel_called or closing[0].cancelled()
    assert watch.events == ["closed"]
    assert not is_open(jobs.store)


async def test_a_close_cancelled_while_it_waits_for_an_enqueue_still_closes_the_store(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enqueue in flight still gets through (within ``CLOSE_TIME``), then the store
    closes: not closed under it, and not left open."""
    jobs = make_jobs(workers=False)
    await jobs.enqueue("t")  # opens the store
    insert = jobs.store.insert
    writing, unblocked = anyio.Event(), anyio.Event()

    async def slow_insert(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await unblocked.wait()
        return await insert(*args, **kwargs)

    monkeypatch.setattr(jobs.store, "insert", slow_insert)
    watch = StoreWatch(jobs.store, monkeypatch)
    ids: list[str] = []
    closing = anyio.CancelScope()

    async def enqueue() -> None:
        ids.append((await jobs.enqueue("t")).id)

    async def close() -> None:
        with closing:
            await jobs.close()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueue)
            await writing.wait()
            tg.start_soon(close)
            for _ in range(20):  # close() waits for the enqueue by then
                await anyio.lowlevel.checkpoint()
            closing.cancel()
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            unblocked.set()
    assert closing.cancel_called
    assert len(ids) == 1
    assert watch.events == ["closed"]
    assert not is_open(jobs.store)
    monkeypatch.undo()
    assert await jobs.get(ids[0]) is not None


async def closed_once_they_ended(
    jobs: Jobs, watch: StoreWatch, monkeypatch: pytest.MonkeyPatch, job: Job[str]
) -> None:
    """The workers have ended: the store was closed once, by them, and their job's
    outcome was written before it."""
    assert watch.events == ["closed"]
    assert not is_open(jobs.store)
    monkeypatch.undo()
    assert await job.result(timeout=0) == "done"


@pytest.mark.parametrize("cancel", ["cancel scope", "task.cancel()"])
async def test_a_close_cancelled_while_the_workers_drain_closes_the_store_once_they_end(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, cancel: str
) -> None:
    """close() cancelled while a job runs, the workers draining: they go on, their store
    open, and close it once they end, after writing the job's outcome. (A cancel scope
    cut the close short, the store left open; a task's cancellation closed it under the
    workers, and their last write opened it again.) A later start() opens it again."""
    jobs = make_jobs(shutdown_timeout=600)
    held, running, release, host, job = await started_with_a_held_job(jobs)
    watch = StoreWatch(jobs.store, monkeypatch)
    with anyio.fail_after(5), released_at_exit(release):
        await running.wait()
        if cancel == "cancel scope":
            async with anyio.create_task_group() as tg:
                tg.start_soon(jobs.close)
                await until(lambda: not jobs.runner.accepting)
                tg.cancel_scope.cancel()
        else:
            closing = asyncio.get_running_loop().create_task(jobs.close())
            await until(lambda: not jobs.runner.accepting)
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            assert closing.cancelled()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert not host.done()  # draining: the job runs on
        assert watch.events == []  # not closed under them
        release.set()
        await asyncio.wait({host})
    await closed_once_they_ended(jobs, watch, monkeypatch, job)
    with anyio.fail_after(5):
        await jobs.start()
        again = await held.enqueue()
        release.set()
        assert await again.result(timeout=5) == "done"
    await jobs.close()
    assert not is_open(jobs.store)


async def test_a_start_after_a_close_cancelled_while_the_workers_drain_waits_and_reopens(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start() while the workers drain on after a cancelled close(): it waits for them
    to end (and close the store, as owed), then opens the store again and starts new
    workers, which run the jobs enqueued since."""
    jobs = make_jobs(shutdown_timeout=600)
    held, running, release = held_task(jobs)
    await jobs.start()
    old = jobs._host
    job = await held.enqueue()
    watch = StoreWatch(jobs.store, monkeypatch)
    with anyio.fail_after(5), released_at_exit(release):
        await running.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.close)
            await until(lambda: not jobs.runner.accepting)
            tg.cancel_scope.cancel()
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.start)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert jobs._host is old  # waits for the drain
            release.set()
        assert jobs.started
        assert watch.events == ["closed", "opened"]
        assert await job.result(timeout=5) == "done"
        assert await (await held.enqueue()).result(timeout=5) == "done"
    await jobs.close()
    assert not is_open(jobs.store)


@pytest.mark.parametrize("when", ["as the workers drain", "in the app's shutdown"])
async def test_a_middleware_shutdown_cancelled_still_closes_the_store(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """``JobsMiddleware``'s shutdown stops the workers, then runs the app's shutdown,
    then closes the store: cancelled before the close (a server's forced exit), nothing
    closed the store. It is closed now, at once if the workers have stopped, else by
    them, draining on, as they end."""
    jobs = make_jobs(shutdown_timeout=600)
    held, running, release = held_task(jobs)
    in_app_shutdown = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": f"{message['type']}.complete"})
        message = await receive()
        in_app_shutdown.set()
        await anyio.sleep_forever()  # until cancelled

    middleware = JobsMiddleware(app, jobs=jobs)
    to_app, inbox = anyio.create_memory_object_stream[MutableMapping[str, Any]](10)
    outbox, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](10)
    with anyio.fail_after(5), released_at_exit(release), to_app, inbox, outbox, from_app:
        async with anyio.create_task_group() as tg:
            tg.start_soon(middleware, {"type": "lifespan", "state": {}}, inbox.receive, outbox.send)
            await to_app.send({"type": "lifespan.startup"})
            assert (await from_app.receive())["type"] == "lifespan.startup.complete"
            job = await held.enqueue()
            await running.wait()
            host = jobs._host
            assert host is not None
            watch = StoreWatch(jobs.store, monkeypatch)
            await to_app.send({"type": "lifespan.shutdown"})
            if when == "as the workers drain":
                await until(lambda: not jobs.runner.accepting)
            else:
                release.set()
                await in_app_shutdown.wait()
            tg.cancel_scope.cancel()
        assert host is not None  # (a task group's exit may swallow what it raised)
        if when == "as the workers drain":
            assert not host.done()  # draining: the job runs on
            assert watch.events == []
        release.set()
        await asyncio.wait({host})
    await closed_once_they_ended(jobs, watch, monkeypatch, job)
