"""A claim behind one group's long backlog: a group runs one job at a time, so only its
first unfinished job can be claimed, and a claim must not read through the rest (on
SQLite: they are left out of the ready indexes, migration 0012). What that promises:
a claim's work does not grow with the backlog, a job behind the backlog is found, and
the group's next job is claimable however its first one leaves.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import counting_steps

from asyncjobs.stores import (
    ClaimRequest,
    JobRow,
    NewJob,
    Outcome,
    OutcomeKind,
    Store,
    TaskLimits,
    open_store,
)
from asyncjobs.stores._migrations import migration_scripts
from asyncjobs.stores._sqlite_claim import _claim
from asyncjobs.stores._sqlite_limits import WINDOW
from asyncjobs.stores._sqlite_schema import _statements, migrate
from asyncjobs.stores._sqlite_sql import insert_jobs

T0 = 1_000_000.0


def new(job_id: str | None = None, **fields: Any) -> NewJob:
    values: dict[str, Any] = {
        "task": "t", "queue": "default", "payload": '{"args": [], "kwargs": {}}',
        "status": "queued", "priority": 0, "run_at": T0, "max_attempts": 3,
    }  # fmt: skip
    values.update(fields)
    return NewJob(id=job_id or uuid.uuid4().hex, **values)


def request(*, limit: int = 8, concurrency: int | None = None, worker: str = "w") -> ClaimRequest:
    tasks = {"t": TaskLimits(max_attempts=3, concurrency=concurrency)}
    return ClaimRequest(worker=worker, tasks=tasks, queues=None, limit=limit, lease=30.0)


# -- what a claim reads (SQLite) -------------------------------------------------------


def _claim_steps(
    tmp_path: Path, backlog: int, *, others: int, limited: bool
) -> tuple[int, list[str | None]]:
    """SQLite VM steps of one claim (of up to 8 jobs; under a concurrency limit if
    ``limited``) while group 'a' runs its first job with ``backlog`` more queued behind
    it and ``others`` ungrouped jobs after them, and the groups of the jobs it claimed."""
    db = sqlite3.connect(tmp_path / f"{backlog}-{others}-{limited}.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        jobs = [new(group_key="a") for _ in range(backlog + 1)] + [new() for _ in range(others)]
        insert_jobs(db, jobs, T0)
        assert [r.group_key for r in _claim(db, request(limit=1), T0)] == ["a"]
        db.execute("COMMIT")
        with counting_steps(db) as steps:
            db.execute("BEGIN IMMEDIATE")
            claimed = _claim(db, request(concurrency=10 if limited else None), T0)
            db.execute("ROLLBACK")
        return steps.count, [r.group_key for r in claimed]
    finally:
        db.close()


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "under-limits"])
@pytest.mark.parametrize("others", [0, 3], ids=["backlog-only", "with-others"])
def test_a_claim_does_not_read_through_a_groups_backlog(
    tmp_path: Path, limited: bool, others: int
) -> None:
    small = _claim_steps(tmp_path, 2_000, others=others, limited=limited)
    large = _claim_steps(tmp_path, 20_000, others=others, limited=limited)
    assert small[1] == large[1] == [None] * others
    assert large[0] < 2 * small[0], (small[0], large[0])


# -- what a claim finds (every store) --------------------------------------------------


async def test_under_a_limit_a_job_behind_a_groups_backlog_is_claimed_at_once(
    store: Store,
) -> None:
    """More of one group's jobs than a SQLite claim's window, then an ungrouped job of
    the same task: the first claim takes the group's first job and that one."""
    await store.insert([new(f"a{n}", group_key="a") for n in range(WINDOW + 100)], now=T0)
    await store.insert([new("free")], now=T0)
    claimed = await store.claim(request(concurrency=5), now=T0)
    assert [r.id for r in claimed] == ["a0", "free"]


def outcome(row: JobRow, kind: OutcomeKind, **fields: Any) -> Outcome:
    assert row.worker is not None
    return Outcome(job_id=row.id, worker=row.worker, attempt=row.attempts, kind=kind, **fields)


async def ids(store: Store, now: float = T0, *, concurrency: int | None = None) -> list[str]:
    return [r.id for r in await store.claim(request(concurrency=concurrency), now=now)]


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "under-limits"])
@pytest.mark.parametrize("how", ["succeeded", "dead", "cancelled", "deleted", "lease-expired"])
async def test_a_groups_next_job_runs_however_the_one_before_leaves(
    store: Store, how: str, limited: bool
) -> None:
    await store.insert([new(f"g{n}", group_key="g") for n in range(3)], now=T0)
    concurrency = 10 if limited else None
    if how in ("cancelled", "deleted"):  # g0 leaves before it ever ran
        if how == "cancelled":
            assert await store.cancel(["g0"], now=T0) == ["g0"]
        else:
            assert await store.delete(["g0"], now=T0) == 1
    else:
        (g0,) = await store.claim(request(limit=1, concurrency=concurrency), now=T0)
        assert await ids(store, concurrency=concurrency) == []
        if how == "lease-expired":  # on its last attempt: it ends dead
            await store.finish([outcome(g0, OutcomeKind.RETRY, error="x", run_at=T0)], now=T0)
            (g0,) = await store.claim(request(limit=1), now=T0)
            await store.finish([outcome(g0, OutcomeKind.RETRY, error="x", run_at=T0)], now=T0)
            (g0,) = await store.claim(request(limit=1), now=T0)
            assert g0.attempts == 3
            await store.recover(now=T0 + 31)
        elif how == "succeeded":
            await store.finish([outcome(g0, OutcomeKind.SUCCEEDED)], now=T0)
        else:
            await store.finish([outcome(g0, OutcomeKind(how), error="x")], now=T0)
    assert await ids(store, T0 + 31, concurrency=concurrency) == ["g1"]


async def test_a_job_cancelled_behind_its_group_and_retried_by_hand_runs(store: Store) -> None:
    """g1 was cancelled while it waited behind g0; retried once g0 is done, nothing is
    before it in its group: it runs (then g2, behind it since)."""
    await store.insert([new(f"g{n}", group_key="g") for n in range(2)], now=T0)
    assert await store.cancel(["g1"], now=T0) == ["g1"]
    (g0,) = await store.claim(request(), now=T0)
    await store.insert([new("g2", group_key="g")], now=T0)
    await store.finish([outcome(g0, OutcomeKind.SUCCEEDED)], now=T0)
    (g2,) = await store.claim(request(), now=T0)
    await store.finish([outcome(g2, OutcomeKind.SUCCEEDED)], now=T0)
    assert await store.retry("g1", now=T0)
    assert await ids(store) == ["g1"]


async def test_several_groups_finishing_in_one_write_each_run_their_next(store: Store) -> None:
    await store.insert([new(f"{g}{n}", group_key=g) for n in range(2) for g in "abc"], now=T0)
    first = await store.claim(request(), now=T0)
    assert sorted(r.id for r in first) == ["a0", "b0", "c0"]
    await store.finish([outcome(r, OutcomeKind.SUCCEEDED) for r in first], now=T0)
    assert sorted(await ids(store)) == ["a1", "b1", "c1"]


async def test_a_job_after_an_idempotent_one_already_done_runs(store: Store) -> None:
    """The insert's first job of group g is not inserted (its key belongs to a job that
    finished): the next one has nothing before it and runs."""
    await store.insert([new("first", group_key="g", idempotency_key="k")], now=T0)
    (first,) = await store.claim(request(), now=T0)
    await store.finish([outcome(first, OutcomeKind.SUCCEEDED)], now=T0)
    inserted = await store.insert(
        [new("again", group_key="g", idempotency_key="k"), new("next", group_key="g")], now=T0
    )
    assert list(inserted) == ["first", "next"]
    assert await ids(store) == ["next"]


async def test_a_group_stored_before_version_12_runs_in_order_once_upgraded(
    tmp_path: Path,
) -> None:
    """Version 12 marks the stored jobs behind another of their group: the first of each
    group is not marked (it runs), the rest are until the job before them finishes."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("CREATE TABLE asyncjobs_migrations (version INTEGER PRIMARY KEY, applied_at)")
        for version, script in migration_scripts("sqlite"):
            if version < 12:
                for statement in _statements(script):
                    db.execute(statement)
                db.execute("INSERT INTO asyncjobs_migrations VALUES (?, 0)", (version,))
        db.executemany(
            "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, "
            "run_at, enqueued_at, group_key) VALUES (?, 't', 'default', ?, '{}', 3, ?, ?, ?)",
            [
                ("done", "succeeded", T0, T0, "g"),
                ("g1", "queued", T0, T0, "g"),
                ("g2", "queued", T0, T0, "g"),
                ("h1", "scheduled", T0 + 60, T0, "h"),
                ("h2", "queued", T0, T0, "h"),
                ("free", "queued", T0, T0, None),
            ],
        )
    finally:
        db.close()
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        (g1,) = [r for r in await store.claim(request(), now=T0) if r.id != "free"]
        assert g1.id == "g1"
        await store.finish([outcome(g1, OutcomeKind.SUCCEEDED)], now=T0)
        assert await ids(store) == ["g2"]
        assert await ids(store, T0 + 60) == ["h1"]
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        marked = db.execute("SELECT id FROM asyncjobs_jobs WHERE behind IS NOT NULL").fetchall()
    finally:
        db.close()
    assert marked == [("h2",)]
