"""Groups behind a backlog longer than a SQLite claim's window (1,000 jobs).

Under a limit a SQLite claim looks through the first ``WINDOW`` ready jobs of a task;
past it, it finds the heads of groups one index seek each, ``GROUPS_PER_CLAIM`` a
claim, taken in turn by name across claims. PostgreSQL reads past the backlog. What
each promises: a group's backlog, run one at a time, does not hold up the other groups
of its task, and a claim's cost does not grow with it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import pytest
from conftest import counting_steps

from asyncjobs import AsyncJobsError, Jobs, Task
from asyncjobs.stores import open_store
from asyncjobs.stores._admission import Admission
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._job_rows import JobRow
from asyncjobs.stores._outcomes import Outcome
from asyncjobs.stores._sqlite_limits import WINDOW, choose
from asyncjobs.stores._sqlite_walks import GROUPS_PER_CLAIM, Walk
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]
BACKLOG = WINDOW + 100


async def test_a_groups_backlog_does_not_hold_up_another_group(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock
) -> None:
    """1,100 jobs of user a run one at a time; user b's job, enqueued after them, runs
    at once, not after a's first 101 (a task with a limit, as without one)."""
    jobs = make_jobs(backend_url)
    ran: list[tuple[str, int]] = []

    @jobs.task(concurrency=5)
    async def sync(user: str, n: int) -> None:
        ran.append((user, n))

    await jobs.enqueue_many([sync.options(group="user:a").spec("a", n) for n in range(BACKLOG)])
    await sync.options(group="user:b").enqueue("b", 0)
    with pytest.raises(AsyncJobsError, match="more are still ready"):
        await drain(jobs, max_jobs=20)  # a's 1,100, one at a time: the first 20 tell
    assert ran.index(("b", 0)) <= 1, ran.index(("b", 0))
    assert [n for user, n in ran if user == "a"] == list(range(len(ran) - 1))


async def test_behind_a_groups_backlog_other_groups_run_in_claim_order(
    make_jobs: MakeJobs,
) -> None:
    """Past the window, the other groups' heads are taken in claim order (priority, then
    enqueue order), by a worker only from its own queues. (SQLite's way past its window;
    PostgreSQL reads past the backlog, as the test above shows.)"""
    jobs = make_jobs(queues=["sync"])
    ran: list[str] = []

    @jobs.task(concurrency=2, queue="sync")
    async def sync(user: str) -> None:
        ran.append(user)

    await jobs.enqueue_many([sync.options(group="user:a").spec("a") for _ in range(BACKLOG)])
    await sync.options(group="user:c", priority=-1).enqueue("c")
    await sync.options(group="user:d", queue="other").enqueue("d")
    await sync.options(group="user:b").enqueue("b")
    await drain(jobs)
    assert ran[:2] == ["a", "b"]
    assert ran.index("c") < 10
    assert "d" not in ran
    assert len(ran) == BACKLOG + 2


async def test_behind_a_groups_backlog_every_group_gets_its_turn(make_jobs: MakeJobs) -> None:
    """More groups behind the backlog than a SQLite claim looks at: the next claims go
    on from the last group looked at, each group still runs one job at a time."""
    jobs = make_jobs()
    ran: list[str] = []

    @jobs.task(concurrency=4)
    async def sync(user: str) -> None:
        ran.append(user)

    await jobs.enqueue_many([sync.options(group="user:a").spec("a") for _ in range(BACKLOG)])
    users = [f"user:{n:04d}" for n in range(2 * GROUPS_PER_CLAIM + 10)]
    await jobs.enqueue_many([sync.options(group=u).spec(u) for u in users for _ in range(2)])
    await drain(jobs)
    assert len(ran) == BACKLOG + 2 * len(users)
    last = max(i for i, user in enumerate(ran) if user != "a")
    # The users' jobs take the three slots user a leaves them from the first claim:
    # about a third as many of a's run meanwhile (not a's first 101, and then those).
    assert ran[:last].count("a") < 2 * len(users) // 3 + 20, ran[:last].count("a")


async def test_past_the_window_a_group_head_of_a_key_takes_one_token(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Past the window, a job both heads its group and is its key's next job: the claim
    takes it once, with one of its key's tokens, and the key's next job with the other."""
    jobs = make_jobs(backend_url)
    jobs.limiter("per_domain", "2/m", key=lambda address: address.split("@")[1])
    ran: list[str] = []

    @jobs.task(limiter="per_domain")
    async def send(address: str) -> None:
        ran.append(address)

    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    await send.options(group="thread-1").enqueue("a@quiet.example")
    await send.enqueue("c@quiet.example")
    await drain(jobs)
    assert ran == ["u0@bulk.example", "u1@bulk.example", "a@quiet.example", "c@quiet.example"]


# -- what a claim reads past the window (SQLite) -----------------------------------------


def _claim(
    tmp_path: Path, name: str, rows: list[tuple[str, str, str, int]]
) -> tuple[int, Admission]:
    """SQLite VM steps of one choose() for a task 'sync' (concurrency 5) over ``rows``
    (status, queue, group, priority) in enqueue order, and its admission."""
    path = tmp_path / f"{name}.db"

    async def create() -> None:
        store = open_store(f"sqlite:///{path}")
        await store.open()
        await store.close()

    asyncio.run(create())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, run_at, "
        "enqueued_at, group_key, priority) VALUES (?, 'sync', ?, ?, '{}', 3, 0, 0, ?, ?)",
        [
            (uuid.uuid4().hex, queue, status, group, priority)
            for status, queue, group, priority in rows
        ],
    )
    db.execute("COMMIT")
    request = ClaimRequest(
        worker="w",
        tasks={"sync": TaskLimits(max_attempts=3, concurrency=5)},
        queues=None,
        limit=8,
        lease=60,
    )
    with counting_steps(db) as steps:  # each step: some claims here take fewer than 100
        db.execute("BEGIN IMMEDIATE")
        admission = choose(db, request, 1000.0)
        db.execute("ROLLBACK")
    db.close()
    return steps.count, admission


def _held_back(backlog: int, groups: int, head: str) -> list[tuple[str, str, str, int]]:
    """``backlog`` queued jobs over ``groups`` groups, each behind a head in ``head``
    status (running, or scheduled: waiting out a retry)."""
    rows = [(head, "default", f"g{n:05d}", 0) for n in range(groups)]
    rows += [("queued", "default", f"g{n % groups:05d}", 0) for n in range(backlog)]
    return rows


def test_a_claim_behind_a_few_groups_does_not_scan_their_backlog(tmp_path: Path) -> None:
    small = _claim(tmp_path, "few-small", _held_back(2_000, 3, "running"))
    large = _claim(tmp_path, "few-large", _held_back(20_000, 3, "running"))
    assert small[1].chosen == large[1].chosen == []
    assert large[0] < 2 * small[0], (small[0], large[0])


def test_a_claim_behind_many_groups_looks_at_a_bounded_number(tmp_path: Path) -> None:
    small = _claim(tmp_path, "many-small", _held_back(2_000, 1_000, "scheduled"))
    large = _claim(tmp_path, "many-large", _held_back(20_000, 10_000, "scheduled"))
    assert small[1].chosen == large[1].chosen == []
    assert large[0] < 2 * small[0], (small[0], large[0])


def test_past_the_window_a_group_running_a_later_job_is_held(tmp_path: Path) -> None:
    """Past the window, a group's queued head is not taken while a later job of it runs
    (a dead job retried by hand); the next group's head is."""
    rows = [("running", "default", "a", 0)] + [("queued", "default", "a", 0)] * BACKLOG
    rows += [("queued", "default", "b", 0), ("running", "default", "b", 0)]
    rows += [("queued", "default", "c", 0)]
    _, admission = _claim(tmp_path, "later", rows)
    assert admission.chosen == [len(rows)]


# -- an idle worker behind many groups ---------------------------------------------------

GROUPS = WINDOW + 2 * GROUPS_PER_CLAIM + 10
"""More groups than a claim's window and two claims past it look at."""


class Counted:
    """``jobs.store``'s claims (with a write of outcomes or without), counted."""

    def __init__(self, jobs: Jobs) -> None:
        self.claims = 0
        store = jobs.store
        claim, finish_and_claim = store.claim, store.finish_and_claim

        async def counted_claim(request: ClaimRequest, *, now: float) -> list[JobRow]:
            self.claims += 1
            return await claim(request, now=now)

        async def counted_finish_and_claim(
            outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
        ) -> tuple[list[str], list[JobRow]]:
            self.claims += 1
            return await finish_and_claim(outcomes, request, now=now)

        store.claim = counted_claim  # type: ignore[method-assign]
        store.finish_and_claim = counted_finish_and_claim  # type: ignore[method-assign]


async def behind_many_groups(jobs: Jobs) -> tuple[Task[[str], None], list[str]]:
    """``GROUPS`` groups of one job each, in queue 'slow' (concurrency 1), whose first
    job another worker runs: their heads all wait for the queue. (A task under a limit:
    a job of it is claimed, never handed to a worker as it is enqueued.)"""
    jobs.queue("slow", concurrency=1)
    ran: list[str] = []

    @jobs.task(concurrency=100)
    async def sync(user: str) -> None:
        ran.append(user)

    await jobs.enqueue_many(
        [sync.options(group=f"g{n:05d}", queue="slow").spec(f"g{n:05d}") for n in range(GROUPS)]
    )
    other = ClaimRequest(
        worker="other", tasks={sync.name: TaskLimits(max_attempts=3)}, queues=None, limit=1,
        lease=3600,
    )  # fmt: skip
    assert len(await jobs.store.claim(other, now=jobs.clock.now())) == 1
    return sync, ran


async def tick(jobs: Jobs, clock: FakeClock, seconds: float) -> None:
    """Move the clock ``seconds`` by 0.1 s, letting the worker claim at each step."""
    for _ in range(round(seconds * 10)):
        clock.advance(0.1)
        for _ in range(3):
            for _ in range(30):
                await anyio.lowlevel.checkpoint()
            await jobs.store._call(lambda db: None)  # type: ignore[attr-defined]


async def test_an_idle_worker_behind_many_groups_claims_once_a_poll(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Each claim looks at the next groups past the window and moved a cursor stored in
    the file: the worker's check for other processes' writes saw that write, and an idle
    worker claimed every 0.1 s, for good (5.6% of a core behind 2,000 groups). Once it
    has been round the groups, it claims at its poll (once a second here)."""
    jobs = make_jobs()
    _, ran = await behind_many_groups(jobs)
    counted = Counted(jobs)
    async with jobs:
        await tick(jobs, clock, 3)  # the worker goes round the groups
        before = counted.claims
        await tick(jobs, clock, 5)
    assert counted.claims - before <= 6, counted.claims - before
    assert ran == []


async def test_a_job_behind_many_held_groups_is_claimed_within_a_turn(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A job enqueued behind them (in another queue), in the group that comes last by
    name, runs once the worker's claims have gone round the groups, a part each look
    (0.1 s), not a part each poll interval."""
    jobs = make_jobs(poll_interval=3600)
    sync, ran = await behind_many_groups(jobs)
    async with jobs:
        await tick(jobs, clock, 3)
        await sync.options(group="zz").enqueue("zz")
        await tick(jobs, clock, 0.1 * (GROUPS // GROUPS_PER_CLAIM + 3))
    assert ran == ["zz"]


async def test_drain_runs_a_job_behind_many_held_groups(make_jobs: MakeJobs) -> None:
    """drain() claims until it has been round the groups: a claim that took nothing
    had looked at only some of them."""
    jobs = make_jobs()
    sync, ran = await behind_many_groups(jobs)
    await drain(jobs)
    await sync.options(group="zz").enqueue("zz")
    await drain(jobs)
    assert ran == ["zz"]


def test_a_walk_goes_round_once_from_where_a_change_found_it() -> None:
    """Past the window, after a change the claims go round the groups once from where
    they were (five a claim here, of groups a to l), also when the group they were at
    is gone: then at most past the last group twice."""

    def turning(after: str, steps: list[tuple[str, bool]]) -> list[bool]:
        """Whether the walk is still going round after each claim's groups (and whether
        that claim came to the last group, then went on from the first)."""
        walk = Walk(after=after, turning=False)
        walk.turn()
        states = []
        for names, at_end in steps:
            walk.moved([(name,) for name in names], 5, at_end)
            states.append(walk.turning)
        return states

    assert turning("c", [("defgh", False), ("ijkla", True), ("bcdef", False)]) == [
        True, True, False,
    ]  # fmt: skip
    # Groups m and after are gone:
    assert turning("m", [("abcde", True), ("fghij", False), ("klabc", True)]) == [
        True, True, False,
    ]  # fmt: skip
