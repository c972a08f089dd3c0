"""Batches under concurrent deletion on PostgreSQL: workers finish members while other
transactions purge, discard and prune them. Each deletion adds what it took to its
batch's tally (``_postgres_sql.tally_deleted``); none may deadlock with the workers'
outcome writes or with each other, and every batch's on_complete gets counts that add
up to the whole batch."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

from asyncjobs.stores import ClaimRequest, NewJob, Outcome, OutcomeKind, TaskLimits, open_store

T0 = 1_000_000.0
BATCHES, MEMBERS = 6, 40


def new(job_id: str, **fields: object) -> NewJob:
    values: dict[str, object] = {
        "task": "t", "queue": "default", "payload": '{"args":[],"kwargs":{}}',
        "status": "queued", "priority": 0, "run_at": T0, "max_attempts": 1,
    }  # fmt: skip
    values.update(fields)
    return NewJob(id=job_id, **values)  # type: ignore[arg-type]


async def test_batch_members_ended_and_deleted_at_once_neither_deadlock_nor_lose_counts(
    postgres_url: str,
) -> None:
    store = open_store(postgres_url)
    await store.open()
    try:
        rows = []
        for b in range(BATCHES):
            rows += [new(f"m{b}-{n}", batch_id=f"cb{b}") for n in range(MEMBERS)]
            rows.append(
                new(f"cb{b}", task="other", status="waiting", options='{"batch_counts": true}')
            )
        random.Random(1).shuffle(rows)  # members of every batch side by side
        await store.insert(rows, now=T0)
        members = [r.id for r in rows if r.task == "t"]
        workers_done = anyio.Event()
        rng = random.Random(2)
        deleted_meanwhile = 0

        async def work(worker: str) -> None:
            request = ClaimRequest(
                worker=worker, tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=5,
                lease=60,
            )  # fmt: skip
            while claimed := list(await store.claim(request, now=T0)):
                rng.shuffle(claimed)
                kinds = [OutcomeKind.SUCCEEDED, OutcomeKind.SUCCEEDED, OutcomeKind.DEAD]
                outcomes = [
                    Outcome(job_id=r.id, worker=worker, attempt=r.attempts, kind=rng.choice(kinds))
                    for r in claimed
                ]
                await store.finish(outcomes, now=T0)

        async def workers() -> None:
            async with anyio.create_task_group() as tg:
                for k in range(4):
                    tg.start_soon(work, f"w{k}")
            workers_done.set()

        async def until_done(delete: Callable[[], Awaitable[int]]) -> None:
            nonlocal deleted_meanwhile
            while not workers_done.is_set():
                deleted_meanwhile += await delete()
                await anyio.lowlevel.checkpoint()

        async def purge() -> int:
            return await store.purge(status="succeeded", now=T0)

        async def discard() -> int:
            return await store.delete(rng.sample(members, 8), now=T0)

        async def prune() -> int:
            return await store.prune(
                finished_before=T0 + 1, dead_before=T0 + 1, workers_before=0, limit=7
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(workers)
            for delete in (purge, purge, discard, discard, prune):
                tg.start_soon(until_done, delete)
        assert deleted_meanwhile > 0  # while the workers ran

        for b in range(BATCHES):
            callback = await store.get(f"cb{b}")
            assert callback is not None
            assert callback.status == "queued", f"cb{b} released"
            counts = json.loads(callback.payload)["kwargs"]["batch"]
            assert counts["total"] == MEMBERS, counts
            assert counts["succeeded"] + counts["dead"] + counts["cancelled"] == MEMBERS, counts
            assert sum((await store.batch_counts(f"cb{b}")).values()) == MEMBERS
    finally:
        await store.close()
