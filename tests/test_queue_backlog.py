"""A claim from some queues beside a backlog in another (a worker pool per queue, an
"email" pool beside a "reports" backlog): on SQLite, what the claim reads must not grow
with the other queue's jobs. (PostgreSQL: tests/postgres/test_pg_plans.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import counting_steps

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


def _claim_steps(tmp_path: Path, others: int) -> tuple[int, list[str]]:
    """SQLite VM steps of one claim of 100 from queues b and c (150 and 50 jobs) beside
    ``others`` jobs in queue a, and the ids it took."""
    db = sqlite3.connect(tmp_path / f"{others}.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        jobs = [new(f"a{n}", "a", n % 7 == 0) for n in range(others)]
        jobs += [new(f"b{n:03}", "b", n % 5 == 0) for n in range(150)]
        jobs += [new(f"c{n:03}", "c", n % 3 == 0) for n in range(50)]
        insert_jobs(db, jobs, T0)
        db.execute("COMMIT")
        tasks = {"t": TaskLimits(max_attempts=3)}
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
