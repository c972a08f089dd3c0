"""Retention: finished jobs are pruned after ``retention``, dead ones after ``dead_retention``."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from conftest import counting_steps

from asyncjobs import Jobs, JobStatus
from asyncjobs._retention import prune_expired
from asyncjobs.stores._sqlite_admin import _prune, _prune_buckets
from asyncjobs.stores._sqlite_schema import migrate
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

HOUR = 3600.0


async def finished_mix(jobs: Jobs) -> dict[str, str]:
    """One job in each status that matters here; returns their ids by status."""

    @jobs.task(name="ok")
    async def ok() -> None: ...

    @jobs.task(name="boom", retries=0)
    async def boom() -> None:
        raise RuntimeError("boom")

    succeeded = await jobs.enqueue(ok.options(idempotency_key="once"))
    dead = await jobs.enqueue(boom)
    cancelled = await jobs.enqueue(ok.options(delay=10))
    await cancelled.cancel()
    await drain(jobs)
    scheduled = await jobs.enqueue(ok.options(delay=100 * HOUR))
    ids = {"succeeded": succeeded.id, "dead": dead.id, "cancelled": cancelled.id}
    for status, job_id in ids.items():
        assert (await jobs.get(job_id)) is not None, status
    return ids | {"scheduled": scheduled.id}


async def statuses(jobs: Jobs) -> set[str]:
    return {info.status.value for info in await jobs.list()}


async def test_finished_jobs_are_pruned_after_retention_dead_ones_later(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR, dead_retention=5 * HOUR)
    await finished_mix(jobs)
    clock.advance(HOUR - 1)
    assert await prune_expired(jobs) == 0
    clock.advance(2)
    assert await prune_expired(jobs) == 2  # succeeded and cancelled
    assert await statuses(jobs) == {"dead", "scheduled"}
    clock.advance(4 * HOUR)
    assert await prune_expired(jobs) == 1
    assert await statuses(jobs) == {"scheduled"}  # unfinished jobs are never pruned


async def test_a_pruned_idempotency_key_can_be_used_again(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR)
    ids = await finished_mix(jobs)
    task = jobs.registry["ok"]
    kept = await jobs.enqueue(task.options(idempotency_key="once"))
    assert kept.id == ids["succeeded"]  # still kept: enqueue returns the existing job
    clock.advance(HOUR + 1)
    await prune_expired(jobs)
    fresh = await jobs.enqueue(task.options(idempotency_key="once"))
    assert fresh.id != ids["succeeded"]


async def test_pruning_deletes_in_bounded_batches(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(retention=HOUR)

    @jobs.task
    async def ok() -> None: ...

    for _ in range(7):
        await jobs.enqueue(ok)
    await drain(jobs)
    clock.advance(HOUR + 1)
    assert await prune_expired(jobs, batch=2, max_batches=3) == 6
    assert len(await jobs.list()) == 1
    assert await prune_expired(jobs, batch=2, max_batches=3) == 1
    assert await jobs.list() == []


async def test_the_maintenance_loop_prunes_while_workers_run(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=HOUR, visibility_timeout=60)

    @jobs.task
    async def ok() -> int:
        return 1

    async with jobs:
        job = await jobs.enqueue(ok)
        assert await job.result(timeout=5) == 1
        assert (await job.info()).status == JobStatus.SUCCEEDED
        # The maintenance loop's first round done (else a prune under way reads the
        # time before the clock moves and its next round is an hour later): asleep.
        asleep_until = clock.now() + 30  # visibility_timeout / 2
        with anyio.fail_after(5):
            while not any(entry[0] == asleep_until for entry in clock._sleepers):
                await anyio.lowlevel.checkpoint()
        clock.advance(HOUR + 61)  # past retention, and the loop's next pruning round
        with anyio.fail_after(5):
            while await jobs.get(job.id) is not None:
                await anyio.lowlevel.checkpoint()


async def bucket_keys(db_url: str) -> list[tuple[str, str]]:
    """(name, key) of every rate-limit bucket stored behind ``db_url``, sorted."""
    if db_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as db:
            rows = db.execute("SELECT name, key FROM asyncjobs_rate_buckets").fetchall()
        return sorted(rows)
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        records = await conn.fetch("SELECT name, key FROM asyncjobs_rate_buckets")
    finally:
        await conn.close()
    return sorted((r["name"], r["key"]) for r in records)


async def test_rate_limit_buckets_are_pruned_once_they_have_refilled(
    make_jobs: MakeJobs, clock: FakeClock, backend_url: str
) -> None:
    """A keyed limiter stores a bucket per key (customer, domain). Once one has refilled
    it is the same as none, so pruning deletes it: the table does not keep every key
    ever seen. One still refilling is kept, or its tokens would come back early."""
    jobs = make_jobs(backend_url)
    jobs.limiter("per_customer", "1/m", key=lambda customer: customer)  # refills in 60 s

    @jobs.task(name="send", limiter="per_customer", rate_limit="10/s")  # refills in 1 s
    async def send(customer: str) -> None: ...

    ann, bob = ("limiter:per_customer", "ann"), ("limiter:per_customer", "bob")
    await jobs.enqueue(send, "ann")
    await jobs.enqueue(send, "bob")
    await drain(jobs)
    assert await bucket_keys(backend_url) == [ann, bob, ("task:send", "")]
    clock.advance(30)
    await prune_expired(jobs)
    assert await bucket_keys(backend_url) == [ann, bob]  # still refilling: kept
    again = await jobs.enqueue(send, "bob")
    await drain(jobs)
    assert (await again.info()).status == JobStatus.QUEUED  # bob's bucket holds it back
    clock.advance(31)
    await drain(jobs)
    assert (await again.info()).status == JobStatus.SUCCEEDED
    await prune_expired(jobs)
    assert await bucket_keys(backend_url) == [bob, ("task:send", "")]  # ann's refilled
    clock.advance(61)
    await prune_expired(jobs)
    assert await bucket_keys(backend_url) == []


async def test_buckets_of_a_limiter_no_process_defines_are_pruned_once_long_unused(
    make_jobs: MakeJobs, clock: FakeClock, backend_url: str
) -> None:
    """A limiter the app dropped or renamed left its buckets forever: pruning went by the
    names the pruning process defines. Buckets of other names go once unused for
    longer than the store keeps any job (another deploy sharing the store may still
    define the name, with a rate this process does not know); one in use stays."""
    old = make_jobs(backend_url, retention=HOUR)  # the deploy before a rename
    old.limiter("per_customer", "1/m", key=lambda customer: customer)

    @old.task(name="notify", limiter="per_customer")
    async def notify(customer: str) -> None: ...

    other = make_jobs(backend_url, retention=HOUR)  # a deploy that still uses its limiter
    other.limiter("reports", "1/h")

    @other.task(name="report", limiter="reports")
    async def report() -> None: ...

    pruner = make_jobs(backend_url, retention=HOUR)  # dead_retention: 4 h; no limits
    abandoned, live = ("limiter:per_customer", "ann"), ("limiter:reports", "")
    await old.enqueue(notify, "ann")
    await drain(old)
    assert await bucket_keys(backend_url) == [abandoned]
    clock.advance(4 * HOUR - 10)
    await other.enqueue(report)
    await drain(other)
    await prune_expired(pruner)
    assert await bucket_keys(backend_url) == [abandoned, live]  # not yet 4 h unused
    clock.advance(20)
    await prune_expired(pruner)
    assert await bucket_keys(backend_url) == [live]
    clock.advance(4 * HOUR)
    await prune_expired(pruner)
    assert await bucket_keys(backend_url) == []


# Jobs of one status finished at the given time (NULL: unfinished), named prefix || n.
FILL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, run_at, "
    "enqueued_at, finished_at) SELECT ? || i, 't', 'default', ?, '{}', 3, 0.0, 0.0, ? FROM n"
)


def steps_to_prune_a_batch(path: Path, backlog: int) -> int:
    """SQLite VM steps of one prune batch of 100, out of 1,000 jobs past retention,
    behind ``backlog`` queued jobs and as many succeeded ones still within retention."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        db.execute(FILL, (backlog, "queued-", "queued", None))
        db.execute(FILL, (backlog, "kept-", "succeeded", 5.0))
        db.execute(FILL, (1_000, "old-", "succeeded", 1.0))
        with counting_steps(db) as steps:
            assert _prune(db, 2.0, 0.0, 0.0, 100) == 100
        db.execute("COMMIT")
        return steps.count
    finally:
        db.close()


def test_a_prune_batch_costs_the_same_behind_a_small_and_a_big_backlog(tmp_path: Path) -> None:
    """Queued jobs and finished ones still within retention are not read: a batch walks
    the finished jobs past retention, oldest first, and stops at its size."""
    small = steps_to_prune_a_batch(tmp_path / "small.db", 100)
    big = steps_to_prune_a_batch(tmp_path / "big.db", 50_000)
    assert big < 2 * small, (small, big)


def steps_behind_dead_jobs(path: Path, dead: int, expired: int) -> int:
    """SQLite VM steps of one prune batch of 100 (``expired`` succeeded jobs past
    retention), behind ``dead`` dead jobs older than them but within dead retention."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        db.execute(FILL, (dead, "dead-", "dead", 1.0))
        if expired:  # FILL inserts at least one
            db.execute(FILL, (expired, "old-", "succeeded", 1.5))
        with counting_steps(db) as steps:
            assert _prune(db, 2.0, 0.0, 0.0, 100) == min(expired, 100)
        db.execute("COMMIT")
        return steps.count
    finally:
        db.close()


@pytest.mark.parametrize("expired", [1_000, 0])
def test_a_prune_batch_does_not_read_the_dead_jobs_kept_longer(
    tmp_path: Path, expired: int
) -> None:
    """Dead jobs are kept longer than succeeded and cancelled ones: a batch of those
    walks their own jobs past retention, not every dead job older than them. It read
    them all, every minute in every process, even when nothing was to be pruned."""
    small = steps_behind_dead_jobs(tmp_path / "small.db", 100, expired)
    big = steps_behind_dead_jobs(tmp_path / "big.db", 100_000, expired)
    assert big < 2 * small + 1_000, (small, big)


# Buckets of one limiter, counted one a second after the time given, keyed prefix || n.
FILL_BUCKETS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "INSERT INTO asyncjobs_rate_buckets (name, key, tokens, updated_at) "
    "SELECT ?, ? || i, 0.0, ? + i FROM n"
)
PER_USER = "limiter:per_user"


def steps_to_prune_buckets(path: Path, kept: int, due: int) -> tuple[int, int]:
    """SQLite VM steps of one bucket prune batch of 100 (and what it deleted), out of
    ``due`` buckets of one keyed limiter that have refilled and ``kept`` that have
    not (first by key), beside ``kept`` of another limiter that have refilled."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        db.execute(FILL_BUCKETS, (kept, PER_USER, "a-kept-", 5_000_000.0))
        db.execute(FILL_BUCKETS, (kept, "limiter:other", "old-", 0.0))  # another name
        if due:  # FILL inserts at least one
            db.execute(FILL_BUCKETS, (due, PER_USER, "b-due-", 0.0))
        with counting_steps(db) as steps:
            deleted = _prune_buckets(db, {PER_USER: 1_000_000.0}, None, 100)
        db.execute("COMMIT")
        return steps.count, deleted
    finally:
        db.close()


@pytest.mark.parametrize("due", [1_000, 0])
def test_a_bucket_prune_reads_the_buckets_it_deletes_not_every_key(
    tmp_path: Path, due: int
) -> None:
    """A keyed limiter keeps a bucket per key (a user, a domain): a prune batch reads
    the ones that have refilled, up to its size, not every bucket of the limiter.
    It read them all (100,000 here), in every process, even when none had refilled."""
    small, deleted = steps_to_prune_buckets(tmp_path / "small.db", 100, due)
    assert deleted == min(due, 100)
    big, deleted = steps_to_prune_buckets(tmp_path / "big.db", 100_000, due)
    assert deleted == min(due, 100)
    assert big < 2 * small + 100, (small, big)


def steps_to_prune_other_names(path: Path, live: int, due: int) -> tuple[int, int]:
    """SQLite VM steps of one bucket prune batch of 100 (and what it deleted) of the
    names not given, out of ``due`` buckets of a dropped limiter long unused, beside
    ``live`` buckets in use of a limiter not given and ``live`` of one given."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        db.execute(FILL_BUCKETS, (live, "limiter:another_deploys", "a-", 5_000_000.0))
        db.execute(FILL_BUCKETS, (live, PER_USER, "a-", 5_000_000.0))
        if due:  # FILL inserts at least one
            db.execute(FILL_BUCKETS, (due, "limiter:dropped", "b-", 0.0))
        with counting_steps(db) as steps:
            deleted = _prune_buckets(db, {PER_USER: 1_000_000.0}, 1_000_000.0, 100)
        db.execute("COMMIT")
        return steps.count, deleted
    finally:
        db.close()


@pytest.mark.parametrize("due", [1_000, 0])
def test_a_prune_of_other_names_reads_the_names_and_the_buckets_it_deletes(
    tmp_path: Path, due: int
) -> None:
    """The names not given are found by a seek each, not by reading their buckets, and
    those in use (counted after the time) are not read either."""
    small, deleted = steps_to_prune_other_names(tmp_path / "small.db", 100, due)
    assert deleted == min(due, 100)
    big, deleted = steps_to_prune_other_names(tmp_path / "big.db", 100_000, due)
    assert deleted == min(due, 100)
    assert big < 2 * small + 100, (small, big)


# Tallies of deleted batch members, of batches prefix || n, finished at the time given.
FILL_TALLIES = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "INSERT INTO asyncjobs_batch_deleted (batch_id, status, n, finished_at) "
    "SELECT ? || i, 'succeeded', 1, ? FROM n"
)
# A dead member of each of those batches, kept (dead retention is longer).
FILL_MEMBERS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, run_at, "
    "enqueued_at, finished_at, batch_id) "
    "SELECT 'member-' || i, 't', 'default', 'dead', '{}', 3, 0.0, 0.0, 1.0, ? || i FROM n"
)


def steps_behind_tallies(path: Path, tallies: int, expired: int) -> int:
    """SQLite VM steps of one prune batch of 100 (``expired`` succeeded jobs past
    retention), beside ``tallies`` tallies of deleted batch members within retention,
    and as many past it whose batch keeps a dead member (when the batch is full)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        db.execute(FILL_TALLIES, (tallies, "recent-", 5.0))
        if expired:
            db.execute(FILL_TALLIES, (tallies, "kept-", 1.0))
            db.execute(FILL_MEMBERS, (tallies, "kept-"))
            db.execute(FILL, (expired, "old-", "succeeded", 1.5))
        with counting_steps(db) as steps:
            assert _prune(db, 2.0, 0.0, 0.0, 100) == min(expired, 100)
        db.execute("COMMIT")
        return steps.count
    finally:
        db.close()


@pytest.mark.parametrize("expired", [1_000, 0])
def test_a_prune_batch_does_not_read_every_tally_of_deleted_batch_members(
    tmp_path: Path, expired: int
) -> None:
    """The tallies of deleted batch members go once no job of their batch is left and
    they are past retention. Every prune batch read them all (and PostgreSQL every
    batch member); now a full batch leaves them to the last batch of the prune, which
    reads those past retention (the rows that are read until their batch's last job
    goes), not the recent ones."""
    small = steps_behind_tallies(tmp_path / "small.db", 100, expired)
    big = steps_behind_tallies(tmp_path / "big.db", 100_000, expired)
    assert big < 2 * small + 1_000, (small, big)
