"""A connection lost under an operation: retried once on a fresh connection, safely, and
counted once towards the reconnect backoff however many operations it cut."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

import asyncjobs._outbox
import asyncjobs._slots
from asyncjobs import ConfigurationError, Jobs, JobStatus, StoreError, Task, current_job
from asyncjobs._errors import DataRefused
from asyncjobs.stores import ClaimRequest, PostgresStore, TaskLimits, _postgres_claim
from asyncjobs.stores._claims import Claimed
from asyncjobs.stores._job_rows import CheckedJob, Inserted, NewJob
from asyncjobs.stores._ops_rows import WorkerBeat
from asyncjobs.stores._outcomes import Outcome, OutcomeKind
from asyncjobs.testing import FakeClock

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=1,
    )  # fmt: skip


async def test_a_transaction_whose_connection_is_cut_is_retried_on_a_fresh_one(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """asyncpg reports the cut from the transaction's exit as an InterfaceError."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    job = await jobs.enqueue(t.options(delay=3600))
    locker = await asyncpg.connect(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg, locker.transaction():
                await locker.execute(
                    "SELECT 1 FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE", job.id
                )
                tg.start_soon(jobs.cancel, job.id)  # a transaction: waits on the lock
                cut = 0
                while not cut:
                    await anyio.lowlevel.checkpoint()
                    cut = len(  # only the cancel's backend: other tests share the server
                        await admin.fetch(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE $1 = ANY(pg_blocking_pids(pid))",
                            locker.get_server_pid(),
                        )
                    )
        assert (await jobs.get(job.id)).status == JobStatus.CANCELLED  # type: ignore[union-attr]
    finally:
        await locker.close()
        await admin.close()


class ReplyLost:
    """A connection whose server commits the statement, but whose reply never comes."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, query: str, *args: Any) -> Any:
        await self.conn.execute(query, *args)
        raise asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )

    async def fetch(self, query: str, *args: Any) -> Any:
        await self.conn.fetch(query, *args)
        raise asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )


@pytest.mark.parametrize("keyed", [False, True])
async def test_an_enqueue_whose_committed_reply_was_lost_is_retried_and_stored_once(
    make_jobs: MakeJobs, postgres_url: str, keyed: bool
) -> None:
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="t")
    async def t(n: int) -> None: ...

    await jobs.store.open()
    store: Any = jobs.store
    on_producer, lost = store._on_producer, list[bool]()

    async def losing_the_first_reply(fn: Callable[[Any], Any]) -> Any:
        if lost:
            return await on_producer(fn)
        lost.append(True)
        return await on_producer(lambda conn: fn(ReplyLost(conn)))

    store._on_producer = losing_the_first_reply
    job = await jobs.enqueue(t.options(idempotency_key="k" if keyed else None), 1)
    assert lost
    assert [info.id for info in await jobs.list()] == [job.id]


def lose_the_reply_of_the_next(jobs: Jobs, answer: type, *, late: bool = False) -> list[bool]:
    """The next operation whose result is an ``answer`` (``Claimed`` for a claim, a
    ``tuple`` for a finish and claim, a ``list`` for a finish) commits, but its reply
    never comes: the store retries it on a fresh connection. Or, ``late``, the reply
    comes past the command timeout: the operation fails. Returns a list that gets True
    once a reply was lost."""
    store: Any = jobs.store
    bounded, lost = store._bounded, list[bool]()

    async def losing(conn: Any, fn: Callable[[Any], Any]) -> Any:
        result = await bounded(conn, fn)
        if isinstance(result, answer) and not lost:
            lost.append(True)
            if late:  # as _bounded raises it
                raise TimeoutError(f"no reply within command_timeout={store.command_timeout}s")
            raise asyncpg.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return result

    store._bounded = losing
    return lost


def failing_once_task(jobs: Jobs) -> tuple[Task[[], None], list[int]]:
    """Register the task "t" (one retry): its first attempt fails, the second succeeds;
    each run appends its number to the list."""
    runs: list[int] = []

    @jobs.task(name="t", retries=1)
    async def t() -> None:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            raise RuntimeError("the first attempt fails; retried at once")

    return t, runs


async def until_idle(runner: Any) -> None:
    """Until the jobs the runner started have ended."""
    with anyio.fail_after(5):
        while runner.running:
            await anyio.lowlevel.checkpoint()


def recording_task(jobs: Jobs) -> tuple[Task[[int], None], list[int]]:
    """Register the task "t" (no retries: an attempt spent unrun ends it dead); each
    run appends its argument to the list."""
    ran: list[int] = []

    @jobs.task(name="t", retries=0)
    async def t(n: int) -> None:
        ran.append(n)

    return t, ran


@pytest.mark.parametrize("finishing", [False, True], ids=["claim", "finish-and-claim"])
async def test_jobs_a_claim_took_before_its_reply_was_lost_run_on_their_first_attempt(
    make_jobs: MakeJobs, postgres_url: str, finishing: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Left to wait out their leases, they would spend an attempt they never had: with
    no retries left, they would end dead without having run. The outcomes the lost try
    wrote count as written (not logged as 'no longer ours')."""
    jobs = make_jobs(postgres_url, concurrency=1)
    t, ran = recording_task(jobs)
    enqueued = [await t.enqueue(n) for n in range(6)]
    lost = lose_the_reply_of_the_next(jobs, tuple if finishing else Claimed)
    with caplog.at_level(logging.INFO, logger="asyncjobs"):
        await jobs.drain()
    assert lost
    assert sorted(ran) == list(range(6))
    for job in enqueued:
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 1)
    assert "no longer ours" not in caplog.text
    assert caplog.text.count(" succeeded in ") == 6


@pytest.mark.parametrize("finishing", [False, True], ids=["claim", "finish-and-claim"])
async def test_jobs_a_claim_took_before_its_reply_came_too_late_run_on_their_first_attempt(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock, finishing: bool
) -> None:
    """The claim committed, but its reply came after command_timeout: the claim failed.
    The next claim hands out the jobs it took; left to wait out their leases, they spent
    an attempt they never had (with no retries left, they ended dead unrun)."""
    jobs = make_jobs(postgres_url, concurrency=1, poll_interval=1, visibility_timeout=3600)
    store: Any = jobs.store
    store.max_backoff = 0.0  # the next claim tries at once: fake time runs fast below
    t, ran = recording_task(jobs)
    enqueued = [await t.enqueue(n) for n in range(4)]
    if finishing:  # the first job runs; the claim that writes its outcome comes late
        await jobs.runner.claim()
        while jobs.runner.running:
            await anyio.lowlevel.checkpoint()
    lost = lose_the_reply_of_the_next(jobs, tuple if finishing else Claimed, late=True)
    async with jobs:
        with anyio.fail_after(10):
            while len(ran) < 4 or jobs.runner.running or jobs.runner._outbox:
                clock.advance(1)  # past the poll interval the failed claim waits
                for _ in range(10):
                    await anyio.lowlevel.checkpoint()
    assert lost
    assert sorted(ran) == list(range(4))
    for job in enqueued:
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 1)


async def test_jobs_handed_back_late_in_their_lease_get_a_new_one(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """Handed out with the lease the lost claim gave them, they could be requeued by
    lease recovery while running here. Handed back again after a second lost answer,
    they are found by the claim that leased them anew."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="t")
    async def t(n: int) -> None: ...

    enqueued = {(await t.enqueue(n)).id for n in range(2)}
    store: Any = jobs.store
    store.max_backoff = 0.0  # no wait before the next try: the clock is fake
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=2, lease=60.0
    )
    lose_the_reply_of_the_next(jobs, Claimed, late=True)
    with pytest.raises(StoreError):
        await store.claim(request, now=clock.now())
    clock.advance(50)  # late in the lost claim's lease; this answer is lost too
    lose_the_reply_of_the_next(jobs, Claimed, late=True)
    with pytest.raises(StoreError):
        await store.claim(request, now=clock.now())
    clock.advance(50)  # past the first claim's lease: recovery would take them back
    rows = await store.claim(request, now=clock.now())
    assert {row.id for row in rows} == enqueued
    assert {(row.attempts, row.lease_until) for row in rows} == {(1, clock.now() + 60)}
    assert await store.recover(now=clock.now() + 59) == []


async def test_jobs_an_unanswered_claim_took_go_back_when_the_workers_stop(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """No claim comes after it to hand them out: they waited out their leases, and
    spent an attempt they never had."""
    jobs = make_jobs(postgres_url, visibility_timeout=3600)
    t, ran = recording_task(jobs)
    enqueued = [await t.enqueue(n) for n in range(3)]
    store: Any = jobs.store
    lost = lose_the_reply_of_the_next(jobs, Claimed, late=True)
    await jobs.start()
    with anyio.fail_after(5):
        while not lost:
            await anyio.lowlevel.checkpoint()
    # The fake clock stands still: the claim is not tried again. The store backs off
    # from the failed claim; giving the jobs back at stop does not wait for that.
    await jobs.stop()
    assert ran == []
    store._failures, store._retry_at = 0, 0.0  # later, the backoff over (no sleep here)
    for job in enqueued:
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == (JobStatus.QUEUED, 0)
    await jobs.drain()
    assert sorted(ran) == [0, 1, 2]


@pytest.mark.parametrize("finishing", [False, True], ids=["claim", "finish-and-claim"])
async def test_jobs_an_unanswered_claim_took_go_back_when_drain_fails(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock, finishing: bool
) -> None:
    """drain() raises the failed claim's error, and no claim of its own comes after to
    hand the jobs out, nor any heartbeat: they stayed running, leased to this worker,
    and once the lease ran out recovery spent an attempt they never had (dead unrun)."""
    jobs = make_jobs(postgres_url, workers=False, concurrency=1, visibility_timeout=60)
    t, ran = recording_task(jobs)  # no retries
    enqueued = [await t.enqueue(n) for n in range(3)]
    store: Any = jobs.store
    lost = lose_the_reply_of_the_next(jobs, tuple if finishing else Claimed, late=True)
    with pytest.raises(StoreError, match="command_timeout"):
        await jobs.drain()
    assert lost
    store._failures, store._retry_at = 0, 0.0  # later, the backoff over (no sleep here)
    assert [info.status for info in await jobs.list(status="running")] == []
    clock.advance(61)  # past the lost claim's lease
    await jobs.drain()
    assert sorted(ran) == [0, 1, 2]
    for job in enqueued:
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 1)


async def test_a_claim_answered_late_is_still_handed_out_after_claims_refused_meanwhile(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """Claims refused while the store backs off reach no server: they are not counted
    among the unanswered, so they cannot push the one that committed out."""
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="t", retries=0)
    async def t(n: int) -> None: ...

    enqueued = {(await t.enqueue(n)).id for n in range(2)}
    store: Any = jobs.store
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=2,
        lease=3600.0,
    )  # fmt: skip
    lose_the_reply_of_the_next(jobs, Claimed, late=True)
    with pytest.raises(StoreError):
        await store.claim(request, now=clock.now())
    store._failures, store._retry_at = 1, float("inf")  # unreachable for a while
    for _ in range(1000):  # a runner polling through the outage
        clock.advance(1)
        with pytest.raises(StoreError, match="waiting before the next reconnect"):
            await store.claim(request, now=clock.now())
    store._failures, store._retry_at = 0, 0.0
    rows = await store.claim(request, now=clock.now())
    assert {row.id for row in rows} == enqueued


async def test_a_job_a_late_claim_took_is_found_though_heartbeats_moved_its_lease(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """A finish-and-claim answered late wrote a retry due at once and took the job's
    next attempt; the runner, still holding the outcome, heartbeats the job (its lease
    moves). The next claim hands out that attempt all the same."""
    jobs = make_jobs(
        postgres_url, workers=False, concurrency=1, backoff_base=0, visibility_timeout=60
    )
    t, runs = failing_once_task(jobs)
    job = await t.enqueue()
    runner, store = jobs.runner, cast(Any, jobs.store)
    await runner.claim()
    await until_idle(runner)
    lose_the_reply_of_the_next(jobs, tuple, late=True)
    with pytest.raises(StoreError):
        await runner.claim()  # and the store backs off: the outcome stays in the outbox
    assert len(runner._outbox) == 1
    store._failures, store._retry_at = 0, 0.0  # the backoff is over
    clock.advance(20)
    await runner.heartbeat_once()
    clock.advance(1)
    await runner.claim()
    await until_idle(runner)
    await runner.flush_outbox()
    assert runs == [1, 2]
    info = await jobs.get(job.id)
    assert info is not None
    assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 2)


async def test_a_job_cancelled_while_a_late_claim_held_it_unseen_ends_cancelled_unrun(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """The next claim does not hand it out: lease recovery ends it cancelled."""
    jobs = make_jobs(postgres_url, workers=False, concurrency=1, visibility_timeout=60)
    runs: list[str] = []

    @jobs.task(name="t")
    async def t() -> None:
        runs.append("ran")

    job = await t.enqueue()
    store: Any = jobs.store
    store.max_backoff = 0.0  # no wait before the next try: the clock is fake
    lose_the_reply_of_the_next(jobs, Claimed, late=True)
    with pytest.raises(StoreError):
        await jobs.runner.claim()
    assert await jobs.cancel(job.id)  # it reads running: asked to stop
    clock.advance(1)
    assert await jobs.runner.claim() == 0
    clock.advance(60)
    await jobs.runner.recover()
    assert runs == []
    assert (await job.info()).status == JobStatus.CANCELLED


async def test_a_retried_claim_leaves_alone_a_job_running_here_that_was_asked_to_stop(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """Dispatched here at the instant of a claim whose reply was lost, and asked to stop
    by another process: the retried claim must not end it while it runs here (its
    heartbeat stops it, or it finishes first and keeps that outcome)."""
    jobs = make_jobs(postgres_url, concurrency=2)
    release = anyio.Event()
    runs: list[int] = []

    @jobs.task(name="hold")
    async def hold(n: int) -> str:
        runs.append(n)
        await release.wait()
        return "done"

    async with jobs:
        with anyio.fail_after(10):
            while jobs.runner._backlog:  # the first claim found the queue empty
                await anyio.lowlevel.checkpoint()
            job = await hold.enqueue(1)
            while not runs:
                await anyio.lowlevel.checkpoint()
            assert await jobs.store.cancel([job.id], now=clock.now())  # another process
            lost = lose_the_reply_of_the_next(jobs, Claimed)
            await jobs.runner.claim()  # the fake clock still reads the dispatch's time
            assert lost
            assert job.id in jobs.runner.running
            assert (await job.info()).status == JobStatus.RUNNING
            release.set()
            assert await job.result() == "done"
    assert runs == [1]


@pytest.mark.parametrize("answer", [list, tuple], ids=["finish", "finish-and-claim"])
async def test_a_failure_ended_cancelled_is_logged_so_after_a_lost_reply(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture,
    answer: type,
) -> None:  # fmt: skip
    """The retried write finds what its first try wrote, cancelled included."""
    jobs = make_jobs(postgres_url, workers=False, concurrency=1)

    @jobs.task(name="flaky", retries=3)
    async def flaky() -> None:
        await jobs.store.cancel([current_job().id], now=clock.now())  # another process
        raise RuntimeError("down")

    @jobs.task(name="other")
    async def other() -> None: ...

    caplog.set_level(logging.INFO, logger="asyncjobs")
    job = await jobs.enqueue(flaky)
    runner = jobs.runner
    await runner.claim()
    await until_idle(runner)
    lost = lose_the_reply_of_the_next(jobs, answer)
    if answer is list:
        assert await runner.flush_outbox() == 1
    else:
        await jobs.enqueue(other)  # something to claim: a finish and claim
        await runner.claim()
    assert lost
    assert (await job.info()).status == JobStatus.CANCELLED
    ours = [r for r in caplog.records if getattr(r, "job_id", None) == job.id]
    assert [getattr(r, "outcome", None) for r in ours if hasattr(r, "outcome")] == ["cancelled"]


@pytest.mark.parametrize(
    "kind", [OutcomeKind.SUCCEEDED, OutcomeKind.DEAD, OutcomeKind.RETRY, OutcomeKind.RELEASE]
)
async def test_a_finish_retried_after_its_reply_was_lost_reports_what_its_first_try_wrote(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock, kind: OutcomeKind
) -> None:
    jobs = make_jobs(postgres_url, workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    job = await t.enqueue()
    store: Any = jobs.store
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=1, lease=60.0
    )
    (row,) = await store.claim(request, now=clock.now())
    clock.advance(1)
    outcome = Outcome(job.id, "w", row.attempts, kind, run_at=clock.now() + 30)
    lost = lose_the_reply_of_the_next(jobs, list)
    assert await store.finish([outcome], now=clock.now()) == [job.id]
    assert lost
    info = await jobs.get(job.id)
    assert info is not None
    expected = {
        OutcomeKind.SUCCEEDED: (JobStatus.SUCCEEDED, 1),
        OutcomeKind.DEAD: (JobStatus.DEAD, 1),
        OutcomeKind.RETRY: (JobStatus.SCHEDULED, 1),
        OutcomeKind.RELEASE: (JobStatus.QUEUED, 0),
    }
    assert (info.status, info.attempts) == expected[kind]
    # Tried once, a finish reports only what it wrote itself.
    assert await store.finish([outcome], now=clock.now()) == []


async def test_a_retried_claim_does_not_hand_out_again_a_job_dispatched_at_that_instant(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """A job enqueued while a slot is free is inserted running, leased to this worker at
    that time: a retried claim at the same instant finds it as one its lost try took."""
    jobs = make_jobs(postgres_url, concurrency=2)
    runs: list[int] = []
    release = anyio.Event()

    @jobs.task(name="hold")
    async def hold(n: int) -> None:
        runs.append(n)
        await release.wait()

    async with jobs:
        with anyio.fail_after(10):
            while jobs.runner._backlog:  # the first claim found the queue empty
                await anyio.lowlevel.checkpoint()
            job = await hold.enqueue(1)
            info = await jobs.get(job.id)
            assert info is not None
            assert info.status == JobStatus.RUNNING  # dispatched: inserted running
            lost = lose_the_reply_of_the_next(jobs, Claimed)
            await jobs.runner.claim()  # the fake clock still reads the dispatch's time
            assert lost
            while not runs:
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            release.set()
            await job.result()
    assert runs == [1]


async def test_a_dispatched_job_whose_insert_reply_was_lost_runs_on_its_first_attempt(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """Enqueued while a slot is free, the job is inserted running, leased to this
    worker. The insert committed but its reply was lost: the retry must still hand the
    job to the runner, or it stays running unseen and ends dead without having run."""
    jobs = make_jobs(postgres_url, concurrency=2)
    runs: list[int] = []

    @jobs.task(name="once", retries=0)
    async def once(n: int) -> None:
        runs.append(n)

    async with jobs:
        with anyio.fail_after(10):
            while jobs.runner._backlog:  # the first claim found the queue empty
                await anyio.lowlevel.checkpoint()
            lost = lose_the_reply_of_the_next(jobs, Inserted)
            job = await once.enqueue(1)
            assert lost
            while not runs:
                await anyio.lowlevel.checkpoint()
            await job.result()
    info = await jobs.get(job.id)
    assert info is not None
    assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 1)
    assert runs == [1]


async def dispatched_at_a_lost_claims_instant(
    jobs: Jobs, clock: FakeClock
) -> tuple[PostgresStore, ClaimRequest, str, str]:
    """Worker "w" claims job "t" (its answer never comes: a timeout), then, at the same
    clock reading, a second job is dispatched to it (inserted running, answered), which
    it runs. Returns the store, the claim request and the ids of the two jobs."""

    @jobs.task(name="t")
    async def t(n: int) -> None: ...

    store = cast(PostgresStore, jobs.store)
    taken = await t.enqueue(0)
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1, lease=60.0
    )
    lost = lose_the_reply_of_the_next(jobs, Claimed, late=True)
    with pytest.raises(StoreError):
        await store.claim(request, now=clock.now())
    assert lost
    cast(Any, store)._failures = 0  # the backoff is over (the clock is fake)
    running = NewJob(
        id=uuid.uuid4().hex, task="t", queue="default", payload='{"args": [1], "kwargs": {}}',
        status="running", priority=0, run_at=clock.now(), max_attempts=1, worker="w",
        lease=60,
    )  # fmt: skip
    await store.insert([running], now=clock.now())
    return store, request, taken.id, running.id


async def test_a_stopped_worker_gives_back_what_its_lost_claim_took_not_a_job_it_runs(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """The dispatched job started at the lost claim's instant, and still runs here (it
    ignored its cancellation at shutdown, say): requeued, it would run twice."""
    jobs = make_jobs(postgres_url, workers=False)
    store, _, taken, running = await dispatched_at_a_lost_claims_instant(jobs, clock)
    beat = WorkerBeat(
        id="w", host="h", pid=1, started_at=clock.now(), running=0, concurrency=2,
        queues=None, stopped=True,
    )  # fmt: skip
    await store.record_worker(beat, now=clock.now())
    given_back, still_running = await jobs.get(taken), await jobs.get(running)
    assert given_back is not None
    assert (given_back.status, given_back.attempts) == (JobStatus.QUEUED, 0)
    assert still_running is not None
    assert (still_running.status, still_running.attempts) == (JobStatus.RUNNING, 1)


async def test_a_claim_after_a_lost_one_hands_out_what_it_took_not_a_job_dispatched_then(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """The dispatched job started at the lost claim's instant and runs here: handed out
    again (its lease and start moved), it is not the lost claim's to give."""
    jobs = make_jobs(postgres_url, workers=False)
    store, request, taken, running = await dispatched_at_a_lost_claims_instant(jobs, clock)
    dispatched_at = clock.now()
    clock.advance(1)
    rows = await store.claim(replace(request, limit=2), now=clock.now())
    assert [row.id for row in rows] == [taken]
    row = await store.get(running)
    assert row is not None
    assert (row.status, row.started_at, row.lease_until) == (
        JobStatus.RUNNING, dispatched_at, dispatched_at + 60
    )  # fmt: skip


async def test_a_job_that_ignores_its_cancellation_at_stop_is_not_requeued_while_it_runs(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """Dispatched here at the instant of a claim answered late: stop goes on without it
    (it ignored its cancellation; it keeps its lease), and the give-back of the late
    claim's jobs must leave it running: requeued, another worker would run it again
    beside it."""
    jobs = make_jobs(
        postgres_url, concurrency=2, shutdown_timeout=10, visibility_timeout=60,
        poll_interval=3600,  # no claim after the late one to hand its jobs out
    )  # fmt: skip
    cast(Any, jobs.store).max_backoff = 0.0  # no wait before the next try: the clock is fake
    release = anyio.Event()
    runs: list[int] = []

    @jobs.task(name="stubborn", retries=0)
    async def stubborn(n: int) -> None:
        runs.append(n)
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed: the job carries on as if nothing happened

    await jobs.start()
    stopped = anyio.Event()

    async def stop() -> None:
        await jobs.stop()
        stopped.set()

    try:
        with anyio.fail_after(10):
            while jobs.runner._backlog:  # the first claim found the queue empty
                await anyio.lowlevel.checkpoint()
            job = await stubborn.enqueue(1)  # dispatched: inserted running here
            while not runs:
                await anyio.lowlevel.checkpoint()
            lost = lose_the_reply_of_the_next(jobs, Claimed, late=True)
            jobs.runner.wake()  # the fake clock still reads the dispatch's time
            while not lost:
                await anyio.lowlevel.checkpoint()
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop)
                while not stopped.is_set():
                    # Past the shutdown timeout and the grace, and no further: the stopped
                    # beat (and its give-back) has five seconds of the clock.
                    if jobs.runner.running:
                        clock.advance(1)
                    for _ in range(10):
                        await anyio.lowlevel.checkpoint()
        row = await jobs.store.get(job.id)
        assert row is not None
        assert (row.status, row.attempts, row.worker) == ("running", 1, jobs.runner.worker_id)
    finally:
        release.set()  # a failure above must not leave the job running forever
    assert runs == [1]


async def test_operations_cut_together_count_once_towards_the_backoff() -> None:
    store: Any = PostgresStore("postgresql://127.0.0.1/unused")
    delays = [store._backoff() for _ in range(8)]  # eight in-flight operations, one cut
    assert store._failures == 1
    assert max(delays) <= 0.1


async def connections_named(admin: Any, name: str) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
    )
    return count


@pytest.mark.parametrize("use", ["first use", "keyed enqueue"])
async def test_close_while_an_operation_connects_leaves_no_connection_open(
    make_jobs: MakeJobs, postgres_url: str, use: str
) -> None:
    name = f"asyncjobs_close_{uuid.uuid4().hex[:8]}"
    jobs = make_jobs(f"{postgres_url}&application_name={name}", workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    operation: asyncio.Future[object]
    if use == "keyed enqueue":
        await jobs.store.open()  # the pool; the enqueue connection is opened on first use
        operation = asyncio.ensure_future(jobs.enqueue(t.options(idempotency_key="k")))
    else:
        operation = asyncio.ensure_future(jobs.get("a" * 32))  # opens the pool
    admin = await asyncpg.connect(postgres_url)
    try:
        with anyio.fail_after(20):
            await anyio.lowlevel.checkpoint()  # the operation is connecting
            await jobs.close()
            with contextlib.suppress(StoreError):  # closed under it: refused, or done first
                await operation
            assert await connections_named(admin, name) == 0
    finally:
        operation.cancel()
        await jobs.close()
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
        await admin.close()


class FreezingProxy:
    """A TCP proxy to the test server that can go silent: once frozen it forwards
    nothing either way and closes nothing, as a host gone or a firewall dropping
    packets would (no reset comes). ``replies_muted``: it forwards what the client
    sends, and drops the server's replies."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = False
        self.replies_muted = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, reader, upstream_writer, False)
            tg.start_soon(self._pipe, upstream_reader, writer, True)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not (self.frozen or (replies and self.replies_muted)):
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_an_operation_on_a_network_gone_silent_fails_after_the_command_timeout(
    postgres_url: str,
) -> None:
    """No reset comes from a silent network: a statement waited for TCP to give up (a
    quarter of an hour), and a runner's claim, which shutdown lets finish, held stop()
    as long. Past command_timeout the operation fails as unreachable; the store
    reconnects once the network is back."""
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
    store = PostgresStore(url + "&command_timeout=0.5", pool_min=0)
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1, lease=30
    )
    try:
        await store.open()
        assert await store.claim(request, now=0.0) == []
        proxy.frozen = True
        with anyio.fail_after(20), pytest.raises(StoreError, match=r"command_timeout=0\.5s"):
            await store.claim(request, now=0.0)
        proxy.frozen = False
        store._failures = 0  # skip the reconnect backoff
        with anyio.fail_after(20):
            assert await store.claim(request, now=0.0) == []
    finally:
        proxy.frozen = False
        await store.close()
        await proxy.close()


async def test_an_enqueue_whose_reply_never_comes_says_it_may_have_been_stored(
    make_jobs: MakeJobs, postgres_url: str
) -> None:
    """The insert reached the server and committed; only its reply was lost. The
    error must not read as if nothing happened: the job is there, and enqueueing it
    again without an idempotency key would store it twice."""
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
    jobs = make_jobs(url + "&command_timeout=0.5", workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    try:
        await jobs.enqueue(t)  # the enqueue connection is open
        proxy.replies_muted = True
        with anyio.fail_after(20), pytest.raises(StoreError) as lost:
            await jobs.enqueue(t)
        assert "may have taken effect" in str(lost.value)
        proxy.replies_muted = False
        cast(PostgresStore, jobs.store)._failures = 0  # skip the reconnect backoff
        assert (await jobs.stats())["totals"]["counts"]["queued"] == 2
    finally:
        proxy.replies_muted = False
        await jobs.close()
        await proxy.close()


async def test_a_running_store_that_loses_the_server_says_it_will_reconnect(
    postgres_url: str,
) -> None:
    """Unlike a store that never opened (startup fails, nothing reconnects), an open one
    keeps going: its message says when it tries again."""
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    name = f"asyncjobs_gone_{uuid.uuid4().hex[:10]}"
    netloc = f"{parts.username}@127.0.0.1:{port}"
    store = PostgresStore(urlunsplit(parts._replace(netloc=netloc)) + f"&application_name={name}")
    admin = await asyncpg.connect(postgres_url)
    try:
        await store.open()
        await proxy.close()  # the server is gone: new connections are refused...
        await admin.execute(  # ...and those open are cut
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            name,
        )
        with anyio.fail_after(20), pytest.raises(StoreError) as lost:
            await store.get("a" * 32)
    finally:
        await store.close()
        await proxy.close()
        await admin.close()
    message = str(lost.value)
    assert message.startswith(f"PostgreSQL store {store!r} is unreachable (get): ")
    assert message.endswith("; reconnecting in 0.1s")


def test_command_timeout_is_read_from_the_url_and_checked() -> None:
    assert PostgresStore("postgresql://h/db?command_timeout=2.5").command_timeout == 2.5
    assert PostgresStore("postgresql://h/db").command_timeout == 60.0
    for bad in ("x", "0", "-1", "inf"):
        with pytest.raises(ConfigurationError, match="command_timeout"):
            PostgresStore(f"postgresql://h/db?command_timeout={bad}")


async def test_a_value_the_server_refuses_is_data_refused_not_the_store_failing(
    postgres_url: str,
) -> None:
    """The runner records an outcome refused as data as a failed attempt; any other
    failure leaves outcomes to be written again."""
    store = PostgresStore(postgres_url)
    try:
        with pytest.raises(DataRefused, match="invalid input syntax"):
            await store._run("check", lambda conn: conn.fetchval("SELECT 'many'::int"))
        with pytest.raises(StoreError) as failed:
            await store._run("check", lambda conn: conn.fetchval("SELECT * FROM nowhere"))
        assert not isinstance(failed.value, DataRefused)
    finally:
        await store.close()


async def test_a_job_dispatched_here_whose_insert_answered_late_runs_on_its_first_attempt(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """The enqueue failed (its reply came past command_timeout) but the job was stored,
    running for this worker: the next claim hands it out (it ended dead unrun)."""
    jobs = make_jobs(postgres_url, concurrency=2, visibility_timeout=60)
    store: Any = jobs.store
    store.max_backoff = 0.0  # no wait before the next try: the clock is fake
    t, ran = recording_task(jobs)  # no retries
    async with jobs:
        with anyio.fail_after(10):
            while jobs.runner._backlog:  # the first claim found the queue empty
                await anyio.lowlevel.checkpoint()
            lost = lose_the_reply_of_the_next(jobs, Inserted, late=True)
            with pytest.raises(StoreError):
                await t.enqueue(1)
            assert lost
            clock.advance(1)
            jobs.runner.wake()
            while not ran:
                await anyio.lowlevel.checkpoint()
    assert ran == [1]
    (info,) = await jobs.list()
    assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 1)


async def test_the_outcomes_written_at_stop_are_not_held_back_by_the_reconnect_backoff(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock
) -> None:
    """A claim answered late just before stop() starts the backoff: the success of a job
    that ends then is still written (it stayed running, and ended dead at lease end)."""
    jobs = make_jobs(postgres_url, concurrency=2, visibility_timeout=60)
    release = anyio.Event()
    ran: list[int] = []

    @jobs.task(name="t", retries=0)
    async def t(n: int) -> str:
        ran.append(n)
        await release.wait()
        return "done"

    await jobs.start()
    try:
        with anyio.fail_after(10):
            while jobs.runner._backlog:
                await anyio.lowlevel.checkpoint()
            job = await t.enqueue(1)  # dispatched: inserted running here
            while not ran:
                await anyio.lowlevel.checkpoint()
            clock.advance(1)
            lost = lose_the_reply_of_the_next(jobs, Claimed, late=True)
            jobs.runner.wake()
            while not lost:
                await anyio.lowlevel.checkpoint()
            release.set()
            while jobs.runner.running:
                await anyio.lowlevel.checkpoint()
    finally:
        release.set()
        await jobs.stop()
    assert (await job.info()).status == JobStatus.SUCCEEDED
    assert ran == [1]


def outcome_logs(caplog: pytest.LogCaptureFixture, job_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "job_id", None) == job_id]


@pytest.mark.parametrize("answer", [tuple, list], ids=["finish-and-claim", "finish"])
async def test_an_outcome_a_late_write_committed_is_logged_as_written_when_sent_again(
    make_jobs: MakeJobs, postgres_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture,
    answer: type,
) -> None:  # fmt: skip
    """Not as 'no longer ours': the late write did record it."""
    jobs = make_jobs(postgres_url, workers=False, concurrency=1)
    store: Any = jobs.store
    store.max_backoff = 0.0  # no wait before the next try: the clock is fake
    t, _ = recording_task(jobs)
    job = await t.enqueue(0)
    runner = jobs.runner
    caplog.set_level(logging.INFO, logger="asyncjobs")
    await runner.claim()
    await until_idle(runner)
    if answer is tuple:
        await t.enqueue(1)  # something to claim: a finish and claim
    lost = lose_the_reply_of_the_next(jobs, answer, late=True)
    with pytest.raises(StoreError):
        await (runner.claim() if answer is tuple else runner._write_outbox())
    assert lost
    assert len(runner._outbox) == 1  # kept: sent again by the next write
    clock.advance(1)
    await runner.flush_outbox()
    logs = outcome_logs(caplog, job.id)
    assert not any("no longer ours" in m for m in logs), logs
    assert any("succeeded" in m for m in logs), logs


async def test_a_retry_that_the_same_lost_write_claimed_again_is_logged_as_retrying(
    make_jobs: MakeJobs, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = make_jobs(postgres_url, workers=False, concurrency=1, backoff_base=0)
    t, runs = failing_once_task(jobs)
    job = await t.enqueue()
    runner = jobs.runner
    caplog.set_level(logging.INFO, logger="asyncjobs")
    await runner.claim()
    await until_idle(runner)
    lost = lose_the_reply_of_the_next(jobs, tuple)  # committed; tried again
    await runner.claim()
    assert lost
    await until_idle(runner)
    await runner.flush_outbox()
    assert runs == [1, 2]
    logs = outcome_logs(caplog, job.id)
    assert not any("no longer ours" in m for m in logs), logs
    assert any("retrying" in m for m in logs), logs


async def test_stop_ends_in_time_while_the_network_goes_silent_under_a_claim(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim loop's claim waits for a reply that never comes as stop() begins: the
    deadline stop sets cuts that wait short (it was timed by command_timeout, 4 s
    here), as it does the waits for a connection after it. Before, stop() waited
    for the shielded claim, then for each later write: over 6 s."""
    monkeypatch.setattr(asyncjobs._outbox, "FINAL_WRITE_TIME", 0.2)
    monkeypatch.setattr(asyncjobs._slots, "CANCEL_GRACE", 0.2)
    parts = urlsplit(postgres_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
    jobs = Jobs(url + "&command_timeout=4", shutdown_timeout=0.2, poll_interval=0.05)
    store = cast(PostgresStore, jobs.store)

    @jobs.task(name="t")
    async def t() -> None: ...

    try:
        await jobs.start()
        proxy.frozen = True
        with anyio.fail_after(5):  # the next poll's claim goes unanswered
            while not store._waiting:
                await anyio.lowlevel.checkpoint()
        started = anyio.current_time()
        with anyio.fail_after(20):
            await jobs.stop()
        # shutdown_timeout, then a second at most for each of the last two records
        # (the give-back of the claim, the worker's stop): PAST_DEADLINE_WAIT.
        assert anyio.current_time() - started < 3.5
    finally:
        proxy.frozen = False
        with anyio.move_on_after(10):
            await jobs.close()
        await proxy.close()


async def test_a_job_dispatched_while_a_claim_was_under_way_is_kept_when_both_go_unanswered(
    postgres_url: str,
) -> None:
    """A claim of worker w is under way; an insert of a job dispatched to w commits but
    its reply comes too late (remembered for w's next claim), then the claim fails
    too, the same network fault. The claim's failure must keep the insert's entry:
    it replaced it, and the job waited out its lease (dead unrun on a last attempt)."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        request = ClaimRequest(
            worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1,
            lease=60.0,
        )  # fmt: skip
        bounded = store._bounded
        claim_may_fail, claim_waiting = asyncio.Event(), asyncio.Event()
        fail = {"claim": True, "insert": True}

        async def late_replies(conn: Any, fn: Any) -> Any:
            result = await bounded(conn, fn)
            if isinstance(result, Claimed) and fail["claim"]:
                fail["claim"] = False
                claim_waiting.set()
                await claim_may_fail.wait()
                raise TimeoutError("no reply within command_timeout")
            if isinstance(result, Inserted) and fail["insert"]:
                fail["insert"] = False
                raise TimeoutError("no reply within command_timeout")
            return result

        store._bounded = late_replies

        async def failing_claim() -> None:
            with pytest.raises(StoreError):
                await store.claim(request, now=100.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(failing_claim)
            await claim_waiting.wait()
            dispatched = new_job("d")._replace(status="running", run_at=100.5, worker="w", lease=60)
            with pytest.raises(StoreError):
                await store.insert([dispatched], now=100.5)
            claim_may_fail.set()
        store._failures, store._retry_at = 0, 0.0  # the reconnect backoff is over
        rows = await store.claim(request, now=101.0)
        assert [r.id for r in rows] == ["d"]
    finally:
        await store.close()


async def test_a_retry_that_lease_recovery_made_is_not_reported_as_applied_by_a_lost_write(
    postgres_url: str,
) -> None:
    """The job's lease ran out and recovery requeued it; this worker's finish-and-claim
    then sends a retry outcome (no longer ours) and its claim takes the job again; the
    reply is lost, and the write is sent again. The row reads as "claimed again by the
    same write" (running under w at the next attempt, under that write's claim token),
    but the retry was due later than the write: recovery requeued it, not the retry,
    so the outcome is not reported as applied (it was, before: a wrong log line)."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        await store.insert([new_job("j")._replace(max_attempts=3)], now=0.0)
        request = ClaimRequest(
            worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=1,
            lease=10.0,
        )  # fmt: skip
        (row,) = await store.claim(request, now=0.0)
        assert [r.id for r in await store.recover(now=20.0)] == ["j"]
        bounded, lost = store._bounded, list[bool]()

        async def reply_lost_once(conn: Any, fn: Any) -> Any:
            result = await bounded(conn, fn)
            if isinstance(result, tuple) and not lost:
                lost.append(True)
                raise asyncpg.ConnectionDoesNotExistError("connection was closed")
            return result

        store._bounded = reply_lost_once
        retry = Outcome("j", "w", row.attempts, OutcomeKind.RETRY, run_at=50.0)
        applied, claimed = await store.finish_and_claim([retry], request, now=20.0)
        assert lost
        assert [r.id for r in claimed] == ["j"]
        assert applied == []
    finally:
        await store.close()


@pytest.mark.parametrize("key", [None, "k"], ids=["plain", "keyed"])
async def test_a_dispatched_insert_the_server_refused_is_not_looked_for_later(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    """An insert of a job dispatched to w that the server refused (a value it cannot
    store) committed nothing: w's next claim has no unanswered write to look for (it
    made a lookup of its claim token, and w's stop a transaction to give its jobs back)."""
    store = PostgresStore(postgres_url)
    await store.open()
    looked: list[object] = []
    claim_again = _postgres_claim.claim_again

    async def counted(*args: Any, **kwargs: Any) -> Any:
        looked.append(args)
        return await claim_again(*args, **kwargs)

    monkeypatch.setattr(_postgres_claim, "claim_again", counted)
    try:
        request = ClaimRequest(
            worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1,
            lease=60.0,
        )  # fmt: skip
        # As Jobs built it (CheckedJob): the store's own checks would refuse it first.
        refused = CheckedJob(*new_job("d")._replace(
            status="running", worker="w", lease=60, idempotency_key=key,
            payload='{"args":["\x00"],"kwargs":{}}',
        ))  # fmt: skip
        with pytest.raises(DataRefused):
            await store.insert([refused], now=100.0)
        assert await store.claim(request, now=101.0) == []
        assert looked == []
    finally:
        await store.close()
