"""A chain member retried by hand before it ran finds the member before it by one index
lookup, not by reading every job (migration 0011 on SQLite, 0012 on PostgreSQL); so do
retention and a purge, and they walk the cancelled run after a member by id."""

from __future__ import annotations

import json
import sqlite3

import pytest

from asyncjobs.stores import (
    NewJob,
    Store,
    _postgres_admin,
    _postgres_release,
    _sqlite,
    _sqlite_admin,
)
from asyncjobs.stores._sqlite import SQLiteStore
from asyncjobs.stores._statuses import PURGEABLE


def member(n: int, chain_next: str | None) -> NewJob:
    return NewJob(
        id=f"job-{n:04d}", task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3, chain_next=chain_next,
    )  # fmt: skip


async def test_the_member_before_a_job_is_found_through_an_index(
    store: Store, backend_url: str
) -> None:
    # Chains of two among plain jobs: enough rows that a scan would be planned.
    jobs = [member(n, f"job-{n + 1:04d}" if n % 10 == 0 else None) for n in range(2_000)]
    await store.insert(jobs, now=1.0)

    if isinstance(store, SQLiteStore):
        path = backend_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            db.execute("ANALYZE")
            plan = " ".join(
                row[-1]
                for row in db.execute(
                    "EXPLAIN QUERY PLAN " + _sqlite_admin.PREDECESSOR, ("job-0001",)
                )
            )
            assert db.execute(_sqlite_admin.PREDECESSOR, ("job-0001",)).fetchone() == (
                "queued",
                None,
            )
    else:
        import asyncpg

        conn = await asyncpg.connect(backend_url)
        try:
            await conn.execute("ANALYZE asyncjobs_jobs")
            async with conn.transaction():
                rows = await conn.fetch("EXPLAIN " + _postgres_admin.PREDECESSOR, "job-0001")
                plan = " ".join(r[0] for r in rows)
                found = await conn.fetchrow(_postgres_admin.PREDECESSOR, "job-0001")
            assert found is not None
            assert tuple(found) == ("queued", None)
        finally:
            await conn.close()
    assert "asyncjobs_jobs_chain_next" in plan, plan


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_prune_finds_the_cancelled_run_after_what_it_deleted_by_id(
    store: Store, backend_url: str, analyzed: bool
) -> None:
    """The members cancelled before they ran that go with the job before them
    (``_PRUNE_FOLLOWERS``) are walked one id lookup each, not found among every
    cancelled job: a cancelled chain of five in a store of 2,000 cancelled jobs."""
    jobs = [member(n, f"job-{n + 1:04d}" if n % 5 < 4 else None) for n in range(2_000)]
    await store.insert(jobs, now=1.0)
    cancel = "UPDATE asyncjobs_jobs SET status = 'cancelled', finished_at = 1.0"
    first = ["job-0001"]  # after job-0000, pruned: job-0001 to job-0004 go with it

    if isinstance(store, SQLiteStore):
        path = backend_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            db.execute(cancel)
            if analyzed:
                db.execute("ANALYZE")
            params = (json.dumps(first), 2.0, 2.0, 500)
            plan = [
                row[-1]
                for row in db.execute(
                    "EXPLAIN QUERY PLAN " + _sqlite_admin._PRUNE_FOLLOWERS, params
                )
            ]
            deleted = db.execute(_sqlite_admin._PRUNE_FOLLOWERS, params).fetchall()
        db.close()
        lookups = [step for step in plan if step.startswith(("SEARCH j ", "SCAN j "))]
        assert lookups, plan
        assert all("USING INDEX sqlite_autoindex_asyncjobs_jobs_1 (id=?)" in s for s in lookups), (
            plan
        )
    else:
        import asyncpg

        conn = await asyncpg.connect(backend_url)
        try:
            await conn.execute(cancel)
            if analyzed:
                await conn.execute("ANALYZE asyncjobs_jobs")
            async with conn.transaction():
                rows = await conn.fetch(
                    "EXPLAIN " + _postgres_admin._PRUNE_FOLLOWERS, first, 2.0, 500
                )
                plan = [r[0] for r in rows]
                deleted = await conn.fetch(_postgres_admin._PRUNE_FOLLOWERS, first, 2.0, 500)
        finally:
            await conn.close()
        lookups = [step for step in plan if " on asyncjobs_jobs j" in step]
        assert lookups, plan
        assert all("Index Scan using asyncjobs_jobs_id_key" in s for s in lookups), plan
    assert sorted(row[-1] or "" for row in deleted) == ["", "job-0002", "job-0003", "job-0004"]


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_purge_finds_the_member_before_each_job_and_the_run_after_by_id(
    store: Store, backend_url: str, analyzed: bool
) -> None:
    """A purge of cancelled jobs keeps a member cancelled before it ran while the member
    before it is stored (``PURGEABLE``), one seek on chain_next per candidate, and takes
    the run after a deleted one (``_PURGE_FOLLOWERS``) one id lookup each: chains of five
    whose first member is dead, the rest cancelled, in a store of 2,000 jobs."""
    jobs = [member(n, f"job-{n + 1:04d}" if n % 5 < 4 else None) for n in range(2_000)]
    await store.insert(jobs, now=1.0)
    cancel = (
        "UPDATE asyncjobs_jobs SET finished_at = 1.0, status = CASE WHEN seq % 5 = 1 "
        "THEN 'dead' ELSE 'cancelled' END"
    )
    first = ["job-0001"]  # after job-0000, deleted: job-0001 to job-0004 go with it

    if isinstance(store, SQLiteStore):
        path = backend_url.removeprefix("sqlite:///")
        # As SQLiteStore.purge(status="cancelled") builds them.
        pick = (
            _sqlite._PICK_NOT_RUNNING + "status = ? AND " + PURGEABLE
            + " AND seq <= ? ORDER BY seq DESC LIMIT ?"
        )  # fmt: skip
        walk = _sqlite._PURGE_FOLLOWERS.format(matching="status = ?")
        with sqlite3.connect(path) as db:
            db.execute(cancel)
            if analyzed:
                db.execute("ANALYZE")
            pick_params = ("cancelled", 2**62, 5000)
            walk_params = (json.dumps(first), "cancelled", "cancelled")
            plans = {
                sql: [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
                for sql, params in ((pick, pick_params), (walk, walk_params))
            }
            picked = db.execute(pick, pick_params).fetchall()
            deleted = db.execute(walk, walk_params).fetchall()
        db.close()
        before = [step for step in plans[pick] if " before_it " in step]
        assert before, plans[pick]
        assert all("USING INDEX asyncjobs_jobs_chain_next (chain_next=?)" in s for s in before)
        lookups = [step for step in plans[walk] if step.startswith(("SEARCH j ", "SCAN j "))]
        assert lookups, plans[walk]
        assert all("USING INDEX sqlite_autoindex_asyncjobs_jobs_1 (id=?)" in s for s in lookups), (
            plans[walk]
        )
    else:
        import asyncpg

        # As PostgresStore.purge(status="cancelled") builds them.
        end = _postgres_release._DELETE_END.format(changed=2, matched=3)
        delete = _postgres_release._DELETE + "status = $1 AND " + PURGEABLE + end
        walk = _postgres_release._PURGE_FOLLOWERS.format(matching="status = $1", after=2)
        conn = await asyncpg.connect(backend_url)
        try:
            await conn.execute(cancel)
            if analyzed:
                await conn.execute("ANALYZE asyncjobs_jobs")
            async with conn.transaction():
                rows = await conn.fetch("EXPLAIN " + delete, "cancelled", [], [])
                plans = {delete: [r[0] for r in rows]}
                rows = await conn.fetch("EXPLAIN " + walk, "cancelled", first)
                plans[walk] = [r[0] for r in rows]
                picked = await conn.fetch(delete, "cancelled", [], [])
                deleted = await conn.fetch(walk, "cancelled", first)
        finally:
            await conn.close()
        before = [step for step in plans[delete] if " on asyncjobs_jobs before_it" in step]
        assert before, plans[delete]
        assert all("Index Scan using asyncjobs_jobs_chain_next" in s for s in before), plans
        assert not any("Hashed SubPlan" in step for step in plans[delete]), plans[delete]
        lookups = [step for step in plans[walk] if " on asyncjobs_jobs j" in step]
        assert lookups, plans[walk]
        assert all("Index Scan using asyncjobs_jobs_id_key" in s for s in lookups), plans[walk]
    assert picked == []  # each cancelled one has a dead or cancelled one before it
    assert sorted(row[0] or "" for row in deleted) == ["", "job-0002", "job-0003", "job-0004"]
