"""The PostgreSQL store's LISTEN connection is one more connection than the pool: when
it cannot be opened, workers poll, and the store itself keeps working."""

from __future__ import annotations

import time
from typing import Any

import anyio
import asyncpg
import pytest

from asyncjobs import Jobs, JobSpec
from asyncjobs.stores import ClaimRequest, JobRow, open_store
from asyncjobs.testing import FakeClock


async def test_a_listener_that_cannot_connect_leaves_the_store_working(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(postgres_url)
    await store.open()
    try:
        assert await store.get("nope") is None  # the pool is open

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise asyncpg.TooManyConnectionsError("sorry, too many clients already")

        monkeypatch.setattr(asyncpg, "connect", refuse)  # the server is at max_connections
        assert await store.changed() is False  # no listener: the runner polls
        assert await store.get("nope") is None  # the pool still answers
        assert await store.next_run_at() is None
        monkeypatch.undo()
        # The listener is tried again after its own short backoff, and then hears.
        deadline = time.monotonic() + 5  # noqa: TID251 - the backoff is on the loop's clock
        while not await store.changed():
            assert time.monotonic() < deadline, "the listener never reconnected"  # noqa: TID251
            await anyio.sleep(0.05)  # noqa: TID251 - waiting out a real backoff
    finally:
        await store.close()


async def test_a_notify_wakes_idle_workers_at_once_not_at_their_next_look(
    postgres_url: str,
) -> None:
    """Another process's enqueue NOTIFYs: the idle runner claims on hearing it. Its
    clock here never moves, so it would never look again on its own (with a real
    clock it looked every 0.1 s: up to 100 ms of pickup latency across processes)."""
    workers = Jobs(postgres_url, clock=FakeClock(), poll_interval=60)
    web = Jobs(postgres_url, workers=False)

    @workers.task(name="ping")
    async def ping(n: int) -> int:
        return n + 1

    async with workers:
        job = await web.enqueue("ping", 41)
        try:
            with anyio.fail_after(10):
                assert await job.result() == 42
        finally:
            await web.close()


async def test_only_other_connections_inserts_wake_the_runner(postgres_url: str) -> None:
    """A store's own inserts do not wake its runner (the enqueue woke it, or gave it the
    job, already: a wake would be an empty claim per enqueue); another's do."""
    own, other = Jobs(postgres_url, workers=False), Jobs(postgres_url, workers=False)
    woken: list[str] = []
    try:
        assert own.store.on_change(lambda: woken.append("woken")) is True
        await own.store.open()
        await own.store.changed()  # opens the LISTEN connection
        await own.enqueue("t", 1)  # through its enqueue connection
        await own.enqueue_many([JobSpec(task="t", args=(n,)) for n in range(2)])
        # The listener's backend hands over the notifications before its next answer.
        await own.store._listener.fetchval("SELECT 1")  # type: ignore[attr-defined]
        assert await own.store.changed() is False  # nor would the runner claim again
        await other.enqueue("t", 2)  # heard after the others: one listener, in order
        with anyio.fail_after(10):
            while not woken:
                await anyio.lowlevel.checkpoint()
        assert woken == ["woken"]
    finally:
        own.store.on_change(None)
        await own.close()
        await other.close()


async def test_the_listener_is_open_before_the_first_claim(postgres_url: str) -> None:
    """Opening the listener calls for a look at the store (what was written before it
    listened went unheard): the first claim is that look. Opened at the first idle wait,
    after that claim, it cost an empty claim at every start."""
    workers = Jobs(postgres_url, clock=FakeClock(), poll_interval=60)
    store: Any = workers.store
    listening: list[bool] = []
    claim = store.claim

    async def spy_claim(request: ClaimRequest, *, now: float) -> list[JobRow]:
        listening.append(store._listener is not None)
        rows: list[JobRow] = await claim(request, now=now)
        return rows

    store.claim = spy_claim

    @workers.task(name="ping")
    async def ping() -> None:
        return None

    async with workers:
        with anyio.fail_after(10):
            while not listening:
                await anyio.lowlevel.checkpoint()
    assert listening[0] is True
