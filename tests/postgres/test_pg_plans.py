"""The plans PostgreSQL picks for the hot statements, with the statistics it really has.

The table's statistics are gathered while few jobs run (as autovacuum sees a working
queue: most rows finished or waiting), and a batch is then finished while many run.
A plan that trusts "few running" and walks the running rows first does work in
proportion to running rows times batch size; these tests hold each statement to work
in proportion to its batch. They read plans, not clocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from plan_tables import PlanTables, fill, shared_tables

from asyncjobs import RateLimit
from asyncjobs.stores import ClaimRequest, TaskLimits, open_store
from asyncjobs.stores._postgres_admin import (
    _PRUNE_CANCELLED,
    _PRUNE_DEAD,
    _PRUNE_SUCCEEDED,
    _SAMPLES,
    _WINDOWS,
)
from asyncjobs.stores._postgres_claim import claim
from asyncjobs.stores._postgres_finish import _FINISH, _FINISH_PLAIN
from asyncjobs.stores._postgres_limits import _READY, _READY_IN_QUEUES

asyncpg = pytest.importorskip("asyncpg")

RUNNING, BATCH = 250, 100


@pytest.fixture(scope="module")
def tables() -> Iterator[PlanTables]:
    """Tables the read-only tests share (skips without a server)."""
    with shared_tables() as shared:
        yield shared


async def statistics_as_asked(conn: Any) -> None:
    """Keep autovacuum off the test's table: a fresh table stays never analysed, an
    analysed one keeps the ANALYZE the test ran. Two 1,000,000-row "fresh" claims each
    read the whole table once (about 384,000 pages), in full suites run three at a time
    on one server; never reproduced alone, the cause not shown. Autovacuum is what
    changes a table's statistics without the test asking."""
    await conn.execute("ALTER TABLE asyncjobs_jobs SET (autovacuum_enabled = off)")


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def claimed_from_b_and_c(
    url: str, fill_queue: str, others: int, analyzed: bool
) -> tuple[list[int], int, int]:
    """A claim of ``BATCH`` from queues b and c (150 and 50 jobs filled by ``fill_queue``)
    beside ``others`` jobs in queue a, explained: ``claim_reads`` of its plan."""
    store = open_store(url)
    await store.open()  # the schema
    await store.close()
    conn = await asyncpg.connect(url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(fill_queue, "a-", "a", others, 7)
        await conn.execute(fill_queue, "b-", "b", 150, 5)
        await conn.execute(fill_queue, "c-", "c", 50, 3)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        explained = Explained(conn)
        async with conn.transaction():
            await claim(explained, replace(CLAIM, queues=["b", "c"]), 2.0, "token")  # type: ignore[arg-type]
    finally:
        await conn.close()
    return claim_reads(explained.plan)


def claim_reads(plan: dict[str, Any]) -> tuple[list[int], int, int]:
    """A claim's plan: the rows each update took, and the rows and pages its steps read
    (not the update's own read of the rows it takes)."""
    updated = [n for n in nodes(plan) if n["Node Type"] == "ModifyTable"]
    steps = [
        n
        for n in nodes(plan)
        if n.get("Relation Name") == "asyncjobs_jobs"
        and n["Node Type"] != "ModifyTable"
        and n not in updated[0].get("Plans", [])  # the update's own read of its rows
    ]
    rows = sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in steps
    )
    pages = sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in steps)
    return [n["Actual Rows"] for n in updated], rows, pages


# The jobs as the store inserts them, queued, in one statement (200,000 in a second).
FILL = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at) SELECT 'job-' || lpad(n::text, 6, '0'), 't', 'default', 'queued', "
    '0, \'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0 FROM generate_series(0, $1 - 1) AS n'
)


# 200,000 never analysed: the running rows read as one (two IS NULL tests without
# statistics, 0.5% each), and the plain finish walked them once per outcome.
@pytest.mark.parametrize("jobs", [300, 3_000, 200_000])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize("statement", [_FINISH_PLAIN, _FINISH], ids=["plain", "with_dependents"])
async def test_finishing_a_batch_compares_each_outcome_with_its_own_row_only(
    postgres_url: str, statement: str, analyzed: bool, jobs: int
) -> None:
    store = open_store(postgres_url)
    await store.open()  # the schema
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL, jobs)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")  # no job running
        await conn.execute(
            "UPDATE asyncjobs_jobs SET status = 'running', worker = 'w', attempts = 1 "
            "WHERE seq <= $1",
            RUNNING,
        )
        rows = [(f"job-{n:06d}", "w", 1, "succeeded", None, None, None, None) for n in range(BATCH)]
        # The plan a prepared statement settles on after its first executions.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE finish AS " + statement)
        text = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE finish(2.0, '{json.dumps(rows)}')"
        )
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] == BATCH
    for node in nodes(plan):
        # The outcomes are read once, and no row is compared with every outcome.
        if node["Node Type"] == "Function Scan":
            assert node["Actual Loops"] == 1, node
        assert node.get("Rows Removed by Join Filter", 0) <= BATCH, node


# Finished jobs past retention, chain members (each the one before the next) and
# batch members (of a batch whose on_complete ran and went), and many members of
# chains under way still waiting.
FILL_CHAINS = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, finished_at, chain_next, batch_id) "
    "SELECT 'job-' || lpad(n::text, 6, '0'), "
    "'t', 'default', CASE WHEN n < $1 THEN 'succeeded' ELSE 'waiting' END, 0, "
    '\'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0, CASE WHEN n < $1 THEN 1.0 END, '
    "CASE WHEN n < $1 AND n % 2 = 0 THEN 'job-' || lpad((n + 1)::text, 6, '0') END, "
    "CASE WHEN n < $1 AND n % 2 = 1 THEN 'gone' END "
    "FROM generate_series(0, $1::int + $2::int - 1) AS n"
)


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_prune_seeks_each_follower_and_on_complete_not_every_waiting_job(
    postgres_url: str, analyzed: bool
) -> None:
    """A prune keeps a batch member while its on_complete waits, and a chain member
    while the one after it waits for it (retried by hand). As NOT EXISTS, PostgreSQL
    read every waiting job (every chain member under way, every on_complete) for each
    batch of 500 it deleted; it looks each one up by id instead."""
    store = open_store(postgres_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL_CHAINS, 2_000, 20_000)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE prune AS " + _PRUNE_SUCCEEDED)
        deleting = conn.transaction()
        await deleting.start()
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune(2.0, {BATCH})")
        await deleting.rollback()
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] == BATCH
    for node in nodes(plan):
        if node.get("Alias") in ("b", "c"):  # a batch's on_complete, a chain's follower
            assert node["Actual Rows"] <= 1, node


class Explained:
    """A connection whose claim statement (the one WITH RECURSIVE) is run under EXPLAIN
    (ANALYZE, BUFFERS) instead: its plan in ``plan``, as PostgreSQL ran it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.plan: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        if "WITH RECURSIVE" not in query:
            return list(await self._conn.fetch(query, *args))
        text = await self._conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
        self.plan = json.loads(text)[0]["Plan"]
        return []


CLAIM = ClaimRequest(
    worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=BATCH, lease=30.0
)
STEP = 10
"""Rows (and pages) a claim reads per job it takes, at most: a seek in the ready index,
the row by its seq, and the row it locks (about 3)."""


# 500 and 1,200 never analysed: each step read every queued job through
# asyncjobs_jobs_counts (one page: one key) and sorted them (100,000 rows a claim);
# 1,000,000 never analysed: the first step read them all through
# asyncjobs_jobs_ready_task_plain (by task) and sorted them. (A million analysed, which
# never failed, is left out: each fill of a million costs CI about 25 s.)
@pytest.mark.parametrize(
    ("analyzed", "jobs"),
    [(a, n) for a in (False, True) for n in (10, 100, 500, 1_200, 20_000)] + [(False, 1_000_000)],
    ids=lambda value: {False: "fresh", True: "analyzed"}.get(value, str(value)),
)
async def test_a_claim_walks_the_ready_jobs_in_claim_order(
    postgres_url: str, analyzed: bool, jobs: int
) -> None:
    """A claim of 100 reads each next job with one seek in claim order, whatever the
    table's statistics: rows and pages in proportion to what it takes. The update that
    follows may read a small table once, not counted: it is no step. A table of a page
    or two (100 jobs, analysed), PostgreSQL reads whole at each step rather than seek in
    an index, as many pages: there only the pages are bounded."""
    store = open_store(postgres_url)
    await store.open()  # the schema
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL, jobs)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        explained = Explained(conn)
        async with conn.transaction():
            await claim(explained, CLAIM, 2.0, "token")  # type: ignore[arg-type]
    finally:
        await conn.close()

    updated, rows, pages = claim_reads(explained.plan)
    assert updated == [min(jobs, BATCH)]
    assert pages <= STEP * BATCH, pages
    if jobs > BATCH:
        assert rows <= STEP * BATCH, rows


# Queued jobs of task t in queue $2, named $1 || n, one in $4 of priority 1.
FILL_QUEUE = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at) SELECT $1 || n, 't', $2, 'queued', (n % $4 = 0)::int, "
    '\'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0 FROM generate_series(1, $3) AS n'
)


# Every one fresh or analysed, before the per-queue walk: the claim read the other
# queue's backlog whole (100,000 rows, 12,000 pages behind 100,000 jobs). (Not a
# million: 100,000 already shows a read in proportion to the backlog, and each fill of a
# million costs CI about 30 s.)
@pytest.mark.parametrize("others", [10, 1_000, 100_000])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_claim_from_some_queues_reads_none_of_the_other_queues_jobs(
    postgres_url: str, analyzed: bool, others: int
) -> None:
    """A worker serving queues b and c beside a backlog in queue a: its claim reads
    each queue's next job in claim order (a seek a queue a step), in proportion to what
    it takes, whatever the backlog elsewhere and the table's statistics. A table of a
    few pages, analysed, PostgreSQL reads whole at each step: there only the pages are
    bounded, as in test_a_claim_walks_the_ready_jobs_in_claim_order."""
    updated, rows, pages = await claimed_from_b_and_c(postgres_url, FILL_QUEUE, others, analyzed)
    assert updated == [BATCH]
    assert pages <= 2 * STEP * BATCH, pages
    if others > BATCH:  # (210 jobs analysed: the table whole at each step, 4 pages)
        assert rows <= 2 * STEP * BATCH, rows


# As FILL_QUEUE, each job in a group of its own ($1 || n).
FILL_QUEUE_GROUPS = FILL_QUEUE.replace(
    "run_at, enqueued_at)", "run_at, enqueued_at, group_key)"
).replace("1.0 FROM", "1.0, $1 || n FROM")


# Before the window a queue at a time, 20,000 fresh or analysed: the claim took none.
@pytest.mark.parametrize("others", [10, 20_000])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_claim_from_some_queues_reads_their_groups_heads_not_the_other_queues(
    postgres_url: str, analyzed: bool, others: int
) -> None:
    """As test_a_claim_from_some_queues_reads_none_of_the_other_queues_jobs, every job in
    a group of its own. The window of the heads of groups a claim reads first (in claim
    order) was the first jobs of groups of every queue: filled by queue a's, the claim
    looked for b's and c's heads only on its walk through the groups past it, 256 groups a
    claim in name order (here a's alone), and took none."""
    updated, rows, pages = await claimed_from_b_and_c(
        postgres_url, FILL_QUEUE_GROUPS, others, analyzed
    )
    assert updated == [BATCH]
    # Each step reads each queue's next job of a group (two seeks a queue) and tests the
    # head's group (two more): about 2,300 pages here, beside 10 jobs in a or 20,000.
    assert pages <= 3 * STEP * BATCH, pages
    if others > BATCH:  # (210 jobs analysed: the table whole at each step, 6 pages)
        assert rows <= 2 * STEP * BATCH, rows


class ExplainedHeads:
    """A connection whose statements that read the heads of the tasks' ready jobs under
    limits (_postgres_limits._HEADS) are run under EXPLAIN (ANALYZE, BUFFERS) too: their
    plans in ``plans``. Each is then run as usual, so the claim goes on."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.plans: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        if "AS t(name, keyed_only)" in query:
            explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query
            self.plans.append(json.loads(await self._conn.fetchval(explain, *args))[0]["Plan"])
        return list(await self._conn.fetch(query, *args))


# Before the walk per queue, every one of 20,000 fresh or analysed: the claim read the
# task's jobs in queue a on its way (20,000 rows).
@pytest.mark.parametrize("others", [10, 20_000])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize(
    "limits",
    [
        TaskLimits(max_attempts=3, concurrency=1_000),
        TaskLimits(max_attempts=3, rate_limit=RateLimit(rate=1_000, per=1)),
    ],
    ids=["concurrency", "rate_limit"],
)
async def test_a_limited_claim_from_some_queues_reads_none_of_the_other_queues_jobs(
    postgres_url: str, analyzed: bool, others: int, limits: TaskLimits
) -> None:
    """As test_a_claim_from_some_queues_reads_none_of_the_other_queues_jobs, under a
    concurrency or rate limit on the task: the heads of its ready jobs are read a queue
    at a time, in proportion to what the claim takes, whatever the backlog of the task
    in another queue."""
    store = open_store(postgres_url)
    await store.open()  # the schema
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL_QUEUE, "a-", "a", others, 7)
        await conn.execute(FILL_QUEUE, "b-", "b", 150, 5)
        await conn.execute(FILL_QUEUE, "c-", "c", 50, 3)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        explained = ExplainedHeads(conn)
        request = replace(CLAIM, tasks={"t": limits}, queues=["b", "c"])
        async with conn.transaction():
            claimed = await claim(explained, request, 2.0, "token")  # type: ignore[arg-type]
    finally:
        await conn.close()

    assert len(claimed) == BATCH
    assert {job.queue for job in claimed} == {"b", "c"}
    assert explained.plans
    steps = [
        n
        for plan in explained.plans
        for n in nodes(plan)
        if n.get("Relation Name") == "asyncjobs_jobs"
    ]
    rows = sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in steps
    )
    pages = sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in steps)
    assert pages <= 2 * STEP * BATCH, pages
    assert rows <= 2 * STEP * BATCH, rows


# Finished jobs of five tasks, and queued jobs of the first alone (every tenth job).
FILL_FINISHED = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, finished_at) SELECT 'job-' || n, 't' || (n % 5), 'default', "
    "CASE WHEN n % 10 = 0 THEN 'queued' ELSE 'succeeded' END, 0, "
    '\'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0, CASE WHEN n % 10 > 0 THEN 2.0 END '
    "FROM generate_series(0, $1 - 1) AS n"
)


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize("queues", [None, ["default"]], ids=["any-queue", "in-queues"])
@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_whether_a_task_has_a_ready_job_is_one_seek(
    tables: PlanTables, analyzed: bool, queues: list[str] | None, mode: str
) -> None:
    """A claim under a rate limit asks whether a task whose bucket is empty has a job
    waiting (_has_ready). Of a task with none, PostgreSQL counted (from the statistics:
    a tenth queued, a fifth of this task) thousands, and read the table from the start
    to find the first: all 200,000 rows, at every claim until the bucket refilled."""
    rows = fill((FILL_FINISHED, [200_000]))
    url = await tables.url(rows, "ANALYZE asyncjobs_jobs" if analyzed else None)
    conn = await asyncpg.connect(url)  # the statement only reads: the table is shared
    try:
        statement, args = (
            (_READY, "'t3'") if queues is None else (_READY_IN_QUEUES, "'t3', '{default}'")
        )
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute("PREPARE ready AS " + statement)
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE ready({args})")
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()
    assert plan["Actual Rows"] == 0
    for node in nodes(plan):
        assert node.get("Rows Removed by Filter", 0) <= 10, node
        assert node["Shared Hit Blocks"] + node["Shared Read Blocks"] <= 10, node


# Jobs of one status finished at $3 (NULL: unfinished), named $1 || n.
FILL_STATUS = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, finished_at) SELECT $1 || n, 't', 'default', $2, 0, "
    '\'{"args":[],"kwargs":{}}\', 3, 0.0, 1.0, $3::float8 FROM generate_series(1, $4) AS n'
)


def rows_read(plan: dict[str, Any]) -> int:
    """Rows (index entries) every scan of the plan read, kept or filtered out."""
    return sum(
        (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for node in nodes(plan)
        if "Scan" in node["Node Type"]
    )


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize(
    ("statement", "status", "kept"),
    [
        (_PRUNE_SUCCEEDED, "succeeded", "succeeded"),
        (_PRUNE_CANCELLED, "cancelled", "cancelled"),
        (_PRUNE_DEAD, "dead", "dead"),
    ],
    ids=["succeeded", "cancelled", "dead"],
)
async def test_a_prune_batch_reads_rows_in_proportion_to_the_batch_not_the_backlog(
    postgres_url: str, statement: str, status: str, kept: str, analyzed: bool
) -> None:
    """Queued jobs and finished ones still within retention cost a prune nothing: it
    walks the finished jobs oldest first and stops at its batch. It read the status
    index for them instead (every succeeded job, or every dead one), and its DELETE
    matched the batch by a hash of the whole table once analysed."""
    store = open_store(postgres_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL_STATUS, "queued-", "queued", None, 50_000)
        # Still within retention, and first in the status index (earlier in the heap).
        await conn.execute(FILL_STATUS, "kept-", kept, 5.0, 20_000)
        await conn.execute(FILL_STATUS, "old-", status, 1.0, 2_000)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE prune AS " + statement)
        deleting = conn.transaction()
        await deleting.start()
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune(2.0, {BATCH})")
        await deleting.rollback()
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] == BATCH
    assert rows_read(plan) <= 4 * BATCH, plan


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize("expired", [2_000, 0])
@pytest.mark.parametrize(
    ("statement", "status"),
    [(_PRUNE_SUCCEEDED, "succeeded"), (_PRUNE_CANCELLED, "cancelled")],
    ids=["succeeded", "cancelled"],
)
async def test_a_prune_batch_does_not_read_the_dead_jobs_kept_longer(
    postgres_url: str, statement: str, status: str, expired: int, analyzed: bool
) -> None:
    """Dead jobs are kept longer than succeeded and cancelled ones: a batch of those
    walks their own jobs past retention, not every dead job older than them. It read
    them all (100,000 rows removed by filter), every minute in every process, even
    when nothing was to be pruned."""
    store = open_store(postgres_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await statistics_as_asked(conn)
        await conn.execute(FILL_STATUS, "dead-", "dead", 1.0, 100_000)
        await conn.execute(FILL_STATUS, "old-", status, 1.5, expired)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_jobs")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE prune AS " + statement)
        deleting = conn.transaction()
        await deleting.start()
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune(2.0, {BATCH})")
        await deleting.rollback()
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] == min(expired, BATCH)
    assert rows_read(plan) <= 4 * BATCH, plan


# Jobs of one status finished one a second from $3 on, named $1 || n.
FILL_SPREAD = FILL_STATUS.replace("$3::float8", "$3::float8 + n")


# Not held here, as before the finished index had the status (the same rows or more):
# the samples as a custom plan on a table never analysed (a bitmap of each status,
# sorted: every succeeded and dead job), and the windows as a generic plan once
# analysed (a sequential scan: $2 reads as a third of the table). A prepared
# statement keeps the custom plan of the windows, the cheaper.
@pytest.mark.parametrize(
    ("statement", "args", "analyzed", "mode"),
    [
        (_WINDOWS, "'{900000, 999000}', 900000", False, "force_custom_plan"),
        (_WINDOWS, "'{900000, 999000}', 900000", True, "force_custom_plan"),
        (_SAMPLES, "100", False, "force_generic_plan"),
        (_SAMPLES, "100", True, "force_custom_plan"),
        (_SAMPLES, "100", True, "force_generic_plan"),
    ],
    ids=[
        "windows-fresh",
        "windows-analyzed",
        "samples-fresh",
        "samples-analyzed",
        "samples-analyzed-generic",
    ],
)
async def test_the_snapshot_reads_the_newest_finished_jobs_not_all_of_them(
    tables: PlanTables, statement: str, args: str, analyzed: bool, mode: str
) -> None:
    """The windows (jobs finished in the last minute, 5 minutes) and the samples (the
    newest succeeded and dead jobs) read each status's newest jobs in the finished
    index, (status, finished_at): older finished jobs cost them nothing."""
    rows = fill(
        *(
            step
            for status in ("succeeded", "dead", "cancelled")
            for step in (
                (FILL_SPREAD, [f"old-{status}-", status, 0.0, 50_000]),
                (FILL_SPREAD, [f"new-{status}-", status, 999_500.0, 50]),
            )
        )
    )
    url = await tables.url(rows, "ANALYZE asyncjobs_jobs" if analyzed else None)
    conn = await asyncpg.connect(url)  # the statements only read: the table is shared
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute("PREPARE snapshot AS " + statement)
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE snapshot({args})")
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] in (3, 100)  # a row per status, or the samples
    assert rows_read(plan) <= 1_000, plan
