"""The store contract, proven on every store (``store[sqlite]``, ``store[postgres]``).

Each test drives the ``Store`` protocol directly with explicit ``now`` values, so
the same expectations hold whatever the backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio
import pytest

from asyncjobs._errors import ConfigurationError, DataRefused, StoreError
from asyncjobs.stores import (
    ClaimRequest,
    JobRow,
    NewJob,
    Outcome,
    OutcomeKind,
    Preview,
    Store,
    TaskLimits,
    open_store,
)
from asyncjobs.stores._job_rows import CheckedJob
from asyncjobs.stores._ops_rows import WorkerBeat

T0 = 1_000_000.0


def new(job_id: str, **fields: Any) -> NewJob:
    values: dict[str, Any] = {
        "task": "t",
        "queue": "default",
        "payload": '{"args": [], "kwargs": {}}',
        "status": "queued",
        "priority": 0,
        "run_at": T0,
        "max_attempts": 3,
    }
    values.update(fields)
    return NewJob(id=job_id, **values)


def request(
    *,
    tasks: Sequence[str] = ("t",),
    queues: Sequence[str] | None = None,
    limit: int = 10,
    worker: str = "w1",
    lease: float = 30.0,
    max_attempts: int = 3,
    ahead: int = 0,
) -> ClaimRequest:
    return ClaimRequest(
        worker=worker,
        tasks={name: TaskLimits(max_attempts=max_attempts) for name in tasks},
        queues=queues,
        limit=limit,
        lease=lease,
        ahead=ahead,
    )


def outcome(row: JobRow, kind: OutcomeKind, **fields: Any) -> Outcome:
    assert row.worker is not None
    return Outcome(job_id=row.id, worker=row.worker, attempt=row.attempts, kind=kind, **fields)


async def claim(store: Store, now: float = T0, **kwargs: Any) -> list[JobRow]:
    return list(await store.claim(request(**kwargs), now=now))


async def status(store: Store, job_id: str) -> str:
    row = await store.get(job_id)
    assert row is not None
    return row.status


def test_each_store_reads_the_columns_of_job_row_in_its_order() -> None:
    """SQLite builds a JobRow from the row tuple as it is: the column order is the API."""
    from asyncjobs.stores import _postgres_sql, _sqlite_sql

    assert _sqlite_sql.COLUMNS == _postgres_sql.COLUMNS == JobRow._fields


# -- insert ------------------------------------------------------------------------


async def test_insert_stores_jobs_and_returns_their_ids_in_order(store: Store) -> None:
    ids = await store.insert(
        [new("a", priority=2, options='{"retries": 1}'), new("b", queue="q", group_key="g")],
        now=T0 - 5,
    )
    assert ids == ["a", "b"]
    a = await store.get("a")
    assert a is not None
    assert (a.task, a.queue, a.status, a.priority, a.attempts, a.max_attempts) == (
        "t",
        "default",
        "queued",
        2,
        0,
        3,
    )
    assert (a.run_at, a.enqueued_at, a.options) == (T0, T0 - 5, '{"retries": 1}')
    assert a.payload == '{"args": [], "kwargs": {}}'
    assert a.started_at is None
    assert a.finished_at is None
    assert a.worker is None
    b = await store.get("b")
    assert b is not None
    assert b.seq > a.seq
    assert b.group_key == "g"
    assert await store.get("missing") is None
    assert await store.insert([], now=T0) == []


async def test_a_multi_row_insert_stores_every_field_exactly(store: Store) -> None:
    """Text with quotes, backslashes, escapes and non-ASCII, negative and large numbers,
    and a float's last bits survive one insert of several rows, in order."""
    odd = 'quote " backslash \\ escape \\ud800 tab\t é \U0001f600'
    jobs = [
        new(
            "x" * 32,
            task="tâche.send",
            queue="q-é",
            payload=json.dumps({"args": [odd, -(2**62)], "kwargs": {"k": 0.1}}),
            priority=-7,
            run_at=T0 + 0.123456789012,
            max_attempts=1000,
            options='{"retries": 999, "timeout": 0.25}',
            idempotency_key=odd,
            group_key="groupe \U0001f600",
            batch_id="b" * 32,
            chain_next="c" * 32,
        ),
        new("y" * 32, status="scheduled", run_at=T0 + 86400.5),
        new("z" * 32, rate_key='tenant "7"'),
    ]
    assert await store.insert(jobs, now=T0) == [job.id for job in jobs]
    rows = [await store.get(job.id) for job in jobs]
    assert [row.seq for row in rows if row is not None] == sorted(
        row.seq for row in rows if row is not None
    )
    for job, row in zip(jobs, rows, strict=True):
        assert row is not None
        stored = {field: getattr(row, field) for field in NewJob._fields if hasattr(row, field)}
        expected = {field: getattr(job, field) for field in stored}
        assert stored == expected


async def test_idempotency_key_returns_the_stored_job(store: Store) -> None:
    assert await store.insert([new("a", idempotency_key="k")], now=T0) == ["a"]
    assert await store.insert([new("b", idempotency_key="k"), new("c")], now=T0) == ["a", "c"]
    assert await store.get("b") is None
    # Two jobs with one key in a single insert: the first wins.
    assert await store.insert(
        [new("d", idempotency_key="k2"), new("e", idempotency_key="k2")], now=T0
    ) == ["d", "d"]
    assert await store.get("e") is None


async def test_idempotency_key_holds_after_the_job_finished(store: Store) -> None:
    await store.insert([new("a", idempotency_key="k")], now=T0)
    (row,) = await claim(store)
    await store.finish([outcome(row, OutcomeKind.SUCCEEDED, result="1")], now=T0 + 1)
    assert await store.insert([new("b", idempotency_key="k")], now=T0 + 2) == ["a"]


async def test_insert_running_starts_the_first_attempt_for_that_worker(store: Store) -> None:
    """Local dispatch: a job with ``worker`` set is stored running, leased, attempt 1,
    and its seq comes back; a plain job in the same insert stays queued."""
    running = new("a", status="running", worker="w1", lease=30)
    inserted = await store.insert([new("q"), running, new("k", idempotency_key="key")], now=T0)
    assert inserted == ["q", "a", "k"]
    a = await store.get("a")
    assert a is not None
    assert (a.status, a.attempts, a.worker, a.started_at, a.lease_until) == (
        "running", 1, "w1", T0, T0 + 30,
    )  # fmt: skip
    assert inserted.seqs == {"a": a.seq}
    queued = await store.get("q")
    assert queued is not None
    assert (queued.status, queued.attempts, queued.worker, queued.started_at) == (
        "queued", 0, None, None,
    )  # fmt: skip
    # Not claimable, finished like a claimed job, recovered when its lease expires.
    assert [r.id for r in await claim(store)] == ["q", "k"]
    assert await store.finish([outcome(a, OutcomeKind.SUCCEEDED, result="1")], now=T0 + 1) == ["a"]
    assert await status(store, "a") == "succeeded"
    await store.insert([new("b", status="running", worker="w1", lease=30)], now=T0)
    recovered = {r.id: (r.attempts, r.status) for r in await store.recover(now=T0 + 31)}
    assert recovered == {"q": (1, "queued"), "k": (1, "queued"), "b": (1, "queued")}
    assert await status(store, "b") == "queued"


async def test_insert_running_with_a_stored_key_runs_nothing(store: Store) -> None:
    await store.insert([new("a", idempotency_key="k")], now=T0)
    duplicate = new("b", idempotency_key="k", status="running", worker="w1", lease=9)
    inserted = await store.insert([duplicate], now=T0)
    assert inserted == ["a"]
    assert inserted.seqs == {}
    assert await status(store, "a") == "queued"


# -- claim -------------------------------------------------------------------------


async def test_claim_takes_higher_priority_first_then_enqueue_order(store: Store) -> None:
    await store.insert(
        [new("low1"), new("high1", priority=5), new("low2"), new("high2", priority=5)], now=T0
    )
    first = await claim(store, limit=3)
    assert [r.id for r in first] == ["high1", "high2", "low1"]
    assert [r.id for r in await claim(store, limit=3)] == ["low2"]
    assert await claim(store) == []


async def test_claim_marks_jobs_running_and_raises_attempts(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    (row,) = await claim(store, now=T0 + 1, worker="w9", lease=30)
    assert (row.status, row.attempts, row.worker) == ("running", 1, "w9")
    assert (row.started_at, row.lease_until) == (T0 + 1, T0 + 31)
    stored = await store.get("a")
    assert stored is not None
    assert stored.status == "running"
    assert stored.attempts == 1


async def test_claim_takes_only_known_tasks_and_listed_queues(store: Store) -> None:
    await store.insert(
        [new("a", task="other"), new("b", queue="email"), new("c", queue="sms")], now=T0
    )
    assert [r.id for r in await claim(store, queues=["email"])] == ["b"]
    assert [r.id for r in await claim(store, tasks=["t"])] == ["c"]
    assert await claim(store, tasks=["t"]) == []
    assert [r.id for r in await claim(store, tasks=["other"])] == ["a"]
    assert await claim(store, tasks=[]) == []
    assert await claim(store, limit=0) == []


async def test_a_claim_from_several_queues_takes_their_jobs_in_claim_order(store: Store) -> None:
    """Each queue of the filter is read apart (in PostgreSQL): the jobs still come in
    priority, then enqueue, order across them, the limit counted over all."""
    await store.insert(
        [
            new("a1", queue="a"), new("b1", queue="b", priority=5), new("x1", queue="x"),
            new("a2", queue="a", priority=5), new("b2", queue="b"), new("a3", queue="a"),
            new("b3", queue="b", priority=-1), new("x2", queue="x", priority=9),
        ],
        now=T0,
    )  # fmt: skip
    assert [r.id for r in await claim(store, queues=["b", "a", "b"], limit=5)] == [
        "b1", "a2", "a1", "b2", "a3"
    ]  # fmt: skip
    assert [r.id for r in await claim(store, queues=["a", "b"])] == ["b3"]


async def test_claim_waits_for_run_at(store: Store) -> None:
    await store.insert([new("later", status="scheduled", run_at=T0 + 60)], now=T0)
    assert await store.next_run_at() == T0 + 60
    assert await claim(store, now=T0 + 59) == []
    assert [r.id for r in await claim(store, now=T0 + 60)] == ["later"]
    assert await store.next_run_at() is None


async def test_max_attempts_follow_the_worker_unless_the_job_set_retries(store: Store) -> None:
    await store.insert(
        [new("plain", max_attempts=3), new("own", max_attempts=2, options='{"retries": 1}')],
        now=T0,
    )
    rows = {r.id: r for r in await claim(store, max_attempts=8)}
    assert rows["plain"].max_attempts == 8
    assert rows["own"].max_attempts == 2


async def test_each_task_gets_the_attempts_its_worker_gives_it(store: Store) -> None:
    """A worker's tasks allow different attempts: each claimed job takes its own task's,
    the usual number and the exceptions alike, in what is stored and in which jobs are
    left out of a claim ahead (a job whose next attempt is its task's last)."""
    tasks = {"a": 3, "b": 3, "c": 3, "one": 1, "many": 9}
    await store.insert([new(f"{name}-job", task=name) for name in tasks], now=T0)
    claims = ClaimRequest(
        worker="w1", tasks={name: TaskLimits(max_attempts=n) for name, n in tasks.items()},
        queues=None, limit=5, lease=30.0, ahead=4,
    )  # fmt: skip
    # One free slot: "a-job"; of the four ahead, "one-job" would start its last attempt.
    rows = {r.id: r.max_attempts for r in await store.claim(claims, now=T0)}
    assert rows == {"a-job": 3, "b-job": 3, "c-job": 3, "many-job": 9}
    assert await status(store, "one-job") == "queued"
    rows = {r.id: r.max_attempts for r in await store.claim(replace(claims, ahead=0), now=T0)}
    assert rows == {"one-job": 1}


async def test_jobs_on_their_last_attempt_are_never_claimed_ahead(store: Store) -> None:
    """Of a claim's ``limit``, the ``ahead`` part (no free slot yet) skips jobs whose
    claim would start their last attempt: a crash before they start would leave them
    dead. They stay queued, first in line for the next free slot."""
    await store.insert(
        [
            new("ok"),  # the worker allows 3 attempts
            new("no-retries", options='{"retries": 0}', max_attempts=1),
            new("tried", options='{"retries": 1}', max_attempts=2),
            new("beyond"),
        ],
        now=T0,
    )
    for row in await claim(store):  # "tried" fails once: its next attempt is its last
        kind = OutcomeKind.RETRY if row.id == "tried" else OutcomeKind.RELEASE
        assert await store.finish([outcome(row, kind, run_at=T0)], now=T0) == [row.id]

    # One free slot and three claimed ahead: the slot takes "ok"; of the next three,
    # "no-retries" and "tried" are on their last attempt and stay queued.
    rows = await store.claim(request(limit=4, ahead=3), now=T0 + 1)
    assert [r.id for r in rows] == ["ok", "beyond"]
    assert await status(store, "no-retries") == "queued"
    assert await status(store, "tried") == "queued"
    # Ahead only: the next in line is on its last attempt, so nothing is claimed.
    assert list(await store.claim(request(limit=1, ahead=1), now=T0 + 1)) == []
    # Free slots take them, last attempt or not.
    rows = await store.claim(request(limit=2), now=T0 + 1)
    assert [(r.id, r.attempts, r.max_attempts) for r in rows] == [
        ("no-retries", 1, 1), ("tried", 2, 2),
    ]  # fmt: skip


async def test_claims_under_limits_take_no_jobs_ahead(store: Store) -> None:
    await store.insert([new(f"j{i}") for i in range(4)], now=T0)
    limited = ClaimRequest(
        worker="w1", tasks={"t": TaskLimits(max_attempts=3, concurrency=10)}, queues=None,
        limit=3, lease=30.0, ahead=2,
    )  # fmt: skip
    assert [r.id for r in await store.claim(limited, now=T0)] == ["j0"]  # the free slot
    assert [r.id for r in await claim(store, limit=3, ahead=2)] == ["j1", "j2", "j3"]


async def test_group_runs_one_job_at_a_time_in_enqueue_order(store: Store) -> None:
    await store.insert(
        [new("g1", group_key="g"), new("g2", group_key="g", priority=9), new("x")], now=T0
    )
    assert {r.id for r in await claim(store)} == {"g1", "x"}
    assert await claim(store) == []
    g1 = await store.get("g1")
    assert g1 is not None
    await store.finish([outcome(g1, OutcomeKind.SUCCEEDED)], now=T0 + 1)
    assert [r.id for r in await claim(store, now=T0 + 1)] == ["g2"]


async def test_group_waits_on_an_earlier_job_scheduled_for_retry(store: Store) -> None:
    await store.insert([new("g1", group_key="g"), new("g2", group_key="g")], now=T0)
    (g1,) = await claim(store)
    await store.finish([outcome(g1, OutcomeKind.RETRY, error="x", run_at=T0 + 10)], now=T0)
    assert await claim(store, now=T0 + 1) == []
    assert [r.id for r in await claim(store, now=T0 + 10)] == ["g1"]


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "under-limits"])
async def test_a_group_job_retried_by_hand_waits_for_a_later_one_running(
    store: Store, limited: bool
) -> None:
    """g1 died, so g2 ran; retrying g1 must not run it beside g2: one at a time."""
    await store.insert([new("g1", group_key="g"), new("g2", group_key="g")], now=T0)
    (g1,) = await claim(store)
    await store.finish([outcome(g1, OutcomeKind.DEAD, error="x")], now=T0 + 1)
    (g2,) = await claim(store, now=T0 + 1)
    assert g2.id == "g2"
    assert await store.retry("g1", now=T0 + 2)
    tasks = {"t": TaskLimits(max_attempts=3, concurrency=10 if limited else None)}
    retried = ClaimRequest(worker="w2", tasks=tasks, queues=None, limit=10, lease=30.0)
    assert list(await store.claim(retried, now=T0 + 2)) == []
    await store.finish([outcome(g2, OutcomeKind.SUCCEEDED)], now=T0 + 3)
    assert [r.id for r in await store.claim(retried, now=T0 + 3)] == ["g1"]


# -- finish ------------------------------------------------------------------------


async def test_finish_succeeded_stores_the_result(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    (row,) = await claim(store)
    applied = await store.finish([outcome(row, OutcomeKind.SUCCEEDED, result="42")], now=T0 + 2)
    assert applied == ["a"]
    done = await store.get("a")
    assert done is not None
    assert (done.status, done.result, done.error, done.finished_at) == (
        "succeeded",
        "42",
        None,
        T0 + 2,
    )
    assert done.lease_until is None


async def test_finish_writes_many_successes_at_once_each_with_its_own_values(
    store: Store,
) -> None:
    """Successes are written together (one statement in both stores): each keeps its
    own result and attempts, a stale one is skipped, a chain member is released."""
    await store.insert(
        [new("a"), new("b", chain_next="c"), new("c", status="waiting"), new("d"),
         new("e")],
        now=T0,
    )  # fmt: skip
    rows = {row.id: row for row in await claim(store, limit=4)}
    assert sorted(rows) == ["a", "b", "d", "e"]
    outcomes = [
        outcome(rows["a"], OutcomeKind.SUCCEEDED, result='"first"', max_attempts=7),
        outcome(rows["b"], OutcomeKind.SUCCEEDED, result="2"),
        Outcome(job_id="d", worker="someone else", attempt=1, kind=OutcomeKind.SUCCEEDED),
        outcome(rows["e"], OutcomeKind.SUCCEEDED),
    ]
    assert sorted(await store.finish(outcomes, now=T0 + 3)) == ["a", "b", "e"]
    stored = [await store.get(j) for j in "abcde"]
    assert None not in stored
    a, b, c, d, e = (row for row in stored if row is not None)
    assert (a.status, a.result, a.finished_at, a.max_attempts) == (
        "succeeded",
        '"first"',
        T0 + 3,
        7,
    )
    assert (b.status, b.result, b.max_attempts) == ("succeeded", "2", rows["b"].max_attempts)
    assert (e.status, e.result, e.lease_until) == ("succeeded", None, None)
    assert (d.status, d.finished_at) == ("running", None)
    assert (c.status, c.run_at) == ("queued", T0 + 3)


async def test_finish_and_claim_acks_and_takes_new_jobs_in_one_call(store: Store) -> None:
    """The runner's hot path: outcomes written and the next jobs claimed together;
    a chain member released by an outcome is claimable in the same call."""
    await store.insert([new("a", chain_next="b"), new("b", status="waiting"), new("c")], now=T0)
    (a,) = await claim(store, limit=1)
    applied, claimed = await store.finish_and_claim(
        [outcome(a, OutcomeKind.SUCCEEDED, result="1")], request(limit=5), now=T0 + 1
    )
    assert applied == ["a"]
    assert await status(store, "a") == "succeeded"
    assert sorted(row.id for row in claimed) == ["b", "c"]
    assert all(row.status == "running" and row.attempts == 1 for row in claimed)
    stale, more = await store.finish_and_claim(
        [outcome(a, OutcomeKind.SUCCEEDED, result="again")], request(), now=T0 + 2
    )
    assert (stale, list(more)) == ([], [])  # not ours any more: not applied


async def test_finish_retry_schedules_the_job_and_spends_the_attempt(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    (row,) = await claim(store)
    await store.finish(
        [outcome(row, OutcomeKind.RETRY, error="boom", run_at=T0 + 30, max_attempts=5)], now=T0
    )
    again = await store.get("a")
    assert again is not None
    assert (again.status, again.attempts, again.error, again.run_at) == (
        "scheduled",
        1,
        "boom",
        T0 + 30,
    )
    assert (again.worker, again.lease_until, again.max_attempts) == (None, None, 5)
    assert await store.next_run_at() == T0 + 30
    (second,) = await claim(store, now=T0 + 30)
    assert second.attempts == 2


async def test_finish_dead_and_cancelled_end_the_job(store: Store) -> None:
    await store.insert([new("a"), new("b")], now=T0)
    a, b = await claim(store)
    applied = await store.finish(
        [
            outcome(a, OutcomeKind.DEAD, error="Traceback"),
            outcome(b, OutcomeKind.CANCELLED, error="cancelled"),
        ],
        now=T0 + 1,
    )
    assert applied == ["a", "b"]
    dead = await store.get("a")
    assert dead is not None
    assert (dead.status, dead.error, dead.finished_at) == ("dead", "Traceback", T0 + 1)
    assert await status(store, "b") == "cancelled"


async def test_a_cancelled_outcome_without_an_error_says_cancelled(store: Store) -> None:
    """As a cancel does (and a retry of a job asked to stop): PostgreSQL wrote
    'cancelled', SQLite left the error empty."""
    await store.insert([new("a")], now=T0)
    (a,) = await claim(store)
    assert await store.finish([outcome(a, OutcomeKind.CANCELLED)], now=T0 + 1) == ["a"]
    row = await store.get("a")
    assert row is not None
    assert (row.status, row.error, row.finished_at) == ("cancelled", "cancelled", T0 + 1)


async def test_finish_release_refunds_the_attempt(store: Store) -> None:
    """With its only attempt refunded, the job has not started: it kept the claim's
    ``started_at``, shown as its start on a queued job of 0 attempts."""
    await store.insert([new("a")], now=T0)
    (row,) = await claim(store)
    await store.finish([outcome(row, OutcomeKind.RELEASE)], now=T0 + 1)
    released = await store.get("a")
    assert released is not None
    assert (released.status, released.attempts, released.worker) == ("queued", 0, None)
    assert released.started_at is None
    (again,) = await claim(store, now=T0 + 1)
    assert (again.attempts, again.started_at) == (1, T0 + 1)
    await store.finish([outcome(again, OutcomeKind.RETRY, run_at=T0 + 2)], now=T0 + 1)
    (third,) = await claim(store, now=T0 + 2)
    await store.finish([outcome(third, OutcomeKind.RELEASE)], now=T0 + 3)
    tried = await store.get("a")
    assert tried is not None
    assert (tried.attempts, tried.started_at is None) == (1, False)  # it started once


async def test_finish_applies_only_for_the_owning_worker_and_attempt(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    (row,) = await claim(store, worker="w1")
    stale = [
        Outcome(job_id="a", worker="w2", attempt=1, kind=OutcomeKind.SUCCEEDED),
        Outcome(job_id="a", worker="w1", attempt=2, kind=OutcomeKind.SUCCEEDED),
        Outcome(job_id="missing", worker="w1", attempt=1, kind=OutcomeKind.SUCCEEDED),
    ]
    assert await store.finish(stale, now=T0 + 1) == []
    assert await status(store, "a") == "running"
    assert await store.finish([outcome(row, OutcomeKind.SUCCEEDED)], now=T0 + 1) == ["a"]
    # A second outcome for the same attempt is not applied again.
    assert await store.finish([outcome(row, OutcomeKind.DEAD)], now=T0 + 2) == []
    assert await status(store, "a") == "succeeded"
    assert await store.finish([], now=T0) == []


async def test_finish_ignores_a_job_whose_lease_was_recovered_and_claimed_again(
    store: Store,
) -> None:
    await store.insert([new("a")], now=T0)
    (first,) = await claim(store, worker="w1", lease=10)
    await store.recover(now=T0 + 11)
    (second,) = await claim(store, now=T0 + 11, worker="w2")
    assert await store.finish([outcome(first, OutcomeKind.SUCCEEDED)], now=T0 + 12) == []
    assert await store.finish([outcome(second, OutcomeKind.SUCCEEDED)], now=T0 + 12) == ["a"]


# -- chains and batches ------------------------------------------------------------


async def test_chain_success_releases_the_next_member(store: Store) -> None:
    await store.insert(
        [new("one", chain_next="two"), new("two", status="waiting", chain_next="three"),
         new("three", status="waiting")],
        now=T0,
    )  # fmt: skip
    (one,) = await claim(store)
    assert await status(store, "two") == "waiting"
    await store.finish([outcome(one, OutcomeKind.SUCCEEDED)], now=T0 + 5)
    two_row = await store.get("two")
    assert two_row is not None
    assert two_row.status == "queued"
    assert two_row.run_at == T0 + 5
    assert await status(store, "three") == "waiting"
    (two,) = await claim(store, now=T0 + 5)
    assert two.id == "two"


async def test_chain_stops_and_cancels_the_rest_when_a_member_dies(store: Store) -> None:
    await store.insert(
        [new("one", chain_next="two"), new("two", status="waiting", chain_next="three"),
         new("three", status="waiting")],
        now=T0,
    )  # fmt: skip
    (one,) = await claim(store)
    await store.finish([outcome(one, OutcomeKind.DEAD, error="x")], now=T0 + 1)
    assert [await status(store, j) for j in ("two", "three")] == ["cancelled", "cancelled"]
    assert await claim(store, now=T0 + 1) == []


async def test_chain_retry_keeps_the_rest_waiting(store: Store) -> None:
    await store.insert([new("one", chain_next="two"), new("two", status="waiting")], now=T0)
    (one,) = await claim(store)
    await store.finish([outcome(one, OutcomeKind.RETRY, run_at=T0, error="x")], now=T0)
    assert await status(store, "two") == "waiting"


async def test_batch_callback_runs_once_every_member_finished(store: Store) -> None:
    await store.insert(
        [new("m1", batch_id="cb"), new("m2", batch_id="cb"), new("m3", batch_id="cb"),
         new("cb", status="waiting", task="done")],
        now=T0,
    )  # fmt: skip
    m1, m2, m3 = await claim(store)
    await store.finish([outcome(m1, OutcomeKind.SUCCEEDED)], now=T0 + 1)
    await store.finish([outcome(m2, OutcomeKind.RETRY, run_at=T0 + 1, error="x")], now=T0 + 1)
    await store.finish([outcome(m3, OutcomeKind.DEAD, error="x")], now=T0 + 1)
    assert await status(store, "cb") == "waiting"
    (m2,) = await claim(store, now=T0 + 2)
    await store.finish([outcome(m2, OutcomeKind.SUCCEEDED)], now=T0 + 3)
    assert await status(store, "cb") == "queued"
    assert [r.id for r in await claim(store, now=T0 + 3, tasks=["done"])] == ["cb"]


async def test_batch_callback_is_released_when_members_are_cancelled(store: Store) -> None:
    await store.insert(
        [new("m1", batch_id="cb"), new("m2", batch_id="cb"), new("cb", status="waiting")],
        now=T0,
    )
    assert sorted(await store.cancel(["m1", "m2"], now=T0)) == ["m1", "m2"]
    assert await status(store, "cb") == "queued"


# -- leases ------------------------------------------------------------------------


async def test_heartbeat_extends_only_the_workers_own_running_jobs(store: Store) -> None:
    await store.insert([new("a"), new("b"), new("c")], now=T0)
    await claim(store, worker="w1", limit=2)
    await claim(store, worker="w2", limit=1)
    extended = await store.heartbeat(["a", "b", "c", "nope"], worker="w1", lease_until=T0 + 99)
    assert extended == {"a", "b"}
    a, c = await store.get("a"), await store.get("c")
    assert a is not None
    assert a.lease_until == T0 + 99
    assert c is not None
    assert c.lease_until == T0 + 30
    assert await store.heartbeat([], worker="w1", lease_until=T0) == set()


async def test_recover_requeues_jobs_whose_lease_expired(store: Store) -> None:
    await store.insert([new("a"), new("b")], now=T0)
    await claim(store, lease=10, limit=1)
    await claim(store, now=T0 + 5, lease=10, limit=1)
    assert await store.recover(now=T0 + 10) == []
    (recovered,) = await store.recover(now=T0 + 12)
    assert (recovered.id, recovered.task, recovered.attempts, recovered.status) == (
        "a",
        "t",
        1,
        "queued",
    )
    a = await store.get("a")
    assert a is not None
    assert (a.status, a.worker, a.lease_until) == ("queued", None, None)
    assert await status(store, "b") == "running"
    (again,) = await claim(store, now=T0 + 12, worker="w2")
    assert (again.id, again.attempts) == ("a", 2)


async def test_recover_kills_a_job_on_its_last_attempt(store: Store) -> None:
    await store.insert(
        [new("a", max_attempts=1, chain_next="b"), new("b", status="waiting")], now=T0
    )
    await claim(store, lease=10, max_attempts=1)
    (recovered,) = await store.recover(now=T0 + 11)
    assert recovered.status == "dead"
    a = await store.get("a")
    assert a is not None
    assert a.status == "dead"
    assert a.finished_at == T0 + 11
    assert a.error is not None
    assert "lease expired" in a.error
    assert await status(store, "b") == "cancelled"
    assert await claim(store, now=T0 + 11, max_attempts=1) == []


# -- queries and admin -------------------------------------------------------------


async def test_list_is_newest_first_with_filters(store: Store) -> None:
    await store.insert(
        [new("a"), new("b", queue="q"), new("c", task="u"),
         new("d", status="scheduled", run_at=T0 + 100)],
        now=T0,
    )  # fmt: skip
    ids = [r.id for r in await store.list(now=T0)]
    assert ids == ["d", "c", "b", "a"]
    assert [r.id for r in await store.list(queue="q", now=T0)] == ["b"]
    assert [r.id for r in await store.list(task="u", now=T0)] == ["c"]
    assert [r.id for r in await store.list(status="scheduled", now=T0)] == ["d"]
    assert [r.id for r in await store.list(status="queued", now=T0)] == ["c", "b", "a"]
    assert [r.id for r in await store.list(status="queued", now=T0 + 100)] == ["d", "c", "b", "a"]
    assert [r.id for r in await store.list(limit=2, now=T0)] == ["d", "c"]
    c = await store.get("c")
    assert c is not None
    assert [r.id for r in await store.list(before_seq=c.seq, now=T0)] == ["b", "a"]
    assert await store.list(status="dead", now=T0) == []


async def test_list_with_a_preview_reads_only_the_start_of_big_values(store: Store) -> None:
    """``preview=N``: at most N characters of each payload, result and error, a value cut
    short marked (a ``Preview`` with the whole value's size in bytes); none: whole."""
    payload = json.dumps({"args": ["p" * 3_000_000], "kwargs": {}})
    result = json.dumps("r" * 3_000_000)
    error = "\u00e9" * 1_000_000  # 2 bytes each in UTF-8: sizes are bytes, previews characters
    await store.insert([new("big", payload=payload), new("small"), new("failed")], now=T0)
    rows = {r.id: r for r in await claim(store, max_attempts=1)}
    await store.finish(
        [
            outcome(rows["big"], OutcomeKind.SUCCEEDED, result=result),
            outcome(rows["small"], OutcomeKind.SUCCEEDED, result="1"),
            outcome(rows["failed"], OutcomeKind.DEAD, error=error),
        ],
        now=T0 + 1,
    )
    listed = {r.id: r for r in await store.list(now=T0 + 1, preview=100)}
    big, small, failed = listed["big"], listed["small"], listed["failed"]
    assert isinstance(big.payload, Preview)
    assert big.payload == payload[:100]
    assert big.payload.size == len(payload)
    assert isinstance(big.result, Preview)
    assert big.result == result[:100]
    assert big.result.size == len(result)
    assert isinstance(failed.error, Preview)
    assert failed.error == error[:100]
    assert failed.error.size == 2 * len(error)
    assert failed.result is None
    assert big.error is None
    # What fits is whole, and plain text; the other columns are as ``get`` reads them.
    assert small.payload == '{"args": [], "kwargs": {}}'
    assert small.result == "1"
    assert not isinstance(small.payload, Preview)
    assert not isinstance(small.result, Preview)
    assert big._replace(payload=payload, result=result) == await store.get("big")
    exact = await store.list(limit=1, now=T0 + 1, preview=len(error))
    assert not isinstance(exact[0].error, Preview)  # "failed", newest: exactly N is whole
    assert exact[0].error == error
    # Filters, paging and limits work with a preview as without.
    assert [r.id for r in await store.list(status="dead", now=T0 + 1, preview=0)] == ["failed"]
    assert [r.id for r in await store.list(before_seq=small.seq, now=T0 + 1, preview=5)] == ["big"]
    (zero,) = await store.list(status="dead", now=T0 + 1, preview=0)
    assert zero.error == ""
    assert isinstance(zero.error, Preview)
    # Without a preview every value is read whole.
    whole = {r.id: r for r in await store.list(now=T0 + 1)}
    assert whole["big"].payload == payload
    assert whole["big"].result == result
    assert whole["failed"].error == error
    assert not isinstance(whole["big"].result, Preview)


async def test_list_with_a_huge_preview_reads_values_whole_and_a_negative_one_is_refused(
    store: Store,
) -> None:
    """Past 2**31 characters both substr()s took the length as a negative 32-bit number:
    SQLite read every value as '' (returned as if whole), PostgreSQL refused the query."""
    await store.insert([new("a")], now=T0)
    for preview in (2**31 - 2, 2**31, 2**63):
        (row,) = await store.list(now=T0, preview=preview)
        assert row.payload == '{"args": [], "kwargs": {}}'
        assert not isinstance(row.payload, Preview)
    for bad in (-1, -2, 1.5, True):
        with pytest.raises(ValueError, match="preview"):
            await store.list(now=T0, preview=bad)  # type: ignore[arg-type]


async def test_counts_split_pending_jobs_by_run_at(store: Store) -> None:
    await store.insert(
        [new("a"), new("b"), new("c", status="scheduled", run_at=T0 + 10),
         new("d", queue="q", task="u")],
        now=T0,
    )  # fmt: skip
    await claim(store, limit=1)
    assert await store.counts(now=T0) == {
        ("default", "t", "running"): 1,
        ("default", "t", "queued"): 1,
        ("default", "t", "scheduled"): 1,
        ("q", "u", "queued"): 1,
    }
    assert (await store.counts(now=T0 + 10))[("default", "t", "queued")] == 2


async def test_retry_puts_a_dead_job_back_with_one_more_attempt(store: Store) -> None:
    await store.insert([new("a", max_attempts=1), new("b")], now=T0)
    a, b = await claim(store, max_attempts=1)
    await store.finish([outcome(a, OutcomeKind.DEAD, error="x")], now=T0 + 1)
    await store.finish([outcome(b, OutcomeKind.SUCCEEDED)], now=T0 + 1)
    assert await store.retry("b", now=T0 + 2) is False
    assert await store.retry("missing", now=T0 + 2) is False
    assert await store.retry("a", now=T0 + 2) is True
    row = await store.get("a")
    assert row is not None
    assert (row.status, row.run_at, row.finished_at, row.max_attempts) == (
        "queued",
        T0 + 2,
        None,
        2,
    )
    (again,) = await claim(store, now=T0 + 2, max_attempts=1, tasks=["t"])
    assert (again.id, again.attempts) == ("a", 2)
    assert await store.retry("a", now=T0 + 2) is False  # running


async def test_retry_takes_back_a_cancelled_job(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    assert await store.cancel(["a"], now=T0) == ["a"]
    assert await store.retry("a", now=T0 + 1) is True
    assert await status(store, "a") == "queued"


async def test_cancel_stops_unfinished_jobs_and_the_rest_of_their_chain(store: Store) -> None:
    await store.insert(
        [new("one", chain_next="two"), new("two", status="waiting"), new("done"),
         new("run"), new("later", chain_next="last"), new("last", status="waiting")],
        now=T0,
    )  # fmt: skip
    rows = {r.id: r for r in await claim(store, limit=3)}
    assert sorted(rows) == ["done", "one", "run"]
    await store.finish([outcome(rows["done"], OutcomeKind.SUCCEEDED)], now=T0)
    cancelled = await store.cancel(["later", "one", "done", "run", "missing"], now=T0 + 1)
    assert sorted(cancelled) == ["last", "later", "one", "run"]
    later = await store.get("later")
    assert later is not None
    assert (later.status, later.finished_at) == ("cancelled", T0 + 1)
    assert await status(store, "last") == "cancelled"
    assert await status(store, "done") == "succeeded"
    # Running jobs are asked to stop: they keep their slot until their worker answers.
    assert [await status(store, j) for j in ("one", "two", "run")] == [
        "running", "waiting", "running"
    ]  # fmt: skip
    assert await store.cancel(["one"], now=T0 + 2) == []  # asked already
    worker = rows["one"].worker
    assert worker is not None
    owned = await store.heartbeat(["one", "run"], worker=worker, lease_until=T0 + 90)
    assert owned == set()  # no longer the worker's to run
    assert (await store.get("one")).lease_until == T0 + 90  # type: ignore[union-attr]
    stopped = outcome(rows["one"], OutcomeKind.CANCELLED, error="cancelled while running")
    assert await store.finish([stopped], now=T0 + 3) == ["one"]
    assert [await status(store, j) for j in ("one", "two")] == ["cancelled", "cancelled"]
    # A job that finished before its worker heard of the cancel keeps its outcome.
    assert await store.finish([outcome(rows["run"], OutcomeKind.SUCCEEDED)], now=T0 + 3) == ["run"]
    assert await status(store, "run") == "succeeded"


async def test_a_job_asked_to_stop_never_runs_again(store: Store) -> None:
    await store.insert([new("retry"), new("release"), new("crash")], now=T0)
    rows = {r.id: r for r in await claim(store, limit=3, lease=10)}
    assert sorted(await store.cancel(list(rows), now=T0 + 1)) == ["crash", "release", "retry"]
    applied = await store.finish(
        [
            outcome(rows["retry"], OutcomeKind.RETRY, error="boom", run_at=T0 + 60),
            outcome(rows["release"], OutcomeKind.RELEASE),
        ],
        now=T0 + 2,
    )
    assert sorted(applied) == ["release", "retry"]
    for job_id, error in (("retry", "boom"), ("release", "cancelled")):
        row = await store.get(job_id)
        assert row is not None
        assert (row.status, row.error, row.finished_at) == ("cancelled", error, T0 + 2)
    # Its worker died before stopping it: cancelled when the lease expires, not requeued.
    (recovered,) = await store.recover(now=T0 + 11)
    assert (recovered.id, recovered.status) == ("crash", "cancelled")
    crash = await store.get("crash")
    assert crash is not None
    assert (crash.status, crash.finished_at, crash.worker) == ("cancelled", T0 + 11, None)
    assert "cancelled while running" in (crash.error or "")
    assert await claim(store, now=T0 + 100) == []
    # Retried by hand, it is an ordinary job again: not asked to stop any more.
    assert await store.retry("retry", now=T0 + 100)
    (again,) = await claim(store, now=T0 + 100)
    assert again.worker is not None
    owned = await store.heartbeat(["retry"], worker=again.worker, lease_until=T0 + 160)
    assert owned == {"retry"}
    failed = outcome(again, OutcomeKind.RETRY, error="boom", run_at=T0 + 200)
    assert await store.finish([failed], now=T0 + 101) == ["retry"]
    assert await status(store, "retry") == "scheduled"


async def test_purge_deletes_finished_jobs_by_status_or_age(store: Store) -> None:
    await store.insert([new("a"), new("b"), new("c"), new("d")], now=T0)
    a, b, c = await claim(store, limit=3)
    await store.finish([outcome(a, OutcomeKind.SUCCEEDED)], now=T0 + 1)
    await store.finish([outcome(b, OutcomeKind.DEAD, error="x")], now=T0 + 5)
    with pytest.raises(ValueError, match="status or older_than"):
        await store.purge(now=T0 + 10)
    assert await store.purge(status="running", now=T0 + 10) == 0
    assert await store.purge(older_than=T0 + 3, now=T0 + 10) == 1
    assert await store.get("a") is None
    assert await store.purge(status="dead", now=T0 + 10) == 1
    assert [r.id for r in await store.list(now=T0)] == ["d", "c"]
    assert await status(store, c.id) == "running"


async def test_set_progress_on_a_running_job(store: Store) -> None:
    await store.insert([new("a"), new("b")], now=T0)
    await claim(store, limit=1)
    await store.set_progress("a", 0.5, "half")
    await store.set_progress("b", 0.5, "not running")
    a, b = await store.get("a"), await store.get("b")
    assert a is not None
    assert (a.progress, a.progress_message) == (0.5, "half")
    assert b is not None
    assert b.progress is None


async def test_set_progress_of_an_attempt_that_is_no_longer_the_jobs_is_ignored(
    store: Store,
) -> None:
    """A late attempt (its lease lost, the job claimed again) writes no progress."""
    await store.insert([new("a")], now=T0)
    await claim(store, worker="w1", lease=10)
    await store.recover(now=T0 + 11)
    await claim(store, now=T0 + 11, worker="w2")
    await store.set_progress("a", 0.9, "late", worker="w1", attempt=1)
    await store.set_progress("a", 0.9, "wrong attempt", worker="w2", attempt=1)
    row = await store.get("a")
    assert row is not None
    assert (row.attempts, row.progress, row.progress_message) == (2, None, None)
    await store.set_progress("a", 0.2, "now", worker="w2", attempt=2)
    row = await store.get("a")
    assert row is not None
    assert (row.progress, row.progress_message) == (0.2, "now")


# -- lifecycle and other connections -----------------------------------------------


async def test_open_and_close_are_idempotent(backend_url: str) -> None:
    store = open_store(backend_url)
    await store.open()
    await store.open()
    await store.insert([new("a")], now=T0)
    await store.close()
    await store.close()
    reopened = open_store(backend_url)
    try:
        assert await status(reopened, "a") == "queued"  # opens on first use
    finally:
        await reopened.close()


async def test_changed_reports_another_connections_write(store: Store, backend_url: str) -> None:
    other = open_store(backend_url)
    try:
        await other.open()
        await store.changed()
        assert await store.changed() is False
        await other.insert([new("a")], now=T0)
        # Wake-ups may arrive asynchronously (NOTIFY): wait a little in real time.
        deadline = time.monotonic() + 5  # noqa: TID251 - real delivery delay
        while not await store.changed():
            assert time.monotonic() < deadline, "changed() never saw the insert"  # noqa: TID251
            await anyio.sleep(0.01)  # noqa: TID251 - waiting for a real notification
        assert await store.changed() is False
    finally:
        await other.close()


async def test_two_stores_claim_disjoint_jobs(store: Store, backend_url: str) -> None:
    other = open_store(backend_url)
    try:
        await store.insert([new(f"j{i}") for i in range(40)], now=T0)
        results: list[list[JobRow]] = []

        async def grab(s: Store, worker: str) -> None:
            for _ in range(10):
                results.append(list(await s.claim(request(worker=worker, limit=3), now=T0)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(grab, store, "w1")
            tg.start_soon(grab, other, "w2")
        ids = [r.id for rows in results for r in rows]
        assert len(ids) == len(set(ids)) == 40
    finally:
        await other.close()


async def test_driver_errors_become_store_errors(store: Store) -> None:
    await store.insert([new("a")], now=T0)
    with pytest.raises(StoreError):
        # The same id twice in one batch breaks the primary key on every backend.
        await store.insert([new("b"), new("b", idempotency_key="other")], now=T0)
    assert await store.get("b") is None  # the whole insert rolled back


async def test_a_value_the_driver_cannot_send_is_refused_as_data(store: Store) -> None:
    """Text no UTF-8 encodes (a lone surrogate) and an int past 64 bits: asyncpg's
    refusal came back as DataRefused, sqlite3's escaped the store as UnicodeEncodeError
    and OverflowError, no StoreError at all."""
    await store.insert([new("a")], now=T0)
    with pytest.raises(DataRefused):
        await store.get("\ud800")
    with pytest.raises(DataRefused):
        await store.list(task="\ud800", now=T0)
    with pytest.raises(DataRefused):
        await store.list(before_seq=2**63, now=T0)
    with pytest.raises(ConfigurationError):  # the store's own check, before the driver
        await store.insert([new("b", queue="\udcff")], now=T0)
    with pytest.raises(DataRefused):  # past it (as Jobs built it): the driver's refusal
        await store.insert([CheckedJob(*new("b", queue="\udcff"))], now=T0)
    assert [row.id for row in await store.list(now=T0)] == ["a"]  # the store goes on


async def test_released_jobs_receive_the_result_or_the_batch_counts(store: Store) -> None:
    await store.insert(
        [new("one", chain_next="two"),
         new("two", status="waiting", payload='{"args": [1], "kwargs": {}}',
             options='{"pass_result": true}'),
         new("m1", batch_id="cb"), new("m2", batch_id="cb"),
         new("cb", status="waiting", options='{"batch_counts": true}')],
        now=T0,
    )  # fmt: skip
    rows = {r.id: r for r in await claim(store)}
    await store.finish(
        [
            outcome(rows["one"], OutcomeKind.SUCCEEDED, result='{"size": 3}'),
            outcome(rows["m1"], OutcomeKind.SUCCEEDED),
            outcome(rows["m2"], OutcomeKind.DEAD, error="x"),
        ],
        now=T0 + 1,
    )
    two, cb = await store.get("two"), await store.get("cb")
    assert two is not None
    assert json.loads(two.payload) == {"args": [{"size": 3}, 1], "kwargs": {}}
    assert cb is not None
    assert cb.status == "queued"
    assert json.loads(cb.payload)["kwargs"]["batch"] == {
        "id": "cb", "total": 2, "succeeded": 1, "dead": 1, "cancelled": 0,
    }  # fmt: skip
    assert await store.batch_counts("cb") == {"succeeded": 1, "dead": 1}


async def test_operations_snapshot_prune_meta_retry_dead_delete(store: Store) -> None:
    await store.insert(
        [new("a"), new("b"), new("c", status="scheduled", run_at=T0 + 50), new("d")], now=T0
    )
    rows = {r.id: r for r in await claim(store, limit=2)}
    await store.finish([outcome(rows["a"], OutcomeKind.SUCCEEDED)], now=T0 + 10)
    await store.finish([outcome(rows["b"], OutcomeKind.DEAD, error="x")], now=T0 + 20)
    beat = WorkerBeat(
        id="w1", host="h", pid=1, started_at=T0, running=0, concurrency=4, queues=("default",),
        visibility_timeout=90.0,
    )  # fmt: skip
    await store.record_worker(beat, now=T0 + 20)
    snap = await store.snapshot(now=T0 + 30, windows=[15.0, 60.0], sample=10, workers_since=T0)
    assert snap.counts == {
        ("default", "t", "succeeded"): 1,
        ("default", "t", "dead"): 1,
        ("default", "t", "scheduled"): 1,
        ("default", "t", "queued"): 1,
    }
    assert snap.oldest_due == {("default", "t"): T0}
    assert snap.finished[("default", "t", "succeeded")] == [0, 1]
    assert snap.finished[("default", "t", "dead")] == [1, 1]
    assert [s.status for s in snap.samples] == ["dead", "succeeded"]
    assert [(w.id, w.queues, w.last_seen_at, w.visibility_timeout) for w in snap.workers] == [
        ("w1", ("default",), T0 + 20, 90.0)
    ]
    assert await store.meta("k", "first") == "first"
    assert await store.meta("k", "second") == "first"
    assert await store.last_slot("nightly") is None
    assert await store.last_slot("nightly", 1_800_000_000) == 1_800_000_000
    assert await store.last_slot("nightly", 1_700_000_000) == 1_800_000_000  # later kept
    assert await store.last_slot("hourly", 1_799_996_400) == 1_799_996_400
    assert await store.last_slot("nightly") == 1_800_000_000
    assert await store.seen_until("nightly") is None  # apart from the last slot
    assert await store.seen_until("nightly", 1_800_000_300) == 1_800_000_300
    assert await store.seen_until("nightly", 1_800_000_200) == 1_800_000_300  # later kept
    assert await store.last_slot("nightly") == 1_800_000_000
    assert await store.retry_dead(queue=None, task="t", now=T0 + 31) == 1
    assert await status(store, "b") == "queued"
    assert (
        await store.prune(
            finished_before=T0 + 40, dead_before=T0 + 40, workers_before=T0 + 21, limit=10
        )
        == 1
    )
    assert await store.get("a") is None
    assert (await store.snapshot(now=T0, windows=[], sample=1, workers_since=0)).workers == []
    assert await store.delete(["b", "d", "missing"], now=T0) == 2
    assert [r.id for r in await store.list(now=T0)] == ["c"]
