"""Local dispatch: a job enqueued while this process has a free slot is inserted
running and starts when the insert commits, without a claim. Jobs the store must
order or limit, jobs this process does not run, and jobs enqueued while others wait
go through the queue as before."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from asyncjobs import Jobs, NotSerializable, StoreError
from asyncjobs.stores import ClaimRequest, JobRow, Outcome
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]


def spy_claims(jobs: Jobs) -> list[str]:
    """Record the id of every job the store hands out through a claim."""
    claimed: list[str] = []
    store: Any = jobs.store
    claim, finish_and_claim = store.claim, store.finish_and_claim

    async def spy_claim(request: ClaimRequest, *, now: float) -> list[JobRow]:
        rows: list[JobRow] = await claim(request, now=now)
        claimed.extend(row.id for row in rows)
        return rows

    async def spy_finish_and_claim(
        outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        applied, rows = await finish_and_claim(outcomes, request, now=now)
        claimed.extend(row.id for row in rows)
        return applied, rows

    store.claim, store.finish_and_claim = spy_claim, spy_finish_and_claim
    return claimed


def spy_inserts(jobs: Jobs) -> list[NewJob]:
    """Record every job as the store is asked to insert it (running if dispatched)."""
    inserted: list[NewJob] = []
    store: Any = jobs.store
    insert = store.insert

    async def spy_insert(new: Sequence[NewJob], *, now: Any) -> Any:
        inserted.extend(new)
        return await insert(new, now=now)

    store.insert = spy_insert
    return inserted


def with_a_task(make_jobs: MakeJobs, url: str | None = None) -> Jobs:
    """Two slots and one no-op task, ``plain`` (on ``url``, else the test's SQLite file)."""
    jobs = make_jobs(url, concurrency=2)

    @jobs.task(name="plain")
    async def plain() -> None:
        return None

    return jobs


async def settled(jobs: Jobs) -> None:
    """Until a claim of the started workers found nothing more waiting in the store."""
    with anyio.fail_after(5):
        while jobs.runner._backlog:
            await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "with-options"])
async def test_a_job_enqueued_with_a_free_slot_runs_without_a_claim(
    make_jobs: MakeJobs, clock: FakeClock, with_options: bool
) -> None:
    jobs = make_jobs(concurrency=2)
    claimed = spy_claims(jobs)
    release = anyio.Event()

    @jobs.task(name="hold")
    async def hold(n: int) -> int:
        await release.wait()
        return n

    async with jobs:
        await settled(jobs)  # the first claim found the queue empty
        try:
            if with_options:
                job = await hold.options(priority=3, retries=1, timeout=60).enqueue(7)
            else:
                job = await hold.enqueue(7)
            row = await jobs.store.get(job.id)
            assert row is not None
            # Stored running by the insert itself: attempt 1, leased to this worker.
            assert (row.status, row.attempts, row.worker) == ("running", 1, jobs.runner.worker_id)
            assert row.started_at == row.enqueued_at == clock.now()
            assert row.lease_until == clock.now() + jobs.settings.visibility_timeout
        finally:
            release.set()  # else a failed check would wait for it at shutdown
        assert await job.result(timeout=5) == 7
    assert job.id not in claimed


async def test_enqueue_many_gives_a_free_slot_to_its_highest_priority_job(
    make_jobs: MakeJobs,
) -> None:
    """One slot free: the job that takes it at once is the one a claim would have
    picked first, the highest priority, not the first spec; the others follow by
    priority from the queue."""
    jobs = make_jobs(concurrency=1)
    inserted = spy_inserts(jobs)
    order: list[int] = []

    @jobs.task(name="p")
    async def p(n: int) -> None:
        order.append(n)

    async with jobs:
        await settled(jobs)
        handles = await jobs.enqueue_many([p.options(priority=n).spec(n) for n in (0, 5, 9)])
        assert [job.status for job in inserted] == ["queued", "queued", "running"]
        for handle in handles:
            await handle.result(timeout=5)
    assert order == [9, 5, 0]


async def test_a_dispatched_job_does_not_see_the_context_of_the_code_that_enqueued_it(
    make_jobs: MakeJobs,
) -> None:
    """The insert that dispatches a job runs in some request's task; the job itself runs
    in a copy of the workers' own context, as a claimed job does."""
    jobs = make_jobs(concurrency=2)
    claimed = spy_claims(jobs)
    request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
    seen: list[str | None] = []

    @jobs.task(name="look")
    async def look() -> None:
        seen.append(request_id.get())

    async with jobs:
        await settled(jobs)
        request_id.set("request 1")
        job = await look.enqueue()
        await job.result(timeout=5)
    assert job.id not in claimed  # dispatched, not claimed
    assert seen == [None]


async def test_writing_the_outcomes_of_dispatched_jobs_costs_no_extra_claim(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Each outcome is written with a claim for freed slots (finish_and_claim); when that
    claim found every ready job, the runner waits for its next wake-up instead of
    claiming again at once: under load that empty claim cost as much as the write.
    (PostgreSQL: nor does the opening of the LISTEN connection cost one.)"""
    jobs = with_a_task(make_jobs, backend_url)
    plain_claims: list[ClaimRequest] = []
    store: Any = jobs.store
    claim = store.claim

    async def spy_claim(request: ClaimRequest, *, now: float) -> list[JobRow]:
        plain_claims.append(request)
        rows: list[JobRow] = await claim(request, now=now)
        return rows

    async with jobs:
        await settled(jobs)
        store.claim = spy_claim
        for _ in range(5):
            job = await jobs.enqueue("plain")
            await job.result(timeout=5)  # its outcome was written: the claim loop ran
        assert plain_claims == []


@pytest.mark.parametrize(
    "enqueue",
    [
        pytest.param(lambda t: t.options(idempotency_key="k").enqueue(1), id="idempotency-key"),
        pytest.param(lambda t: t.options(group="g").enqueue(1), id="ordered-group"),
        pytest.param(lambda t: t.options(delay=0.5).enqueue(1), id="delayed"),
        pytest.param(lambda t: t.options(queue="elsewhere").enqueue(1), id="queue-not-served"),
        pytest.param(lambda t: t.jobs.enqueue("limited", 1), id="rate-limited-task"),
        pytest.param(lambda t: t.jobs.enqueue("capped", 1), id="task-concurrency"),
        pytest.param(lambda t: t.jobs.enqueue("shared", 1), id="named-limiter"),
        pytest.param(lambda t: t.options(queue="bounded").enqueue(1), id="queue-concurrency"),
    ],
)
async def test_jobs_the_store_must_order_or_limit_go_through_the_queue(
    make_jobs: MakeJobs, clock: FakeClock, enqueue: Callable[[Any], Any]
) -> None:
    jobs = make_jobs(concurrency=4, queues=["default", "bounded"])
    jobs.limiter("provider", "100/s")
    jobs.queue("bounded", concurrency=2)
    claimed = spy_claims(jobs)
    inserted = spy_inserts(jobs)

    @jobs.task(name="plain")
    async def plain(n: int) -> int:
        return n

    @jobs.task(name="limited", rate_limit="100/s")
    async def limited(n: int) -> int:
        return n

    @jobs.task(name="capped", concurrency=1)
    async def capped(n: int) -> int:
        return n

    @jobs.task(name="shared", limiter="provider")
    async def shared(n: int) -> int:
        return n

    async with jobs:
        await settled(jobs)
        job = await enqueue(plain)
        # Inserted waiting, not running (the claim that follows may already have run it).
        (new,) = [j for j in inserted if j.id == job.id]
        assert (new.status, new.worker) in (("queued", None), ("scheduled", None))
        if new.queue == "elsewhere":
            return  # no worker here serves it
        clock.advance(1)  # the delayed one is due
        jobs.runner.wake()
        assert await job.result(timeout=5) == 1
    assert job.id in claimed


async def test_a_job_enqueued_by_name_for_a_task_not_registered_here_waits(
    make_jobs: MakeJobs,
) -> None:
    jobs = with_a_task(make_jobs)
    async with jobs:
        await settled(jobs)
        job = await jobs.enqueue("another_process_runs_it")
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == ("queued", 0)


async def test_while_jobs_wait_in_the_store_a_new_one_queues_behind_them(
    make_jobs: MakeJobs, db_url: str
) -> None:
    ran: list[int] = []
    release = anyio.Event()

    def register(jobs: Jobs) -> None:
        @jobs.task(name="hold")
        async def hold(n: int) -> None:
            ran.append(n)
            await release.wait()

    producer = make_jobs(workers=False)
    register(producer)
    async with producer:
        for n in range(4):
            await producer.enqueue("hold", n)

    jobs = make_jobs(concurrency=2)
    register(jobs)
    claimed = spy_claims(jobs)
    async with jobs:
        with anyio.fail_after(5):
            while len(ran) < 2:  # a full claim: two run, two still wait in the store
                await anyio.lowlevel.checkpoint()
        try:
            late = await jobs.enqueue("hold", 4)
            info = await jobs.get(late.id)
            assert info is not None
            assert info.status == "queued"
        finally:
            release.set()
        await late.result(timeout=5)
    assert ran == [0, 1, 2, 3, 4]
    assert late.id in claimed


async def test_inside_a_caller_transaction_the_job_waits_for_the_commit(
    make_jobs: MakeJobs, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    jobs = make_jobs("sqlite:///" + str(path), concurrency=2)

    @jobs.task(name="plain")
    async def plain() -> str:
        return "done"

    claimed = spy_claims(jobs)
    async with jobs, aiosqlite.connect(path, isolation_level=None, timeout=5) as conn:
        await settled(jobs)
        await conn.execute("BEGIN IMMEDIATE")
        async with jobs.transaction(conn):
            job = await jobs.enqueue("plain")
            row = await jobs.store.get(job.id)  # another connection: not committed yet
            assert row is None
        await conn.execute("COMMIT")
        jobs.runner.wake()
        assert await job.result(timeout=5) == "done"
    assert job.id in claimed  # inserted queued, then claimed


async def test_a_dispatch_that_commits_after_shutdown_began_is_given_back_unspent(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = with_a_task(make_jobs)
    async with jobs:
        await settled(jobs)
        runner = jobs.runner
        new = NewJob(
            id="0" * 31 + "1", task="plain", queue="default", payload='{"args":[],"kwargs":{}}',
            status="running", priority=0, run_at=clock.now(), max_attempts=4,
            worker=runner.worker_id, lease=60,
        )  # fmt: skip
        assert runner.reserve(new.id)
        inserted = await jobs.store.insert([new], now=clock.now())
        runner.stop_accepting()  # shutdown starts while the insert was under way
        runner.dispatched([new], inserted)
        assert not runner.running
        await runner.flush_outbox()
    row = await jobs.store.get(new.id)
    assert row is not None
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None)


async def test_a_dispatch_that_commits_after_the_workers_stopped_is_given_back_at_once(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The insert outlasts shutdown_timeout (say it waits on another process's lock):
    the workers' last write is past when it commits, so the enqueue gives it back."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=1)

    @jobs.task(name="once", retries=0)
    async def once() -> None:
        return None

    await jobs.start()
    await settled(jobs)
    store: Any = jobs.store
    insert, release = store.insert, anyio.Event()

    async def slow_insert(new: Sequence[NewJob], *, now: float) -> Any:
        await release.wait()
        return await insert(new, now=now)

    store.insert = slow_insert
    with anyio.fail_after(5):
        enqueue = asyncio.create_task(jobs.enqueue(once))
        while not jobs.runner._reserved:  # dispatched to a free slot, insert under way
            await anyio.lowlevel.checkpoint()
        stopping = asyncio.create_task(jobs.stop())
        await anyio.wait_all_tasks_blocked()
        clock.advance(1)  # shutdown_timeout passes; the workers stop
        await stopping
        assert not jobs.started
        release.set()
        job = await enqueue
    row = await jobs.store.get(job.id)
    assert row is not None
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None)


async def test_an_enqueue_many_refused_part_way_frees_the_slots_it_reserved(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(concurrency=1, shutdown_timeout=0)  # a leaked slot must not hang close

    @jobs.task(name="echo")
    async def echo(value: Any) -> Any:
        return value

    async with jobs:
        await settled(jobs)
        # The first spec takes the only slot before the second is found not to be JSON.
        with pytest.raises(NotSerializable, match="argument 0"):
            await jobs.enqueue_many([echo.spec(1), echo.spec(object())])
        assert not jobs.runner._reserved
        job = await echo.enqueue(2)  # the slot is free: it runs
        with anyio.fail_after(5):
            assert await job.result() == 2
        rows = await jobs.store.list(now=jobs.clock.now())
    assert [row.id for row in rows] == [job.id]  # nothing of the refused call was written


async def test_an_enqueue_many_with_a_keyed_job_runs_every_job_and_keeps_no_slot(
    make_jobs: MakeJobs,
) -> None:
    """A keyed job takes its enqueue_many out of the group commit, which is what starts
    jobs inserted running: the unkeyed ones beside it go through the queue instead of
    waiting, running but unstarted, for their leases to expire."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=0)  # a leaked slot must not hang close
    inserted = spy_inserts(jobs)

    @jobs.task(name="echo")
    async def echo(value: Any) -> Any:
        return value

    async with jobs:
        await settled(jobs)
        plain, keyed = await jobs.enqueue_many(
            [echo.spec(1), echo.options(idempotency_key="k").spec(2)]
        )
        assert [(j.status, j.worker) for j in inserted] == [("queued", None)] * 2
        with anyio.fail_after(5):
            assert (await plain.result(), await keyed.result()) == (1, 2)
        assert not jobs.runner._reserved


async def test_an_enqueue_cancelled_by_asyncio_mid_flush_still_runs_the_batch(
    make_jobs: MakeJobs,
) -> None:
    """``asyncio.timeout`` around one enqueue cancels its task natively: the flush it
    leads still ends, the rows it wrote (inserted running here) are run, and the other
    caller of the batch gets its job, not that cancellation."""
    jobs = make_jobs(concurrency=4)
    ran: list[int] = []
    both_ran = anyio.Event()

    @jobs.task(name="once", retries=0)
    async def once(n: int) -> None:
        ran.append(n)
        if len(ran) == 2:
            both_ran.set()

    async with jobs:
        await settled(jobs)
        store: Any = jobs.store
        insert, release, waiting = store.insert, anyio.Event(), anyio.Event()

        async def slow_insert(new: Sequence[NewJob], *, now: float) -> Any:
            waiting.set()
            await release.wait()  # a round trip through the store's thread
            return await insert(new, now=now)

        store.insert = slow_insert
        with anyio.fail_after(5):
            leader = asyncio.create_task(jobs.enqueue(once, 1))
            other = asyncio.create_task(jobs.enqueue(once, 2))
            await waiting.wait()
            leader.cancel()
            await anyio.wait_all_tasks_blocked()
            release.set()
            job = await other
            with pytest.raises(asyncio.CancelledError):
                await leader
            await job.result()
            await both_ran.wait()  # the leader's job was written: it runs too
        rows = await jobs.store.list(now=jobs.clock.now())
    assert sorted(ran) == [1, 2]
    assert sorted(row.status for row in rows) == ["succeeded", "succeeded"]


def pause_claims(jobs: Jobs) -> tuple[anyio.Event, anyio.Event]:
    """Hold the next claim's answer back, as a slow round trip would: the store has taken
    the rows (first event set) and the runner gets them once the second is set."""
    taken, answer = anyio.Event(), anyio.Event()
    store: Any = jobs.store
    claim, finish_and_claim = store.claim, store.finish_and_claim

    async def paused_claim(request: ClaimRequest, *, now: float) -> list[JobRow]:
        rows: list[JobRow] = await claim(request, now=now)
        if rows:
            taken.set()
            await answer.wait()
        return rows

    async def paused_finish_and_claim(
        outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        applied, rows = await finish_and_claim(outcomes, request, now=now)
        if rows:
            taken.set()
            await answer.wait()
        return applied, rows

    store.claim, store.finish_and_claim = paused_claim, paused_finish_and_claim
    return taken, answer


async def test_a_job_dispatched_while_a_claim_is_in_flight_leaves_no_last_attempt_waiting(
    make_jobs: MakeJobs, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim counted a free slot, and while its answer was on its way an enqueue took
    that slot. The claimed job, on its last attempt (its attempt spent), waited for a
    slot behind the dispatched one: a kill -9 meanwhile left it dead, never run. It is
    given back at once instead, attempt unspent, and runs once a slot frees."""
    caplog.set_level(logging.INFO, logger="asyncjobs")
    jobs = make_jobs(backend_url, concurrency=1, shutdown_timeout=0)
    producer = make_jobs(backend_url, workers=False)
    release = anyio.Event()
    ran: list[str] = []

    @jobs.task(name="once", retries=0)
    async def once() -> None:
        ran.append("once")

    @jobs.task(name="hold")
    async def hold() -> None:
        ran.append("hold")
        await release.wait()

    async with jobs, producer:
        await settled(jobs)
        taken, answer = pause_claims(jobs)
        try:
            waiting = await producer.enqueue("once")  # another process's job
            jobs.runner.wake()  # as its write would
            with anyio.fail_after(5):
                await taken.wait()  # claimed for the free slot; the answer is on its way
            held = await hold.enqueue()  # the slot looks free: dispatched
            with anyio.fail_after(5):
                while "hold" not in ran:
                    await anyio.lowlevel.checkpoint()
            answer.set()  # the claim lands: its job finds the slot taken
            await anyio.wait_all_tasks_blocked()
            runner = jobs.runner
            assert set(runner.running) == {held.id}
            # Not waiting here on its spent last attempt: given back, attempt unspent.
            assert [row.id for row in runner._ready] == []
            with anyio.fail_after(5):
                while (row := await jobs.store.get(waiting.id)) is None or row.status != "queued":
                    await anyio.lowlevel.checkpoint()
            assert (row.attempts, row.worker) == (0, None)
        finally:
            answer.set()
            release.set()
        with anyio.fail_after(5):
            await waiting.result()
        assert (await waiting.info()).attempts == 1
    (given_back,) = [
        r.getMessage() for r in caplog.records
        if getattr(r, "job_id", None) == waiting.id and getattr(r, "outcome", None) == "release"
    ]  # fmt: skip
    # Not "released by a worker without its task": this worker has it, and ran it.
    assert given_back == f"job {waiting.id} (once) released for want of a free slot here: " + (
        "it runs again, no attempt spent"
    )
    assert sorted(ran) == ["hold", "once"]


@pytest.mark.parametrize("insert_fails", [False, True], ids=["committed", "failed"])
async def test_a_job_claimed_ahead_does_not_take_the_slot_of_a_job_being_dispatched(
    make_jobs: MakeJobs, backend_url: str, insert_fails: bool
) -> None:
    """An enqueue took the free slot and its insert is under way; a claim meanwhile takes
    a job ahead (beyond the free slots). That job waits for a slot: it does not start in
    the one promised to the dispatched job, which would then wait in its stead. Should
    the insert fail, the job claimed ahead starts in that slot at once."""
    jobs = make_jobs(backend_url, concurrency=1, shutdown_timeout=0)
    producer = make_jobs(backend_url, workers=False)
    release = anyio.Event()
    ran: list[str] = []

    @jobs.task(name="quick")
    async def quick() -> None:
        return None

    @jobs.task(name="once", retries=0)
    async def once() -> None:
        ran.append("once")
        await release.wait()

    @jobs.task(name="t")
    async def t() -> None:
        ran.append("t")
        await release.wait()

    async with jobs, producer:
        await (await quick.enqueue()).result(timeout=5)  # 0 s on a FakeClock: look ahead
        await settled(jobs)
        store: Any = jobs.store
        insert, inserting = store.insert, anyio.Event()

        async def slow_insert(new: Sequence[NewJob], *, now: Any) -> Any:
            await inserting.wait()
            if insert_fails:
                raise StoreError("the database is down")
            return await insert(new, now=now)

        store.insert = slow_insert
        runner = jobs.runner
        try:
            with anyio.fail_after(5):
                enqueue = asyncio.create_task(jobs.enqueue(once))
                while not runner._reserved:  # the slot is promised; the insert waits
                    await anyio.lowlevel.checkpoint()
                claimed = await producer.enqueue("t")
                runner.wake()  # as its write would: the claim takes it ahead
                while claimed.id not in {*runner.running, *(row.id for row in runner._ready)}:
                    await anyio.lowlevel.checkpoint()
                assert not runner.running
                inserting.set()
                if insert_fails:
                    with pytest.raises(StoreError):
                        await enqueue
                    assert set(runner.running) == {claimed.id}
                else:
                    dispatched = await enqueue  # its insert committed: dispatched() ran
                    assert set(runner.running) == {dispatched.id}
                    assert [row.id for row in runner._ready] == [claimed.id]
        finally:
            inserting.set()
            release.set()
        with anyio.fail_after(5):
            if not insert_fails:
                await dispatched.result()
            await claimed.result()
    assert ran == (["t"] if insert_fails else ["once", "t"])


async def test_a_slot_freed_by_a_cancelled_enqueue_is_claimed_while_another_is_dispatched(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Every slot promised to enqueues under way, the claim loop waits for one to free.
    One enqueue is cancelled (``asyncio.timeout``) while the other's insert goes on: its
    slot is free, and a job another process enqueued runs in it at once, not after the
    other enqueue's job has ended."""
    jobs = make_jobs(backend_url, concurrency=2, shutdown_timeout=0)
    producer = make_jobs(backend_url, workers=False)
    release = anyio.Event()
    ran: list[int] = []

    @jobs.task(name="hold")
    async def hold(n: int) -> None:
        ran.append(n)
        await release.wait()

    async with jobs, producer:
        await settled(jobs)
        store: Any = jobs.store
        insert, inserting, entered = store.insert, anyio.Event(), anyio.Event()

        async def slow_insert(new: Sequence[NewJob], *, now: Any) -> Any:
            entered.set()
            await inserting.wait()
            return await insert(new, now=now)

        store.insert = slow_insert
        runner = jobs.runner
        waiting, wait_for_room = anyio.Event(), runner._wait_for_room

        async def spy_wait_for_room() -> None:
            waiting.set()
            await wait_for_room()

        runner._wait_for_room = spy_wait_for_room  # type: ignore[method-assign]
        try:
            with anyio.fail_after(5):
                first = asyncio.create_task(jobs.enqueue(hold, 1))
                await entered.wait()  # its insert under way
                second = asyncio.create_task(jobs.enqueue(hold, 2))
                while len(runner._reserved) < 2:  # queued behind the first insert
                    await anyio.lowlevel.checkpoint()
                runner.wake()  # it looks for room and finds none
                await waiting.wait()  # the claim loop waits for a slot to free
                second.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await second  # never inserted: its slot is free again
                other = await producer.enqueue("hold", 3)
                runner.wake()  # as its write would
                while 3 not in ran:
                    await anyio.lowlevel.checkpoint()
            assert not first.done()
        finally:
            inserting.set()
            release.set()
        with anyio.fail_after(5):
            await (await first).result()
            await other.result()
    assert sorted(ran) == [1, 3]


async def test_jobs_queued_here_while_every_slot_was_busy_are_not_jumped_by_a_later_one(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Enqueued while the one slot was busy, two jobs waited in the store. The slot
    freed, and an enqueue that came before the claim for it took the slot at once: the
    newest job ran before the older ones, the higher priority one among them. A job
    this process queued itself waits in the store as surely as another's does."""
    jobs = make_jobs(backend_url, concurrency=1, shutdown_timeout=0)
    release = anyio.Event()
    ran: list[str] = []

    @jobs.task(name="work")
    async def work(name: str) -> None:
        ran.append(name)
        if name == "first":
            await release.wait()

    async with jobs:
        await settled(jobs)
        store: Any = jobs.store
        claim, finish_and_claim = store.claim, store.finish_and_claim
        reached, go = anyio.Event(), anyio.Event()

        async def held(call: Any) -> Any:
            if release.is_set():  # the first claim once the slot freed
                reached.set()
                await go.wait()
            return await call()

        store.claim = lambda request, *, now: held(lambda: claim(request, now=now))
        store.finish_and_claim = lambda outcomes, request, *, now: held(
            lambda: finish_and_claim(outcomes, request, now=now)
        )
        try:
            first = await work.enqueue("first")  # dispatched: the slot is busy
            with anyio.fail_after(5):
                while "first" not in ran:
                    await anyio.lowlevel.checkpoint()
            older = await work.enqueue("older")
            urgent = await work.options(priority=5).enqueue("urgent")
            assert {(await j.info()).status for j in (older, urgent)} == {"queued"}
            release.set()
            with anyio.fail_after(5):
                await reached.wait()  # the slot is free; the claim for it not yet made
            newest = await work.enqueue("newest")
            assert (await newest.info()).status == "queued"
        finally:
            release.set()
            go.set()
        with anyio.fail_after(5):
            for job in (first, older, urgent, newest):
                await job.result()
    assert ran == ["first", "urgent", "older", "newest"]
