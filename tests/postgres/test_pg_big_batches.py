"""A batch bigger than PostgreSQL takes in one jsonb value (256 MiB) goes in as several
statements, still all or nothing: inserts, and outcomes. The limit is lowered here to a
few kilobytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asyncjobs import Jobs
from asyncjobs.stores import NewJob, Outcome, OutcomeKind, _postgres_sql
from asyncjobs.stores._postgres_enqueue import insert_jobs
from asyncjobs.stores._postgres_finish import _FINISH, _outcome_rows, finish, finish_plain

MakeJobs = Callable[..., Jobs]

asyncpg = pytest.importorskip("asyncpg")


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":["' + "x" * 100 + '"],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3,
    )  # fmt: skip


class Counted:
    """An asyncpg connection that counts the INSERT and UPDATE statements sent through it."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.inserts, self.updates = conn, 0, 0

    def transaction(self) -> Any:
        return self.conn.transaction()

    def count(self, query: str) -> None:
        self.inserts += query.startswith("INSERT")
        self.updates += query.lstrip().startswith("UPDATE")

    async def execute(self, query: str, *args: Any) -> Any:
        self.count(query)
        return await self.conn.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        self.count(query)
        return await self.conn.fetch(query, *args)


async def test_a_batch_over_the_jsonb_limit_is_split_and_stays_atomic(
    make_jobs: MakeJobs, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_postgres_sql, "JSONB_LIMIT", 2_000)
    await make_jobs(postgres_url).store.open()  # the schema
    conn = await asyncpg.connect(postgres_url)
    try:
        counted = Counted(conn)
        ids = [f"{n:032d}" for n in range(60)]  # about 15 kB of rows
        assert await insert_jobs(counted, [new_job(i) for i in ids], now=1.0) == ids  # type: ignore[arg-type]
        assert counted.inserts >= 8
        stored = await conn.fetch("SELECT id FROM asyncjobs_jobs ORDER BY seq")
        assert [r["id"] for r in stored] == ids

        again = [new_job(f"{n:032x}") for n in range(1000, 1060)]
        again[55] = again[2]  # the same id twice, in different statements: all refused
        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_jobs(conn, again, now=1.0)
        assert await conn.fetchval("SELECT count(*) FROM asyncjobs_jobs") == 60
    finally:
        await conn.close()


@pytest.mark.parametrize("apply", [finish_plain, finish], ids=["plain", "with_dependents"])
async def test_outcomes_over_the_jsonb_limit_are_split_and_stay_atomic(
    make_jobs: MakeJobs, postgres_url: str, monkeypatch: pytest.MonkeyPatch, apply: Any
) -> None:
    monkeypatch.setattr(_postgres_sql, "JSONB_LIMIT", 2_000)
    await make_jobs(postgres_url).store.open()  # the schema
    conn = await asyncpg.connect(postgres_url)
    try:
        ids = [f"{n:032d}" for n in range(60)]
        await insert_jobs(conn, [new_job(i) for i in ids], now=1.0)
        await conn.execute(
            "UPDATE asyncjobs_jobs SET status = 'running', worker = 'w', attempts = 1"
        )
        result = '"' + "r" * 100 + '"'  # about 9 kB of outcomes
        outcomes = [Outcome(i, "w", 1, OutcomeKind.SUCCEEDED, result=result) for i in ids]
        outcomes[40] = outcomes[40]._replace(
            kind=OutcomeKind.RETRY, result=None, error="boom", run_at=5.0
        )

        async def apply_counted(outcomes: list[Outcome], now: float) -> tuple[Any, int]:
            counted: Any = Counted(conn)
            if apply is finish_plain:  # a transaction of its own when split
                return await apply(counted, outcomes, now), counted.updates
            async with conn.transaction():  # finish runs in the caller's
                return await apply(counted, outcomes, now), counted.updates

        kinds, updates = await apply_counted(outcomes, 2.0)
        assert kinds == {o.job_id: str(o.kind) for o in outcomes}
        assert updates >= 4
        rows = await conn.fetch("SELECT id, status, result, error, run_at FROM asyncjobs_jobs")
        stored = {r["id"]: (r["status"], r["result"], r["error"], r["run_at"]) for r in rows}
        assert stored == {
            o.job_id: ("scheduled", None, "boom", 5.0) if o.kind == OutcomeKind.RETRY
            else ("succeeded", result, None, 0.0)
            for o in outcomes
        }  # fmt: skip

        # A statement of the split that fails takes back the ones before it.
        await conn.execute("UPDATE asyncjobs_jobs SET status = 'running', result = NULL")
        unreadable: Any = "one"  # not a number: the second statement fails
        broken = [*outcomes[:50], *[o._replace(attempt=unreadable) for o in outcomes[50:]]]
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await apply_counted(broken, 3.0)
        running = "SELECT count(*) FROM asyncjobs_jobs WHERE status = 'running'"
        assert await conn.fetchval(running) == 60
    finally:
        await conn.close()


class Recorded(Counted):
    """A ``Counted`` connection that also keeps every statement, in order."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.queries: list[str] = []

    def count(self, query: str) -> None:
        super().count(query)
        self.queries.append(query)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.count(query)
        return await self.conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.count(query)
        return await self.conn.fetchval(query, *args)


async def test_a_split_finish_locks_all_its_jobs_before_any_on_complete(
    make_jobs: MakeJobs, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock order that keeps finishes, cancels and lease recovery from deadlocking
    (``lock_callbacks``): a finish's jobs first, then their batches' on_complete rows.
    Split past JSONB_LIMIT, a half released its batch (locking its on_complete) before
    the next half's jobs were taken."""
    await make_jobs(postgres_url).store.open()  # the schema
    conn = await asyncpg.connect(postgres_url)
    try:
        callbacks = [new_job(f"on-complete-{n}")._replace(status="waiting") for n in (1, 2)]
        members = [new_job(f"member-{n}")._replace(batch_id=f"on-complete-{n}") for n in (2, 1)]
        await insert_jobs(conn, [*callbacks, *members], now=1.0)
        await conn.execute(
            "UPDATE asyncjobs_jobs SET status = 'running', worker = 'w', attempts = 1 "
            "WHERE batch_id IS NOT NULL"
        )
        outcomes = [Outcome(m.id, "w", 1, OutcomeKind.SUCCEEDED, result="null") for m in members]
        # One byte short of the two outcomes: each goes in a statement of its own.
        monkeypatch.setattr(_postgres_sql, "JSONB_LIMIT", len(_outcome_rows(outcomes)) - 1)

        recorded: Any = Recorded(conn)
        async with conn.transaction():
            kinds = await finish(recorded, outcomes, 2.0)

        assert kinds == {"member-1": "succeeded", "member-2": "succeeded"}
        finishes = [i for i, query in enumerate(recorded.queries) if query == _FINISH]
        locks = [i for i, query in enumerate(recorded.queries) if "FOR UPDATE" in query]
        assert len(finishes) == 2
        assert locks
        assert max(finishes) < min(locks)
        statuses = await conn.fetch(
            "SELECT id, status FROM asyncjobs_jobs WHERE id LIKE 'on-complete-%' ORDER BY id"
        )
        assert [tuple(r) for r in statuses] == [
            ("on-complete-1", "queued"),
            ("on-complete-2", "queued"),
        ]
    finally:
        await conn.close()
