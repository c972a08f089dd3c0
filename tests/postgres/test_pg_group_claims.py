"""A claim reads rows in proportion to its batch and its groups, not to a group's
backlog: every job of a group but its head is unclaimable, and a claim that walked
them read a group of 20,000 jobs 20,000 rows at a time (170 ms a claim). These tests
count the rows a claim reads (PostgreSQL's counters for the transaction), on a table
never analysed (a fresh one: the plan has no statistics to lean on), for a backlog
ten times larger: they read counts, not clocks. (Jobs of no group too: on a fresh
table the claim read them all through asyncjobs_jobs_ready_task and sorted them.)"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from conftest import in_schema

from asyncjobs import RateLimit
from asyncjobs.stores import ClaimRequest, NewJob, Outcome, OutcomeKind, TaskLimits, open_store
from asyncjobs.stores import _postgres_claim as claims
from asyncjobs.stores import _postgres_finish as finishes
from asyncjobs.stores import _postgres_limits as limits
from asyncjobs.stores._postgres_claim import WINDOW_MORE

asyncpg = pytest.importorskip("asyncpg")

# The jobs as the store inserts them, queued, in one statement: $1 of them, in groups
# of $2 (NULL: no group), the first $3 running.
FILL = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, group_key, attempts, worker) "
    "SELECT 'job-' || n, 't', 'default', CASE WHEN n < $3 THEN 'running' ELSE 'queued' END, "
    '0, \'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0, '
    "CASE WHEN $2::int IS NOT NULL THEN 'g' || (n / $2::int) END, "
    "CASE WHEN n < $3 THEN 1 ELSE 0 END, CASE WHEN n < $3 THEN 'other' END "
    "FROM generate_series(0, $1 - 1) AS n"
)
PLAIN = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at) SELECT 'plain-' || n, 't', 'default', 'queued', 0, "
    '\'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0 FROM generate_series(1, $1) AS n'
)
# Rows read so far in this transaction from the job table and its indexes: heap rows
# scanned or fetched, index entries returned.
READ = """
SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid))
FROM pg_class AS c
WHERE c.oid = 'asyncjobs_jobs'::regclass
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'asyncjobs_jobs'::regclass)
"""

FEW_ROWS = 500
"""Rows a claim of ten reads at most behind a backlog of 20,000 jobs (about 200)."""

REQUEST = ClaimRequest(
    worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=10, lease=30.0
)
# Claims under limits, which choose their jobs in asyncjobs/stores/_postgres_limits.py:
# none of these holds a job back here.
PLENTY = RateLimit(rate=1000, per=1)
LIMITED = {
    "concurrency": replace(REQUEST, tasks={"t": TaskLimits(max_attempts=3, concurrency=100)}),
    "queue-concurrency": replace(REQUEST, queue_concurrency={"default": 100}),
    "rate-limit": replace(REQUEST, tasks={"t": TaskLimits(max_attempts=3, rate_limit=PLENTY)}),
    "limiter": replace(
        REQUEST, tasks={"t": TaskLimits(max_attempts=3, limiter="l")}, limiters={"l": PLENTY}
    ),
}
CASES = pytest.mark.parametrize(
    ("group", "running", "plain", "expected"),
    [
        (None, 0, 0, None),  # no group: the first ten
        (10**6, 0, 0, ["job-0"]),  # one group: its head
        (10**6, 1, 0, []),  # one group, its head running: nothing
        (10**6, 0, 5, ["job-0", *(f"plain-{n}" for n in range(1, 6))]),
        (10**6, 1, 5, [f"plain-{n}" for n in range(1, 6)]),
        (1, 0, 0, None),  # groups of one job each: the first ten
        (2, 0, 0, None),  # groups of two: the first of each of the first ten groups
    ],
    ids=["ungrouped", "one-group", "one-group-running", "one-group-and-plain",
         "one-group-running-and-plain", "groups-of-one", "groups-of-two"],
)  # fmt: skip


async def claim_reads(
    jobs: int, group: int | None, running: int, plain: int, request: ClaimRequest = REQUEST
) -> tuple[int, Any]:
    """The rows one claim (``request``) read, and what it claimed, on a fresh table of
    ``jobs`` jobs in groups of ``group``, the first ``running`` of them running, and
    ``plain`` jobs of no group enqueued after them."""
    read, claimed = await rows_read(request, (FILL, jobs, group, running), (PLAIN, plain))
    return read, sorted(row.id for row in claimed)


async def rows_read(
    request: ClaimRequest, *fill: tuple[Any, ...], read: str = READ
) -> tuple[int, Any]:
    """The rows one claim (``request``) read (as ``read`` counts them), and what it
    claimed, on a fresh table filled by the ``fill`` statements (each a statement, then
    its arguments)."""
    async with in_schema(f"asyncjobs_test_{uuid.uuid4().hex[:16]}") as url:
        store = open_store(url)
        await store.open()  # the schema
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            for statement, *args in fill:
                await conn.execute(statement, *args)
            async with conn.transaction():
                before = await conn.fetchval(read)
                claimed = await claims.claim(conn, request, 2.0, "token")
                after = await conn.fetchval(read)
        finally:
            await conn.close()
    return int(after - before), claimed


@pytest.mark.usefixtures("postgres_url")  # skips without a server
@CASES
async def test_a_claim_reads_as_many_rows_for_a_backlog_ten_times_larger(
    group: int | None, running: int, plain: int, expected: list[str] | None
) -> None:
    small, claimed_small = await claim_reads(2_000, group, running, plain)
    large, claimed_large = await claim_reads(20_000, group, running, plain)
    if expected is None:
        step = group or 1
        expected = sorted(f"job-{n * step}" for n in range(10))
    assert claimed_small == claimed_large == expected
    assert large <= small + 20, (small, large)
    # ...and few: not the groups' 20,000 jobs read twice (40,000 rows: the window's read,
    # sorted, on a table never analysed), which the comparison above let pass.
    assert large <= FEW_ROWS, large


@pytest.mark.usefixtures("postgres_url")  # skips without a server
@pytest.mark.parametrize("limit", sorted(LIMITED))
@CASES
async def test_a_claim_under_limits_reads_as_many_rows_for_a_backlog_ten_times_larger(
    limit: str, group: int | None, running: int, plain: int, expected: list[str] | None
) -> None:
    """The same under a concurrency or rate limit: such a claim reads the heads of its
    tasks' ready jobs (_postgres_limits), then takes those it chose."""
    request = LIMITED[limit]
    small, claimed_small = await claim_reads(2_000, group, running, plain, request)
    large, claimed_large = await claim_reads(20_000, group, running, plain, request)
    if expected is None:
        step = group or 1
        expected = sorted(f"job-{n * step}" for n in range(10))
    assert claimed_small == claimed_large == expected
    assert large <= small + 20, (small, large)


async def test_a_claim_past_a_full_window_takes_the_heads_it_may_in_claim_order(
    postgres_url: str,
) -> None:
    """Groups whose backlogs fill the claim's window: each group's head, in priority then
    enqueue order, of this claim's tasks and queues only."""
    store = open_store(postgres_url)
    try:

        def job(n: int, group: str, **fields: Any) -> NewJob:
            values: dict[str, Any] = {
                "task": "t", "queue": "a", "payload": "{}", "status": "queued",
                "priority": 0, "run_at": 1.0, "max_attempts": 3, "group_key": group,
            }  # fmt: skip
            values.update(fields)
            return NewJob(id=f"{group}-{n}", **values)

        backlog = 3 * (REQUEST.limit + WINDOW_MORE)
        await store.insert(
            [job(n, "big") for n in range(backlog)]
            + [job(n, "other-queue", queue="b") for n in range(3)]
            + [job(n, "other-task", task="u") for n in range(3)]
            + [job(n, "urgent", priority=5 - n) for n in range(3)]  # the head: its first
            + [job(n, "plain", group_key=None) for n in range(2)],
            now=1.0,
        )
        claimed = await store.claim(replace(REQUEST, queues=["a"]), now=2.0)
        assert [row.id for row in claimed] == ["urgent-0", "big-0", "plain-0", "plain-1"]
        claimed = await store.claim(replace(REQUEST, queues=["a"]), now=2.0)
        assert claimed == []  # every group runs one
    finally:
        await store.close()


async def test_a_claim_under_limits_past_a_full_walk_takes_the_heads_it_may_in_claim_order(
    postgres_url: str,
) -> None:
    """Under limits, a group's backlog filling the jobs a claim walks: the heads of the
    other groups in claim order, also on the next page, read past a queue found full."""
    store = open_store(postgres_url)
    try:

        def job(n: int, group: str, **fields: Any) -> NewJob:
            values: dict[str, Any] = {
                "task": "t", "queue": "b", "payload": "{}", "status": "queued",
                "priority": 0, "run_at": 1.0, "max_attempts": 3, "group_key": group,
            }  # fmt: skip
            values.update(fields)
            return NewJob(id=f"{group}-{n}", **values)

        page = REQUEST.limit + 16  # a page of heads (_postgres_limits)
        await store.insert(
            [job(n, "big") for n in range(3 * limits.WALK * page)]
            + [job(0, f"a{n}", queue="a", priority=5) for n in range(page + 10)]
            + [job(n, "busy") for n in range(2)]
            + [job(n, "later", status="scheduled", run_at=3600.0) for n in range(2)]
            + [job(0, "other-task", task="u")]
            + [job(0, "other-queue", queue="c")]
            + [job(0, f"b{n}") for n in range(20)],
            now=1.0,
        )
        await store.claim(
            replace(REQUEST, tasks={"t": TaskLimits(max_attempts=3)}, limit=1, queues=["b"]),
            now=2.0,
        )  # big-0 runs: its group is busy
        request = replace(
            REQUEST,
            tasks={"t": TaskLimits(max_attempts=3, concurrency=100)},
            queues=["a", "b"],
            queue_concurrency={"a": 1},  # full once a0-0 is taken: the page's a's are not
        )
        claimed = await store.claim(request, now=2.0)
        assert [row.id for row in claimed] == ["a0-0", "busy-0", *(f"b{n}-0" for n in range(8))]
    finally:
        await store.close()


async def finish_reads(jobs: int) -> int:
    """The rows a finish of a group's head read, its group ``jobs`` long, on a fresh table
    (the finish looks for the group's next job: whether to wake other processes)."""
    async with in_schema(f"asyncjobs_test_{uuid.uuid4().hex[:16]}") as url:
        store = open_store(url)
        await store.open()  # the schema
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(FILL, jobs, 10**6, 1)  # the head runs
            outcome = Outcome(job_id="job-0", worker="other", attempt=1, kind=OutcomeKind.SUCCEEDED)
            async with conn.transaction():
                before = await conn.fetchval(READ)
                applied = await finishes.apply(conn, [outcome], 2.0, [])
                after = await conn.fetchval(READ)
        finally:
            await conn.close()
    assert applied == ["job-0"]
    return int(after - before)


@pytest.mark.usefixtures("postgres_url")  # skips without a server
async def test_finishing_a_group_job_reads_as_many_rows_for_a_backlog_ten_times_larger() -> None:
    small = await finish_reads(2_000)
    large = await finish_reads(20_000)
    assert small > 0
    assert large <= small + 20, (small, large)


# One-job groups ($1 of them, each job and its group named $3 and their number, enqueued
# after the jobs already there), of task $2, queued, as the store inserts them.
ONE_JOB_GROUPS = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, group_key) "
    "SELECT $3 || n, $2, 'default', 'queued', 0, '{\"args\":[],\"kwargs\":{}}', 3, 0.0, 1.0, "
    "$3 || n FROM generate_series(1, $1) AS n"
)


async def claim_reads_behind(groups: int, request: ClaimRequest) -> tuple[int, Any]:
    """The rows one claim (``request``) read, and what it claimed, on a table of a group
    of 200 queued jobs (its backlog fills the window) then ``groups`` one-job groups.

    Analysed: what is measured is the walk through the groups, which reads a seek a group
    whatever the statistics; never analysed, the window's read may be planned as a read
    of every ready job of a group (another matter, which this would measure too)."""
    return await rows_read(
        request,
        (FILL, 200, 10**6, 0),
        (ONE_JOB_GROUPS, groups, "t", "g"),
        ("ANALYZE asyncjobs_jobs",),  # see the docstring
    )


PLAIN_AND_LIMITED = {"plain": REQUEST, **LIMITED}


@pytest.mark.usefixtures("postgres_url")  # skips without a server
@pytest.mark.parametrize("kind", sorted(PLAIN_AND_LIMITED))
async def test_a_claim_behind_a_full_window_reads_as_many_rows_for_ten_times_the_groups(
    kind: str,
) -> None:
    """Past a window filled by one group's backlog, a claim (plain, or under limits: past
    a task's walk) looks at a bounded number of groups (limits.GROUPS_PER_CLAIM), not at
    every group's first job (60,000 rows read behind 10,000 groups)."""
    request = PLAIN_AND_LIMITED[kind]
    small, claimed_small = await claim_reads_behind(1_000, request)
    large, claimed_large = await claim_reads_behind(10_000, request)
    assert len(claimed_small) == len(claimed_large) == REQUEST.limit
    assert "job-0" in {row.id for row in claimed_small}  # the big group's head
    assert large <= small + 20, (small, large)


@pytest.mark.parametrize("kind", sorted(PLAIN_AND_LIMITED))
@pytest.mark.parametrize("stores", [1, 2])
async def test_a_head_in_the_last_group_behind_many_is_claimed_within_a_round(
    postgres_url: str, stores: int, kind: str
) -> None:
    """Each claim past a full window goes on through the groups from where the store's
    last one stopped, so the last group by name gets its turn within one round of them,
    by each of the stores claiming in turn (each keeps its own place)."""
    groups = 1_000
    conn = await asyncpg.connect(postgres_url)
    claimers = [open_store(postgres_url) for _ in range(stores)]
    try:
        await claimers[0].open()  # the schema
        await conn.execute(FILL, 200, 10**6, 1)  # g0: its head runs, its backlog fills the window
        await conn.execute(ONE_JOB_GROUPS, groups, "u", "g")  # of a task not claimed here
        await conn.execute(ONE_JOB_GROUPS, 1, "t", "zzz")
        rounds = -(-(groups + 2) // limits.GROUPS_PER_CLAIM) + 1
        claimed: list[str] = []
        for _ in range(rounds):
            for store in claimers:
                claimed += [row.id for row in await store.claim(PLAIN_AND_LIMITED[kind], now=2.0)]
            if claimed:
                break
        assert claimed == ["zzz1"]
    finally:
        for store in claimers:
            await store.close()
        await conn.close()


# The first $1 jobs of the one-job groups, running (committed: their workers' claims).
RUNNING_GROUPS = (
    "UPDATE asyncjobs_jobs SET status = 'running', worker = 'other', attempts = 1 "
    "WHERE group_key IS NOT NULL AND seq <= $1"
)


async def claim_reads_beside_running(running: int, request: ClaimRequest) -> int:
    """The rows a claim of 100 (``request``) reads on a table of 1,000 one-job groups,
    the first ``running`` of them running, analysed before they ran (few running jobs,
    the statistics say)."""
    request = replace(request, limit=100)
    read, claimed = await rows_read(
        request,
        (ONE_JOB_GROUPS, 1_000, "t", "g"),
        ("ANALYZE asyncjobs_jobs",),
        (RUNNING_GROUPS, running),
    )
    assert len(claimed) == request.limit
    return read


@pytest.mark.usefixtures("postgres_url")  # skips without a server
@pytest.mark.parametrize("kind", ["plain", "rate-limit", "limiter"])  # none holds a job back
async def test_a_claim_reads_as_many_rows_beside_ten_times_the_running_group_jobs(
    kind: str,
) -> None:
    """Whether a group runs a job is one seek of asyncjobs_jobs_group_busy per head it
    tests. Planned as a join against an index the statistics say is empty, each test
    read every running job of any group: 100 of them (another claim's, even one not yet
    committed) cost a claim of 100 about 11,600 index entries and as many heap rows."""
    request = PLAIN_AND_LIMITED[kind]
    small = await claim_reads_beside_running(10, request)
    large = await claim_reads_beside_running(100, request)
    # A row or two more for each running job: the index entries of its queued version,
    # dead (no vacuum ran) and read once, by the first claim that passes them.
    assert large - small <= 2 * (100 - 10), (small, large)


# Rows a claim reads per job it takes, at most, beyond FEW_ROWS: a claim of n reads about
# 6 (1,000 one-job groups, analysed: 96 rows for a claim of 10, 636 for one of 100).
ROWS_A_JOB = 10


@pytest.mark.usefixtures("postgres_url")  # skips without a server
@pytest.mark.parametrize("limit", [10, 100])
@pytest.mark.parametrize("analysed", [False, True], ids=["fresh", "analysed"])
async def test_a_claim_beside_a_thousand_one_job_groups_reads_a_few_rows_a_job(
    limit: int, analysed: bool
) -> None:
    """On a table never analysed, 1,000 one-job groups had a claim of 100 read 116,000
    index entries of asyncjobs_jobs_group (each head's test for an earlier job of its
    group, a join that read every unfinished job of any group) and 100,000 rows to lock
    the 100 it took (each read through asyncjobs_jobs_counts, by status, not by seq),
    and the window's seeks read the queued jobs through it too (about 1,000 rows a
    step), until that index held no queued job."""
    request = replace(REQUEST, limit=limit)
    fill: list[tuple[Any, ...]] = [(ONE_JOB_GROUPS, 1_000, "t", "g")]
    if analysed:
        fill.append(("ANALYZE asyncjobs_jobs",))
    count, claimed = await rows_read(request, *fill)
    assert [row.id for row in claimed] == [f"g{n}" for n in range(1, limit + 1)]
    # ...and the table once at most: a table it takes for small (11 pages), PostgreSQL
    # may update from one read of it all rather than a seek a row.
    assert count <= ROWS_A_JOB * limit + FEW_ROWS + 1_000, count
