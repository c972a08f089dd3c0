"""PostgreSQL: operations that lock the same rows from several connections at once.

Each test runs them concurrently through one store (its pool gives each its own
connection), or holds a lock open on a second connection to force the interleaving.
Before the fixes these deadlocked ("deadlock detected") or lost a job.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncjobs.stores import (
    ClaimRequest,
    JobRow,
    NewJob,
    Outcome,
    OutcomeKind,
    PostgresStore,
    Store,
    TaskLimits,
    _postgres_claim,
    open_store,
)
from asyncjobs.stores._postgres_enqueue import KEY_LOCKS

asyncpg = pytest.importorskip("asyncpg")

T0 = 1_000_000.0
REQUEST = ClaimRequest(
    worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=500, lease=60
)


def new(job_id: str, **fields: object) -> NewJob:
    values: dict[str, object] = {
        "task": "t", "queue": "default", "payload": '{"args":[],"kwargs":{}}',
        "status": "queued", "priority": 0, "run_at": T0, "max_attempts": 1,
    }  # fmt: skip
    values.update(fields)
    return NewJob(id=job_id, **values)  # type: ignore[arg-type]


async def claim_all(store: Store) -> list[JobRow]:
    rows: list[JobRow] = []
    while claimed := list(await store.claim(REQUEST, now=T0)):
        rows += claimed
    return rows


def ended(row: JobRow, kind: OutcomeKind) -> Outcome:
    return Outcome(job_id=row.id, worker="w", attempt=row.attempts, kind=kind)


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[Store]:
    opened = open_store(postgres_url)
    await opened.open()
    yield opened
    await opened.close()


FEW, MANY = KEY_LOCKS // 4, KEY_LOCKS * 2  # keys locked one by one; the lock of all keys


@pytest.mark.parametrize(("a", "b"), [(FEW, FEW), (MANY, MANY), (FEW, MANY)])
async def test_inserts_of_the_same_idempotency_keys_in_other_orders(
    store: Store, a: int, b: int
) -> None:
    for round_ in range(10):
        keys = [f"r{round_}-k{i}" for i in range(max(a, b))]

        async def insert(name: str, order: list[str]) -> None:
            await store.insert([new(f"{name}-{k}", idempotency_key=k) for k in order], now=T0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(insert, "a", keys[:a])
            tg.start_soon(insert, "b", keys[::-1][-b:])
    assert len(await store.list(limit=2000, now=T0)) == 10 * max(a, b)


@pytest.mark.parametrize("first_ends", ["succeeded", "deleted"])
async def test_a_chain_member_retried_while_the_one_before_ends_is_never_stranded(
    store: Store, first_ends: str
) -> None:
    """A member cancelled while it waited, retried by hand (it waits again for the one
    before) while that one succeeds, or, dead, is deleted: it must end released (or,
    behind a deleted one, cancelled or queued), never waiting with nothing to release it."""
    chains = 100
    rows: list[NewJob] = []
    for c in range(chains):
        rows += [new(f"x{c}", chain_next=f"y{c}"), new(f"y{c}", status="waiting")]
    await store.insert(rows, now=T0)
    firsts = {r.id: r for r in await claim_all(store)}
    for c in range(chains):
        assert await store.cancel([f"y{c}"], now=T0) == [f"y{c}"]
    if first_ends == "deleted":
        await store.finish([ended(r, OutcomeKind.DEAD) for r in firsts.values()], now=T0)

    async def end_first(c: int) -> None:
        if first_ends == "succeeded":
            await store.finish([ended(firsts[f"x{c}"], OutcomeKind.SUCCEEDED)], now=T0 + 1)
        else:
            assert await store.delete([f"x{c}"], now=T0 + 1) == 1

    async def retry(c: int) -> None:
        assert await store.retry(f"y{c}", now=T0 + 1)

    async with anyio.create_task_group() as tg:
        for c in range(chains):
            tg.start_soon(end_first, c)
            tg.start_soon(retry, c)
    for c in range(chains):
        member = await store.get(f"y{c}")
        assert member is not None
        assert member.status != "waiting", f"y{c} waits with nothing left to release it"


async def test_prune_leaves_a_job_retried_while_it_waited_for_the_row(
    store: Store, postgres_url: str
) -> None:
    """Deterministic: a retry holds the dead job's row when prune reaches it."""
    await store.insert([new("j")], now=T0)
    (row,) = await claim_all(store)
    await store.finish([ended(row, OutcomeKind.DEAD)], now=T0)
    other = await asyncpg.connect(postgres_url)
    try:
        async with other.transaction():
            await other.execute(
                "UPDATE asyncjobs_jobs SET status = 'queued', finished_at = NULL, "
                "max_attempts = 2 WHERE id = 'j'"
            )
            with anyio.fail_after(10):
                pruned = await store.prune(
                    finished_before=T0 + 1, dead_before=T0 + 1, workers_before=0, limit=10
                )
        assert pruned == 0
        revived = await store.get("j")
        assert revived is not None
        assert revived.status == "queued"
    finally:
        await other.close()


async def test_a_bulk_retry_of_dead_jobs_and_prune_at_once(store: Store) -> None:
    await store.insert([new(f"j{n:04d}") for n in range(2000)], now=T0)
    await store.finish([ended(r, OutcomeKind.DEAD) for r in await claim_all(store)], now=T0)
    counted: dict[str, int] = {"pruned": 0}

    async def retry_dead() -> None:
        counted["retried"] = await store.retry_dead(queue=None, task=None, now=T0 + 10)

    async def prune() -> None:
        while deleted := await store.prune(
            finished_before=T0 + 1, dead_before=T0 + 1, workers_before=0, limit=100
        ):
            counted["pruned"] += deleted
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(prune)
        tg.start_soon(retry_dead)
    queued = await store.list(status="queued", limit=2000, now=T0 + 10)
    assert counted["retried"] + counted["pruned"] == 2000
    assert len(queued) == counted["retried"]


async def test_a_store_transaction_ended_by_a_deadlock_runs_again(
    store: Store, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real deadlock with another connection, which the store's transaction is made
    to detect (its deadlock_timeout is the shorter): PostgreSQL rolls it back to break
    the cycle, and the store runs it again once the other transaction is through."""
    assert isinstance(store, PostgresStore)
    await store.insert([new("a"), new("b")], now=T0)
    other = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    other_pid = await other.fetchval("SELECT pg_backend_pid()")
    holds_a = anyio.Event()
    other_done = anyio.Event()
    tries = 0

    async def waits_on_a() -> bool:
        return bool(
            await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                other_pid,
            )
        )

    async def write_a_then_b(conn: Any) -> None:
        nonlocal tries
        tries += 1
        await conn.execute("SET LOCAL deadlock_timeout = '10ms'")
        if tries > 1:
            # Else the retry could take a before the other transaction, woken by the
            # rollback, does: the same deadlock again, and a third try.
            await other_done.wait()
        await conn.execute("UPDATE asyncjobs_jobs SET priority = priority + 1 WHERE id = 'a'")
        holds_a.set()
        if tries == 1:
            while not await waits_on_a():  # the other transaction now waits for a
                await anyio.lowlevel.checkpoint()
        await conn.execute("UPDATE asyncjobs_jobs SET priority = priority + 1 WHERE id = 'b'")

    async def write_b_then_a() -> None:
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '10s'")
            await other.execute("UPDATE asyncjobs_jobs SET priority = priority + 10 WHERE id = 'b'")
            await holds_a.wait()
            await other.execute("UPDATE asyncjobs_jobs SET priority = priority + 10 WHERE id = 'a'")
        other_done.set()

    try:
        with caplog.at_level("INFO", logger="asyncjobs"), anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(write_b_then_a)
                await store._transaction("test", write_a_then_b)
    finally:
        await other.close()
        await watcher.close()
    assert tries == 2
    rows = [await store.get(job_id) for job_id in "ab"]
    assert [row.priority if row else None for row in rows] == [11, 11]
    assert any("ended by a deadlock" in r.getMessage() for r in caplog.records)


async def test_a_finish_ended_by_a_deadlock_is_written_again(
    store: Store, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's write of outcomes meets another transaction holding one of its jobs'
    rows and waiting for another (as a purge does, locking in its own order): the
    write, ended by PostgreSQL to break the deadlock, is written again."""
    await store.insert([new("a"), new("b")], now=T0)
    first, second = sorted(await claim_all(store), key=lambda r: r.id)
    other = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)

    other_pid = await other.fetchval("SELECT pg_backend_pid()")

    async def finish_waits() -> bool:  # for the row of b, which the other one holds
        return bool(
            await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                other_pid,
            )
        )

    async def hold_b_then_take_a() -> None:
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '10s'")  # the finish detects
            await other.execute("UPDATE asyncjobs_jobs SET priority = 5 WHERE id = 'b'")
            holds_b.set()
            while not await finish_waits():
                await anyio.lowlevel.checkpoint()
            await other.execute("UPDATE asyncjobs_jobs SET priority = 5 WHERE id = 'a'")

    holds_b = anyio.Event()
    outcomes = [ended(first, OutcomeKind.SUCCEEDED), ended(second, OutcomeKind.SUCCEEDED)]
    try:
        with caplog.at_level("INFO", logger="asyncjobs"), anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold_b_then_take_a)
                await holds_b.wait()
                assert sorted(await store.finish(outcomes, now=T0 + 1)) == ["a", "b"]
    finally:
        await other.close()
        await watcher.close()
    assert any("finish ended by a deadlock" in r.getMessage() for r in caplog.records)
    rows = [await store.get(job_id) for job_id in "ab"]
    assert [(r.status, r.priority) if r else None for r in rows] == [("succeeded", 5)] * 2


BATCHES, MEMBERS = 6, 40


async def test_batch_members_ended_and_deleted_at_once_neither_deadlock_nor_lose_counts(
    store: Store,
) -> None:
    """Workers finish members of several batches while other transactions purge,
    discard and prune them. Each deletion adds what it took to its batch's tally
    (``tally_deleted``); none may deadlock with the workers' outcome writes or with each
    other, and every batch's on_complete gets counts that add up to the whole batch."""
    rows: list[NewJob] = []
    for b in range(BATCHES):
        rows += [new(f"m{b}-{n}", batch_id=f"cb{b}") for n in range(MEMBERS)]
        rows.append(new(f"cb{b}", task="other", status="waiting", options='{"batch_counts": true}'))
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


@pytest.mark.parametrize("earlier", ["retried by hand", "committed late"])
async def test_two_claims_at_once_never_run_two_jobs_of_a_group(
    store: Store, postgres_url: str, earlier: str
) -> None:
    """A claim of a group's job is under way (its transaction still open: the other
    connection's update) when an earlier job of the group becomes queued: a dead one
    retried by hand, or one whose insert took an earlier seq and commits only now. A
    claim at that moment sees the later job still queued; it must not take the earlier
    one, or the group runs two jobs at once."""
    assert isinstance(store, PostgresStore)
    other = await asyncpg.connect(postgres_url)
    inserting = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    other_pid = await other.fetchval("SELECT pg_backend_pid()")
    first_claim = other.transaction()
    late_insert = inserting.transaction()
    claimed: list[JobRow] = []
    done = anyio.Event()

    async def second_claim() -> None:
        claimed.extend(await store.claim(REQUEST, now=T0))
        done.set()

    async def waits_on_the_first() -> bool:
        return bool(
            await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                other_pid,
            )
        )

    try:
        if earlier == "retried by hand":
            await store.insert([new("g0", group_key="g"), new("g1", group_key="g")], now=T0)
            (dead,) = await claim_all(store)
            await store.finish([ended(dead, OutcomeKind.DEAD)], now=T0)
        else:
            await late_insert.start()
            await store.insert_with(inserting, [new("g0", group_key="g")], now=T0)
            await store.insert([new("g1", group_key="g")], now=T0)
        with anyio.fail_after(20):
            await first_claim.start()
            await other.execute(
                "UPDATE asyncjobs_jobs SET status = 'running', attempts = attempts + 1, "
                "worker = 'w1', lease_until = $1 WHERE id = 'g1'",
                T0 + 60,
            )
            if earlier == "retried by hand":
                assert await store.retry("g0", now=T0)
            else:
                await late_insert.commit()
            async with anyio.create_task_group() as tg:
                tg.start_soon(second_claim)
                while not done.is_set() and not await waits_on_the_first():
                    await anyio.lowlevel.checkpoint()
                await first_claim.commit()
    finally:
        await other.close()
        await inserting.close()
        await watcher.close()
    assert claimed == []
    assert [r.id for r in await store.list(status="running", now=T0)] == ["g1"]


@pytest.mark.parametrize("ends", ["retry", "release", "lease recovery"])
async def test_a_cancel_while_a_running_job_goes_back_to_the_queue_cancels_it(
    store: Store, postgres_url: str, ends: str
) -> None:
    """A running job fails with attempts left (or is given back at shutdown, or its
    lease is recovered) in a transaction that commits while a cancel waits for its row.
    The cancel found the job running, so it did not cancel it as a pending job; by the
    time it could ask the worker to stop, the job was pending again. It must end
    cancelled (and the cancel say so), not be left to run again."""
    assert isinstance(store, PostgresStore)
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=1, lease=60
    )
    await store.insert([new("j", max_attempts=3)], now=T0)
    (row,) = await store.claim(request, now=T0)
    cancelled: list[str] = []

    async def end_it(other: Any) -> None:
        if ends == "lease recovery":
            assert [r.id for r in await recover_with(other, T0 + 61)] == ["j"]
        else:
            kind = OutcomeKind.RETRY if ends == "retry" else OutcomeKind.RELEASE
            outcome = ended(row, kind)._replace(run_at=T0 + 30, error="boom")
            assert await finish_with(other, [outcome], T0 + 1) == {"j": kind}

    async def cancel() -> None:
        cancelled.extend(await store.cancel(["j"], now=T0 + 2))

    await while_held(postgres_url, end_it, cancel)
    assert cancelled == ["j"]
    job = await store.get("j")
    assert job is not None
    assert job.status == "cancelled"


async def while_held(
    postgres_url: str,
    hold: Callable[[Any], Awaitable[None]],
    action: Callable[[], Awaitable[None]],
) -> None:
    """Run ``action`` while another connection's open transaction holds what ``hold``
    did in it, and commit that transaction once ``action`` waits on it (or has ended)."""
    other = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    other_pid = await other.fetchval("SELECT pg_backend_pid()")
    holding = other.transaction()
    done = anyio.Event()

    async def act() -> None:
        await action()
        done.set()

    async def waits_on_it() -> bool:
        return bool(
            await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                other_pid,
            )
        )

    try:
        with anyio.fail_after(20):
            await holding.start()
            await hold(other)
            async with anyio.create_task_group() as tg:
                tg.start_soon(act)
                while not done.is_set() and not await waits_on_it():
                    await anyio.lowlevel.checkpoint()
                await holding.commit()
    finally:
        await other.close()
        await watcher.close()


async def finish_with(conn: Any, outcomes: list[Outcome], now: float) -> dict[str, str]:
    from asyncjobs.stores import _postgres_finish

    return await _postgres_finish.finish(conn, outcomes, now)


async def recover_with(conn: Any, now: float) -> list[Any]:
    from asyncjobs.stores import _postgres_admin

    return await _postgres_admin.recover(conn, now)


async def test_a_discard_of_a_batch_member_claimed_meanwhile_does_not_ask_it_to_stop(
    store: Store, postgres_url: str
) -> None:
    """A discard finds a batch member queued, and cancels it before deleting it (so its
    batch moves on); a claim commits it running meanwhile. Running jobs are not
    deleted, and the discard says so: it must not have asked the job to stop either
    (it would end cancelled though the discard did nothing), as a job in no batch or
    chain is left running."""
    assert isinstance(store, PostgresStore)
    await store.insert([new("m", batch_id="b"), new("b", status="waiting")], now=T0)
    deleted: list[int] = []

    async def claim_it(other: Any) -> None:
        await other.execute(
            "UPDATE asyncjobs_jobs SET status = 'running', attempts = 1, worker = 'w', "
            "started_at = $1, lease_until = $2 WHERE id = 'm'",
            T0,
            T0 + 60,
        )

    async def discard() -> None:
        deleted.append(await store.delete(["m"], now=T0 + 1))

    await while_held(postgres_url, claim_it, discard)
    assert deleted == [0]
    assert await store.heartbeat(["m"], worker="w", lease_until=T0 + 90) == {"m"}
    member = await store.get("m")
    assert member is not None
    assert member.status == "running"


# What a queue holds when two claims of ten meet (the request), and what each takes.
AT_ONCE = {
    # Ten jobs of no group, then twenty groups of one job: the first claim takes the ten
    # plain jobs; it read (and locked) the twenty heads too.
    "plain-then-heads": (
        [new(f"p{n}") for n in range(10)] + [new(f"h{n}", group_key=f"g{n}") for n in range(20)],
        replace(REQUEST, limit=10),
        [f"p{n}" for n in range(10)],
        [f"h{n}" for n in range(10)],
    ),
    # Thirty groups of one job: the first claim locked the first 26 (its window).
    "heads": (
        [new(f"h{n}", group_key=f"g{n}") for n in range(30)],
        replace(REQUEST, limit=10),
        [f"h{n}" for n in range(10)],
        [f"h{n}" for n in range(10, 20)],
    ),
    # Jobs on their last attempt, five of the ten claimed ahead: the first claim takes
    # five and leaves the next five (locked, though it did not take them).
    "last-attempts-ahead": (
        [new(f"p{n}") for n in range(20)],
        replace(REQUEST, limit=10, ahead=5),
        [f"p{n}" for n in range(5)],
        [f"p{n}" for n in range(5, 10)],
    ),
}


@pytest.mark.parametrize("jobs", sorted(AT_ONCE))
async def test_a_claim_at_the_same_time_as_another_takes_what_the_other_leaves(
    store: Store, postgres_url: str, jobs: str
) -> None:
    """A claim holds its rows locked until its transaction ends (a finish-and-claim's,
    or its own statement while it runs). A second claim at that moment skips them: it
    must take the next jobs in claim order that the first one looked at but did not
    take, not come back short (its worker would idle until its next poll though jobs
    wait)."""
    inserted, request, first_takes, second_takes = AT_ONCE[jobs]
    await store.insert(inserted, now=T0)
    first: list[JobRow] = []
    second: list[JobRow] = []

    async def claim_first(other: Any) -> None:
        first.extend(await _postgres_claim.claim(other, request, T0, "first"))

    async def claim_second() -> None:
        second.extend(await store.claim(replace(request, worker="w2"), now=T0))

    await while_held(postgres_url, claim_first, claim_second)
    assert [r.id for r in first] == first_takes
    assert [r.id for r in second] == second_takes
