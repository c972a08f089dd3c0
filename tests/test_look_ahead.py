"""Claiming ahead: short jobs are claimed before a slot frees (so a store round trip
overlaps running jobs); long jobs are not; jobs claimed ahead are heartbeated like
running ones and given back, attempt unspent, when workers stop. Each job runs in a
task of its own, so context variables never leak from one job to the next."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

import anyio

from asyncjobs import Jobs, Retry, StoreError, current_job
from asyncjobs._runner import _PREFETCH_MAX
from asyncjobs.stores import SQLiteStore
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

AHEAD = 2 * _PREFETCH_MAX  # jobs claimed ahead at most, at concurrency 2
JOBS = 2 + AHEAD + 2  # two running, AHEAD claimed ahead, two left in the store


async def until(check: Callable[[], object]) -> None:
    with anyio.fail_after(5):
        while not check():
            await anyio.lowlevel.checkpoint()


async def until_finished(jobs: Jobs, ids: list[str]) -> None:
    with anyio.fail_after(5):
        while any(status in ("queued", "running") for status, _ in await statuses(jobs, ids)):
            await anyio.lowlevel.checkpoint()


async def cancelled_while_blocked(jobs: Jobs, job_id: str, ids: list[str]) -> None:
    """Wait until ``job_id`` is written cancelled while both slots are still taken (of
    ``run_blocked``), then let the blocked jobs go, wait for all ``ids`` and close."""
    try:
        with anyio.fail_after(5):
            while (await statuses(jobs, [job_id])) != [("cancelled", 1)]:
                await anyio.lowlevel.checkpoint()
    finally:
        jobs.release.set()  # type: ignore[attr-defined]
    await until_finished(jobs, ids)
    await jobs.close()


async def statuses(jobs: Jobs, ids: list[str]) -> list[tuple[str, int]]:
    infos = [await jobs.get(job_id) for job_id in ids]
    return [(info.status, info.attempts) for info in infos if info is not None]


async def run_blocked(jobs: Jobs, clock: FakeClock, *, job_seconds: float) -> list[str]:
    """Run one job taking ``job_seconds`` (fake time), then start two jobs that block
    both slots with ``JOBS - 2`` more behind them. Returns the ``JOBS`` ids."""
    release = anyio.Event()
    ran: list[int] = []

    @jobs.task(name="t")
    async def t(i: int) -> None:
        clock.advance(job_seconds)
        ran.append(i)
        if i in (0, 1):
            await release.wait()

    jobs.release = release  # type: ignore[attr-defined]
    jobs.ran = ran  # type: ignore[attr-defined]
    await jobs.start()
    await (await t.enqueue(-1)).result(timeout=5)
    made = await jobs.enqueue_many([t.spec(i) for i in range(JOBS)])
    await until(lambda: len(jobs.runner.running) == 2)
    return [job.id for job in made]


async def test_short_jobs_are_claimed_ahead_then_given_back_unspent_at_stop(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    ids = await run_blocked(jobs, clock, job_seconds=0.0)
    # Two run, AHEAD more are claimed ahead (leased to this worker), two wait in the store.
    await until(lambda: len(jobs.runner._ready) == AHEAD)
    assert await statuses(jobs, ids) == [("running", 1)] * (2 + AHEAD) + [("queued", 0)] * 2

    clock.advance(30)
    await jobs.runner.heartbeat_once()  # jobs claimed ahead keep their lease too
    for job_id in ids[: 2 + AHEAD]:
        row = await jobs.store.get(job_id)
        assert row is not None
        assert row.lease_until == clock.now() + 60

    async with anyio.create_task_group() as tg:
        tg.start_soon(jobs.stop)
        await until(lambda: not jobs.runner._accepting)
        jobs.release.set()  # type: ignore[attr-defined]
    assert await statuses(jobs, ids) == [("succeeded", 1)] * 2 + [("queued", 0)] * (JOBS - 2)
    assert jobs.ran == [-1, 0, 1]  # type: ignore[attr-defined]
    for job_id in ids[2 : 2 + AHEAD]:
        row = await jobs.store.get(job_id)
        assert row is not None
        assert (row.worker, row.lease_until) == (None, None)
    await jobs.close()


async def test_long_jobs_are_not_claimed_ahead(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    ids = await run_blocked(jobs, clock, job_seconds=1.0)
    assert await statuses(jobs, ids) == [("running", 1)] * 2 + [("queued", 0)] * (JOBS - 2)
    jobs.release.set()  # type: ignore[attr-defined]
    await until_finished(jobs, ids)
    await jobs.close()
    assert await statuses(jobs, ids) == [("succeeded", 1)] * JOBS


class SteppedClock:
    """A ``FakeClock`` whose wall time can be set back, as NTP steps a host's clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.offset = 0.0

    def now(self) -> float:
        return self.clock.now() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)

    def move_on_after(self, seconds: float | None) -> AbstractContextManager[anyio.CancelScope]:
        return self.clock.move_on_after(seconds)


async def test_a_job_during_which_the_clock_was_set_back_counts_as_taking_no_time(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Its duration came out at -3600 s: the mean of recent jobs stayed below zero for
    dozens of jobs, and the worker claimed ahead all it may, even for jobs of a second."""
    stepped = SteppedClock(clock)
    jobs = make_jobs(clock=stepped, concurrency=2, shutdown_timeout=10)

    @jobs.task()
    async def set_back() -> None:
        stepped.offset -= 3600

    await jobs.start()
    await (await set_back.enqueue()).result(timeout=5)
    ids = await run_blocked(jobs, clock, job_seconds=1.0)  # a job of 1 s, then the test's
    assert await statuses(jobs, ids) == [("running", 1)] * 2 + [("queued", 0)] * (JOBS - 2)
    jobs.release.set()  # type: ignore[attr-defined]
    await until_finished(jobs, ids)
    await jobs.close()


async def test_a_cancelled_job_claimed_ahead_never_runs(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    ids = await run_blocked(jobs, clock, job_seconds=0.0)
    await until(lambda: len(jobs.runner._ready) == AHEAD)  # ids[2:2 + AHEAD] claimed ahead
    assert await jobs.cancel(ids[2])
    await cancelled_while_blocked(jobs, ids[2], ids)
    assert await statuses(jobs, ids) == [("succeeded", 1)] * 2 + [("cancelled", 1)] + [
        ("succeeded", 1)
    ] * (JOBS - 3)
    assert sorted(jobs.ran) == [-1, 0, 1, *range(3, JOBS)]  # type: ignore[attr-defined]


async def test_a_job_claimed_ahead_and_cancelled_by_another_process_never_runs(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The CLI or a dashboard in another process cancels it in the store; this worker
    learns it at its next heartbeat, before a slot frees."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    other = make_jobs(workers=False)
    ids = await run_blocked(jobs, clock, job_seconds=0.0)
    await until(lambda: len(jobs.runner._ready) == AHEAD)  # ids[2:2 + AHEAD] claimed ahead
    assert await other.cancel(ids[2])
    await jobs.runner.heartbeat_once()
    still_ready = ids[2] in {row.id for row in jobs.runner._ready}
    await cancelled_while_blocked(jobs, ids[2], ids)
    assert not still_ready
    assert (await statuses(jobs, ids))[2] == ("cancelled", 1)
    assert sorted(jobs.ran) == [-1, 0, 1, *range(3, JOBS)]  # type: ignore[attr-defined]


async def test_jobs_claimed_ahead_whose_leases_cannot_be_renewed_go_back_unspent(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Heartbeats fail until the leases are about to end: the running jobs are stopped
    (a failed attempt, retried) and those claimed ahead go back unstarted, attempt
    unspent, not cancelled (nobody asked for that, and the store still holds them as
    this worker's)."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    ids = await run_blocked(jobs, clock, job_seconds=0.0)
    await until(lambda: len(jobs.runner._ready) == AHEAD)  # ids[2:2 + AHEAD] claimed ahead
    store: Any = jobs.store
    heartbeat = store.heartbeat

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the store is unreachable")

    store.heartbeat = unreachable
    try:
        clock.advance(jobs.settings.visibility_timeout * 5 / 6)  # half a beat left
        await until(lambda: jobs.ran.count(0) == 2)  # type: ignore[attr-defined]
    finally:
        store.heartbeat = heartbeat
        jobs.release.set()  # type: ignore[attr-defined]
    await until_finished(jobs, ids)
    await jobs.close()
    assert await statuses(jobs, ids) == [("succeeded", 2)] * 2 + [("succeeded", 1)] * (JOBS - 2)


async def test_a_heartbeat_answer_about_an_earlier_attempt_leaves_the_next_one_alone(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The heartbeat asks about attempt 1; before its answer (attempt 1 is not running
    any more) arrives, attempt 1 failed and this worker claimed attempt 2 ahead."""
    jobs = make_jobs(concurrency=1, shutdown_timeout=0)
    failed_once, unblock = anyio.Event(), anyio.Event()

    @jobs.task(retries=3)
    async def flaky() -> str:
        if current_job().attempt == 1:
            await failed_once.wait()
            raise Retry(delay=5)
        return "ok"

    @jobs.task
    async def blocker() -> None:
        await unblock.wait()

    @jobs.task
    async def quick() -> None: ...

    asked, updated, answer = anyio.Event(), anyio.Event(), anyio.Event()
    store_heartbeat = jobs.store.heartbeat

    async def slow_heartbeat(ids: Sequence[str], **kwargs: Any) -> set[str]:
        asked.set()
        await until_async(lambda: status_is(jobs, job.id, "scheduled"))  # attempt 1 failed
        owned = await store_heartbeat(ids, **kwargs)  # so it is not ours any more
        updated.set()
        await answer.wait()  # the answer is slow to come back
        return owned

    await jobs.start()
    try:
        await (await quick.enqueue()).result(timeout=5)  # 0 s on a FakeClock: look ahead
        job = await flaky.enqueue()
        await until(lambda: job.id in jobs.runner.running)
        await blocker.enqueue()
        await until(lambda: bool(jobs.runner._ready))  # the blocker, claimed ahead
        jobs.store.heartbeat = slow_heartbeat  # type: ignore[method-assign, assignment]
        beat = asyncio.get_running_loop().create_task(jobs.runner.heartbeat_once())
        await until(asked.is_set)
        failed_once.set()  # attempt 1 fails (retry in 5 s); the blocker takes the slot
        await until(updated.is_set)
        clock.advance(5)  # due again: claimed ahead, attempt 2, behind the blocker
        await until(lambda: any(r.id == job.id for r in jobs.runner._ready))
        answer.set()
        await beat
        unblock.set()
        assert await job.result(timeout=5) == "ok"
        assert (await job.info()).attempts == 2
    finally:
        unblock.set()
        await jobs.stop()


async def test_an_outcome_is_written_while_jobs_claimed_ahead_fill_every_slot(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(concurrency=1, shutdown_timeout=0)
    gate, release = anyio.Event(), anyio.Event()

    @jobs.task
    async def quick() -> None: ...

    @jobs.task
    async def slow() -> None:
        await gate.wait()
        clock.advance(10)  # a long job: the look-ahead shrinks to nothing

    @jobs.task
    async def blocked() -> None:
        await release.wait()

    await jobs.start()
    try:
        await (await quick.enqueue()).result(timeout=5)  # 0 s on a FakeClock: look ahead
        first = await slow.enqueue()
        await until(lambda: first.id in jobs.runner.running)
        for _ in range(2):
            await blocked.enqueue()
        await until(lambda: len(jobs.runner._ready) == 2)
        gate.set()  # one blocked job takes the slot, the other waits: no room to claim
        await until_async(lambda: status_is(jobs, first.id, "succeeded"))
    finally:
        release.set()
        await jobs.stop()


async def test_an_outcome_is_written_while_every_slot_is_busy_with_some_look_ahead_left(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A job ended, its slot went to a job claimed ahead, and the look-ahead shrank but
    not to nothing: no room to claim, so no claim to write the outcome. It waited for
    the long jobs to end (its result waiters too), and past its lease it ran again."""
    jobs = make_jobs(concurrency=1, shutdown_timeout=0)
    gate, release = anyio.Event(), anyio.Event()

    @jobs.task
    async def quick() -> None: ...

    @jobs.task
    async def slow() -> None:
        await gate.wait()
        clock.advance(0.015)  # the mean duration grows: the look-ahead drops from 3 to 2

    @jobs.task
    async def blocked() -> None:
        await release.wait()

    await jobs.start()
    try:
        await (await quick.enqueue()).result(timeout=5)  # 0 s on a FakeClock: look ahead
        first = await slow.enqueue()
        await until(lambda: first.id in jobs.runner.running)
        for _ in range(_PREFETCH_MAX):
            await blocked.enqueue()
        await until(lambda: len(jobs.runner._ready) == _PREFETCH_MAX)
        gate.set()
        await until(lambda: first.id not in jobs.runner.running)
        assert (jobs.runner.room, jobs.runner._look_ahead()) == (0, 2)
        await until_async(lambda: status_is(jobs, first.id, "succeeded"))
    finally:
        release.set()
        await jobs.stop()


async def test_jobs_claimed_ahead_go_back_as_stop_begins_not_when_running_jobs_end(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """While stop waits for long jobs, those claimed ahead are back in the queue for
    other processes; left leased until the long jobs ended, they could time out and
    spend an attempt they never had."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=600)
    ids = await run_blocked(jobs, clock, job_seconds=0.0)
    await until(lambda: len(jobs.runner._ready) == AHEAD)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.stop)
            ahead = ids[2 : 2 + AHEAD]
            await until_async(
                lambda: _all_are(jobs, ahead, ("queued", 0)),
            )
            assert await statuses(jobs, ids[:2]) == [("running", 1)] * 2
            jobs.release.set()  # type: ignore[attr-defined]
    finally:
        jobs.release.set()  # type: ignore[attr-defined]
    assert await statuses(jobs, ids[:2]) == [("succeeded", 1)] * 2
    await jobs.close()


async def _all_are(jobs: Jobs, ids: list[str], state: tuple[str, int]) -> bool:
    return await statuses(jobs, ids) == [state] * len(ids)


async def status_is(jobs: Jobs, job_id: str, status: str) -> bool:
    info = await jobs.get(job_id)
    return info is not None and info.status == status


async def until_async(check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.fail_after(5):
        while not await check():
            await anyio.lowlevel.checkpoint()


async def test_jobs_on_their_last_attempt_wait_for_a_free_slot_not_a_claim_ahead(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A claim spends an attempt: a job of a task without retries, claimed ahead, would
    end dead if the process were killed before it started. Such jobs stay in the store
    until a slot is free; jobs behind them are claimed ahead as usual."""
    jobs = make_jobs(concurrency=2, shutdown_timeout=10)
    release = anyio.Event()
    ran: list[str] = []

    @jobs.task(name="t")
    async def t(i: int) -> None:
        clock.advance(0.0)
        ran.append(f"t{i}")
        if i in (0, 1):
            await release.wait()

    @jobs.task(name="once", retries=0)
    async def once(i: int) -> None:
        ran.append(f"once{i}")

    await jobs.start()
    try:
        await (await t.enqueue(-1)).result(timeout=5)  # a mean duration: short jobs
        specs = [t.spec(0), t.spec(1), once.spec(0), once.spec(1)]
        specs += [t.spec(i) for i in range(2, 2 + AHEAD)]
        made = [job.id for job in await jobs.enqueue_many(specs)]
        await until(lambda: len(jobs.runner.running) == 2 and jobs.runner._ready)
        # The next AHEAD in line: the two "once" jobs are left, four "t" jobs claimed.
        await until(lambda: len(jobs.runner._ready) == AHEAD - 2)
        assert {row.id for row in jobs.runner._ready} == set(made[4 : 2 + AHEAD])
        assert await statuses(jobs, made[2:4]) == [("queued", 0)] * 2
    finally:
        release.set()
    await until_finished(jobs, made)
    await jobs.close()
    assert await statuses(jobs, made) == [("succeeded", 1)] * len(made)
    assert sorted(ran) == sorted(["t-1", "once0", "once1", *(f"t{i}" for i in range(2 + AHEAD))])


async def test_context_variables_set_by_a_job_do_not_leak_into_the_next(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(concurrency=1)
    var: ContextVar[int | None] = ContextVar("var", default=None)
    seen: list[int | None] = []

    @jobs.task
    async def sets(i: int) -> None:
        seen.append(var.get())
        var.set(i)

    await jobs.enqueue_many([sets.spec(i) for i in range(5)])
    await drain(jobs)
    assert seen == [None] * 5


async def test_a_job_cancelled_between_its_task_creation_and_first_step_never_runs(
    make_jobs: MakeJobs,
) -> None:
    """The narrow window where the job's task exists but has not run yet: cancelling the
    task then would drop the job silently, so the runner leaves a flag it reads first."""
    jobs = make_jobs(concurrency=1)
    ran: list[int] = []

    @jobs.task(name="t")
    async def t(i: int) -> None:
        ran.append(i)

    class CancelOnStart(dict[str, object]):
        def __setitem__(self, job_id: str, running: object) -> None:
            super().__setitem__(job_id, running)
            # Runs after the slot created the job's task, before that task's first step.
            asyncio.get_running_loop().call_soon(jobs.runner.cancel_local, job_id)

    jobs.runner.running = CancelOnStart()  # type: ignore[assignment]
    job = await t.enqueue(1)
    await drain(jobs)
    info = await job.info()
    assert (info.status, info.error) == ("cancelled", "cancelled before it ran")
    assert ran == []
    assert not jobs.runner.running


async def test_a_job_whose_task_is_cancelled_before_its_first_step_goes_back_unspent(
    make_jobs: MakeJobs,
) -> None:
    """Shutdown cancels the tasks of running jobs; a task cancelled before its first step
    never runs its job's code nor its cleanup, so ``cancel_running`` gives it back."""
    jobs = make_jobs(concurrency=1)
    ran: list[int] = []

    @jobs.task(name="t")
    async def t(i: int) -> None:
        ran.append(i)

    job = await t.enqueue(1)
    runner = jobs.runner
    assert await runner.claim() == 1  # its task is created, its first step not yet run
    assert [running.started for running in runner.running.values()] == [False]
    await runner.cancel_running()
    await runner.flush_outbox()
    assert not runner.running
    info = await job.info()
    assert (info.status, info.attempts) == ("queued", 0)
    assert ran == []


async def test_a_job_ending_while_the_outbox_is_written_alone_is_not_left_behind(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Every slot busy, the outbox is written alone while another process holds the
    write lock, and the last running job ends during that write: its outcome is
    written and the worker claims on (its slot's wakeup was lost: nothing ran again)."""
    jobs = make_jobs(concurrency=1, poll_interval=3600, visibility_timeout=60)
    producer = make_jobs(workers=False)
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    gates = {"A": anyio.Event(), "B": anyio.Event()}

    @jobs.task(name="quick")
    async def quick() -> str:
        return "q"

    @jobs.task(name="gated")
    async def gated(name: str) -> str:
        await gates[name].wait()
        if name == "A":
            clock.advance(10)  # a long job: the look-ahead drops to none
        return name

    await jobs.start()
    try:
        runner = jobs.runner
        assert await (await quick.enqueue()).result(timeout=5) == "q"
        a, b = await gated.enqueue("A"), await gated.enqueue("B")
        runner.wake()
        await until(
            lambda: set(runner.running) == {a.id} and [r.id for r in runner._ready] == [b.id]
        )
        # Another process writes for a while (once the store's own write, if one is
        # under way, lets go).
        other = sqlite3.connect(store.path, isolation_level=None, timeout=5)
        other.execute("BEGIN IMMEDIATE")
        try:
            gates["A"].set()  # B takes A's slot; A's outcome is written alone
            await until(lambda: runner._writing)
            gates["B"].set()
            await until(lambda: not runner.running)  # B ended during that write
        finally:
            other.execute("COMMIT")
            other.close()
        assert await a.result(timeout=5) == "A"
        assert await b.result(timeout=5) == "B"
        late = await producer.enqueue("quick")
        runner.wake()  # as another process's write would
        assert await late.result(timeout=5) == "q"
    finally:
        gates["A"].set()
        gates["B"].set()
        await jobs.stop()
