"""A claim from some queues beside a backlog in another (a worker pool per queue, an
"email" pool beside a "reports" backlog): on SQLite, what the claim reads must not grow
with the other queue's jobs, with or without a concurrency or rate limit on the task.
(PostgreSQL: tests/postgres/test_pg_plans.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import counting_steps

from asyncjobs import RateLimit
from asyncjobs.stores import ClaimRequest, NewJob, TaskLimits
from asyncjobs.stores._sqlite_claim import _claim
from asyncjobs.stores._sqlite_schema import migrate
from asyncjobs.stores._sqlite_sql import insert_jobs

T0 = 1_000_000.0


def new(job_id: str, queue: str, priority: int) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue=queue, payload='{"args": [], "kwargs": {}}',
        status="queued", priority=priority, run_at=T0, max_attempts=3,
    )  # fmt: skip


def _claim_steps(
    tmp_path: Path, others: int, limits: TaskLimits | None = None
) -> tuple[int, list[str]]:
    """SQLite VM steps of one claim of 100 from queues b and c (150 and 50 jobs) beside
    ``others`` jobs in queue a, all of task t (``limits``: its limits), and the ids it
    took."""
    db = sqlite3.connect(tmp_path / f"{others}-{limits}.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        jobs = [new(f"a{n}", "a", n % 7 == 0) for n in range(others)]
        jobs += [new(f"b{n:03}", "b", n % 5 == 0) for n in range(150)]
        jobs += [new(f"c{n:03}", "c", n % 3 == 0) for n in range(50)]
        insert_jobs(db, jobs, T0)
        db.execute("COMMIT")
        tasks = {"t": limits or TaskLimits(max_attempts=3)}
        request = ClaimRequest(worker="w", tasks=tasks, queues=["c", "b"], limit=100, lease=30.0)
        with counting_steps(db) as steps:
            db.execute("BEGIN IMMEDIATE")
            claimed = _claim(db, request, T0)
            db.execute("ROLLBACK")
        return steps.count, [r.id for r in claimed]
    finally:
        db.close()


def test_a_claim_from_some_queues_does_not_read_the_other_queues_jobs(tmp_path: Path) -> None:
    """Before the per-queue reads, 100,000 jobs in a made the claim 50 times dearer."""
    alone, beside = _claim_steps(tmp_path, 0), _claim_steps(tmp_path, 20_000)
    assert alone[1] == beside[1]
    assert len(beside[1]) == 100
    assert beside[0] < 1.5 * alone[0], (alone[0], beside[0])


@pytest.mark.parametrize(
    "limits",
    [
        TaskLimits(max_attempts=3, concurrency=1_000),
        TaskLimits(max_attempts=3, rate_limit=RateLimit(rate=1_000, per=1)),
    ],
    ids=["concurrency", "rate_limit"],
)
def test_a_limited_claim_from_some_queues_does_not_read_the_other_queues_jobs(
    tmp_path: Path, limits: TaskLimits
) -> None:
    """Under a limit the claim walks the task's first ready jobs in claim order
    (_sqlite_limits): before the walk per queue, it read the task's jobs of queue a on
    the way (20,000 jobs in a: 6 times the steps), and the claim order held."""
    alone, beside = _claim_steps(tmp_path, 0, limits), _claim_steps(tmp_path, 20_000, limits)
    assert alone[1] == beside[1]
    assert len(beside[1]) == 100
    assert beside[0] < 1.5 * alone[0], (alone[0], beside[0])
