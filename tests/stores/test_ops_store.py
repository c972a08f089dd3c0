"""Operations methods of the Store protocol on every store: stuck jobs, pruning limits,
worker upserts, filtered retry of dead jobs, delete never touching running jobs, the
last slot of a schedule read while another process writes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import anyio

from asyncjobs.stores import (
    ClaimRequest,
    NewJob,
    Outcome,
    OutcomeKind,
    SQLiteStore,
    Store,
    TaskLimits,
)
from asyncjobs.stores._ops_rows import WorkerBeat

T0 = 2_000_000.0


def new(job_id: str, **fields: Any) -> NewJob:
    values: dict[str, Any] = {
        "task": "t", "queue": "default", "payload": '{"args": [], "kwargs": {}}',
        "status": "queued", "priority": 0, "run_at": T0, "max_attempts": 1,
    }  # fmt: skip
    values.update(fields)
    return NewJob(id=job_id, **values)


async def claim_all(
    store: Store, *, now: float, lease: float = 30.0, worker: str = "w"
) -> list[str]:
    request = ClaimRequest(
        worker=worker, tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=100, lease=lease
    )
    return [row.id for row in await store.claim(request, now=now)]


async def finish(store: Store, job_id: str, kind: OutcomeKind, *, now: float) -> None:
    done = await store.finish(
        [Outcome(job_id=job_id, worker="w", attempt=1, kind=kind, error="e")], now=now
    )
    assert done == [job_id]


async def test_running_jobs_with_an_expired_lease_are_stuck(store: Store) -> None:
    await store.insert([new("s", queue="q"), new("ok", queue="q")], now=T0)
    await claim_all(store, now=T0, lease=10)
    await store.heartbeat(["ok"], worker="w", lease_until=T0 + 100)
    snap = await store.snapshot(now=T0 + 11, windows=[60], sample=10, workers_since=T0)
    assert [(s.id, s.queue, s.task, s.worker, s.attempts) for s in snap.stuck] == [
        ("s", "q", "t", "w", 1)
    ]
    assert snap.stuck[0].lease_until == T0 + 10
    assert snap.counts[("q", "t", "running")] == 2
    assert snap.stuck_counts == {("q", "t"): 1}


async def test_stuck_jobs_with_the_same_lease_end_are_listed_in_enqueue_order(
    store: Store,
) -> None:
    """One claim leases its jobs to the same end, so a worker that dies leaves them stuck
    together: in the order they were enqueued on every store, not the order the claim
    took them (priority) on one and the order the rows happen to lie in on another."""
    await store.insert([new(f"j{i}", priority=i) for i in range(5)], now=T0)
    assert await claim_all(store, now=T0, lease=10) == ["j4", "j3", "j2", "j1", "j0"]
    snap = await store.snapshot(now=T0 + 11, windows=[60], sample=10, workers_since=T0)
    assert [s.id for s in snap.stuck] == ["j0", "j1", "j2", "j3", "j4"]


async def test_the_newest_finished_jobs_sampled_are_the_last_enqueued_of_a_tie(
    store: Store,
) -> None:
    """Outcomes written together share their finish time: the timing sample's cut-off
    falls inside such a group, and takes its last enqueued jobs on every store."""
    await store.insert([new(f"j{i}", queue=f"q{i}") for i in range(5)], now=T0)
    await claim_all(store, now=T0)
    for i in (2, 0, 4, 1, 3):  # written in this order, all at one time
        await finish(store, f"j{i}", OutcomeKind.SUCCEEDED, now=T0 + 1)
    snap = await store.snapshot(now=T0 + 2, windows=[60], sample=3, workers_since=T0)
    assert [s.queue for s in snap.samples] == ["q4", "q3", "q2"]


async def test_every_stuck_job_is_counted_though_only_a_thousand_are_listed(
    store: Store,
) -> None:
    await store.insert([new(f"s{i:04}", queue="q") for i in range(1100)], now=T0)
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1100, lease=10
    )
    assert len(await store.claim(request, now=T0)) == 1100
    snap = await store.snapshot(now=T0 + 11, windows=[60], sample=10, workers_since=T0)
    assert len(snap.stuck) == 1000
    assert snap.stuck_counts == {("q", "t"): 1100}


async def test_prune_respects_the_limit_and_keeps_dead_jobs_longer(store: Store) -> None:
    ids = [f"j{n}" for n in range(5)]
    await store.insert([new(i) for i in ids], now=T0)
    await claim_all(store, now=T0)
    for i in ids[:3]:
        await finish(store, i, OutcomeKind.SUCCEEDED, now=T0 + 1)
    await finish(store, "j3", OutcomeKind.DEAD, now=T0 + 1)
    await finish(store, "j4", OutcomeKind.CANCELLED, now=T0 + 1)
    kwargs = {"finished_before": T0 + 5, "dead_before": T0, "workers_before": 0.0}
    assert await store.prune(limit=2, **kwargs) == 2
    assert await store.prune(limit=2, **kwargs) == 2
    assert await store.prune(limit=2, **kwargs) == 0
    assert [r.id for r in await store.list(now=T0 + 5)] == ["j3"]  # dead: kept longer
    kwargs["dead_before"] = T0 + 5
    assert await store.prune(limit=2, **kwargs) == 1


async def test_record_worker_upserts_and_marks_a_clean_stop(store: Store) -> None:
    beat = WorkerBeat(id="w1", host="h", pid=7, started_at=T0, running=3, concurrency=8,
                      queues=None)  # fmt: skip
    await store.record_worker(beat, now=T0 + 1)
    await store.record_worker(
        WorkerBeat(id="w1", host="h", pid=7, started_at=T0, running=0, concurrency=8,
                   queues=None, stopped=True),
        now=T0 + 9,
    )  # fmt: skip
    (worker,) = (await store.snapshot(now=T0 + 10, windows=[], sample=0, workers_since=T0)).workers
    assert (worker.pid, worker.running, worker.last_seen_at, worker.stopped_at) == (
        7, 0, T0 + 9, T0 + 9,
    )  # fmt: skip
    assert worker.queues is None
    assert await store.prune(finished_before=0, dead_before=0, workers_before=T0 + 10, limit=1) == 0
    assert (await store.snapshot(now=T0, windows=[], sample=0, workers_since=0)).workers == []


async def test_retry_dead_filters_and_delete_spares_running_jobs(store: Store) -> None:
    await store.insert([new("a", queue="q1"), new("b", queue="q2"), new("r")], now=T0)
    await claim_all(store, now=T0)
    await finish(store, "a", OutcomeKind.DEAD, now=T0 + 1)
    await finish(store, "b", OutcomeKind.DEAD, now=T0 + 1)
    assert await store.retry_dead(queue="q1", task=None, now=T0 + 2) == 1
    assert await store.retry_dead(queue=None, task="other", now=T0 + 2) == 0
    a, b = await store.get("a"), await store.get("b")
    assert a is not None
    assert b is not None
    assert (a.status, b.status) == ("queued", "dead")
    assert a.max_attempts == 2  # one more attempt
    assert await store.delete(["r"], now=T0) == 0  # running
    assert await store.get("r") is not None
    assert await store.delete([], now=T0) == 0


@contextlib.asynccontextmanager
async def another_process_writing(store: Store, backend_url: str) -> AsyncIterator[None]:
    """Another connection's write under way on the store's database, until the block
    ends: SQLite's write lock (BEGIN IMMEDIATE); on PostgreSQL, a lock on the metadata
    table that every write to it waits for, and no plain read does."""
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield
        finally:
            db.close()  # rolls back
        return
    import asyncpg

    conn = await asyncpg.connect(backend_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE asyncjobs_meta IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_the_last_slot_is_read_without_waiting_for_another_processs_write(
    store: Store, backend_url: str
) -> None:
    """Each due tick of a schedule reads its last slot: a plain read, which neither
    waits for the writes of the processes sharing the store nor holds theirs up (on
    SQLite it took the file's write lock, and failed as busy while another held it)."""
    assert await store.last_slot("nightly", 1_800_000_000) == 1_800_000_000
    async with another_process_writing(store, backend_url):
        with anyio.fail_after(5):
            assert await store.last_slot("nightly") == 1_800_000_000
            assert await store.last_slot("hourly") is None
            assert await store.seen_until("nightly") is None
