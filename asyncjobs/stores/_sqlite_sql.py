"""The SQL of ``SQLiteStore``'s enqueue and heartbeat, and the reads around them: the
columns a job is read as, when a job is next due, and the jobs whose rate-limit key is
pending. The SQL of a claim lives in ``_sqlite_claim``; that of a finish, with the
chain and batch releases (or cancellations) that a finished job sets off, in
``_sqlite_finish``.

Each function takes the sqlite3 connection it runs on as its first argument: the
store's connection thread, or a side connection on the event loop thread
(``_sqlite_side``). Writes run inside the transaction the store opened;
``insert_jobs`` also inside the caller's own, for transactional enqueue. ``_read``
wraps a function in one read transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from functools import cache
from typing import Any, Concatenate, ParamSpec, TypeVar

from asyncjobs.stores._claims import RateKeyed
from asyncjobs.stores._job_rows import Inserted, JobRow, NewJob
from asyncjobs.stores._protocol import PREVIEWED

P = ParamSpec("P")
T = TypeVar("T")

# JobRow's fields in order (a test holds them equal): a row builds a JobRow as it is.
COLUMNS = (
    "id", "seq", "task", "queue", "status", "priority", "payload", "options", "attempts",
    "max_attempts", "run_at", "enqueued_at", "started_at", "finished_at", "lease_until",
    "worker", "result", "error", "idempotency_key", "group_key", "progress",
    "progress_message", "chain_next", "batch_id",
)  # fmt: skip
_SELECT = ", ".join(COLUMNS)
# list(preview=N): the PREVIEWED columns read as their first N + 1 characters (one ?
# each, in COLUMNS' order), then the size of each in bytes: a list view reads a bounded
# start of a 64 MiB result, and sees whether (and how much) was left out.
_PREVIEW_SELECT = (
    ", ".join(f"substr({c}, 1, ?)" if c in PREVIEWED else c for c in COLUMNS)
    + ", "
    + ", ".join(f"length(CAST({c} AS BLOB))" for c in PREVIEWED)
)


def _row(values: Sequence[Any]) -> JobRow:
    return JobRow._make(values)


def _read(
    db: sqlite3.Connection,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run ``fn`` in one read transaction, so its queries see one consistent state."""
    db.execute("BEGIN")
    try:
        return fn(db, *args, **kwargs)
    finally:
        db.execute("COMMIT")


def _next_run_at(db: sqlite3.Connection) -> list[Any]:
    # INDEXED BY: the planner picks the (status, seq) index and reads every scheduled row
    # (1 ms with 10,000 of them) instead of the first of this one.
    return db.execute(
        "SELECT min(run_at) FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_scheduled "
        "WHERE status = 'scheduled'"
    ).fetchall()


_INSERT_INTO = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, options, "
    "max_attempts, run_at, enqueued_at, idempotency_key, group_key, chain_next, batch_id, "
    "rate_key"
)
_INSERT_MARKS = "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
# With a job dispatched at insert, four columns more; with a job whose rate-limit key
# is pending, one more; with a job of a group, its mark (``_behind``). Only then, as the
# driver binds every parameter holding the GIL (a None too, and not for free).
_STARTED = ", attempts, started_at, lease_until, worker"
_STARTED_MARKS = ", ?, ?, ?, ?"
_PENDING = ", key_pending"
_PENDING_MARK = ", ?"
_BEHIND = ", behind"
_BEHIND_MARK = ", ?"


@cache
def _insert_sql(dispatched: bool, pending: bool, grouped: bool) -> tuple[str, str]:
    """The statement's head, and one row's placeholders, with the columns these need."""
    columns, marks = _INSERT_INTO, _INSERT_MARKS
    if dispatched:
        columns, marks = columns + _STARTED, marks + _STARTED_MARKS
    if pending:
        columns, marks = columns + _PENDING, marks + _PENDING_MARK
    if grouped:
        columns, marks = columns + _BEHIND, marks + _BEHIND_MARK
    return columns + ") VALUES ", "(" + marks + ")"


_INSERT_TAIL = " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
_NOT_STARTED = (0, None, None, None)
_INSERT_CHUNK = 500
"""Rows per INSERT statement (at most 20 values each, well under SQLite's 32,766)."""

_UNFINISHED = frozenset(("scheduled", "queued", "running"))
_GROUPS_UNFINISHED = (
    "SELECT value FROM json_each(?) WHERE EXISTS (SELECT 1 FROM asyncjobs_jobs "
    "WHERE group_key = value AND status IN ('scheduled', 'queued', 'running'))"
)
"""Which of some groups have an unfinished job: a seek each in asyncjobs_jobs_group."""


def _behind(db: sqlite3.Connection, jobs: Sequence[NewJob]) -> list[int | None] | None:
    """Each job's ``behind`` mark (migration 0012): 1 when an unfinished job of its group
    comes before it, stored or earlier in ``jobs``, so the ready indexes leave it out;
    None when no job has a group. A job with an idempotency key may not be inserted (its
    key is taken): the jobs after it are not marked on its account, as a mark too few
    costs a claim one row and one too many would hold the group."""
    groups = {j.group_key for j in jobs if j.group_key is not None}
    if not groups:
        return None
    ahead = {g for (g,) in db.execute(_GROUPS_UNFINISHED, (json.dumps(list(groups)),))}
    marks: list[int | None] = []
    for j in jobs:
        unfinished = j.status in _UNFINISHED
        marks.append(1 if unfinished and j.group_key in ahead else None)
        if unfinished and j.group_key is not None and j.idempotency_key is None:
            ahead.add(j.group_key)
    return marks


def insert_jobs(
    db: sqlite3.Connection, jobs: Sequence[NewJob], now: float | Callable[[], float]
) -> Inserted:
    """Insert ``jobs`` through ``db`` (already in a transaction); return their ids.

    Also used by transactional enqueue on the caller's own connection. One multi-row
    statement per chunk rather than ``executemany``: each statement step releases and
    retakes the GIL, and under a busy event loop every retake can wait. A clock for
    ``now`` is read here, at each try of the write: a try that found the file locked
    and waited does not count that wait into the lease of a job inserted running.
    """
    if callable(now):
        now = now()
    seqs: dict[str, int] = {}
    behind = _behind(db, jobs)
    for start in range(0, len(jobs), _INSERT_CHUNK):
        chunk = jobs[start : start + _INSERT_CHUNK]
        dispatched = any(j.worker is not None for j in chunk)
        pending = any(j.key_pending for j in chunk)
        values: list[Any] = []
        for n, j in enumerate(chunk, start):
            values += (
                j.id, j.task, j.queue, j.status, j.priority, j.payload, j.options,
                j.max_attempts, j.run_at, now, j.idempotency_key, j.group_key,
                j.chain_next, j.batch_id, j.rate_key,
            )  # fmt: skip
            if dispatched:  # a dispatched job's first attempt starts now
                values += _NOT_STARTED if j.worker is None else (1, now, j.lease_end(now), j.worker)
            if pending:
                values.append(1 if j.key_pending else None)
            if behind is not None:
                values.append(behind[n])
        head, row = _insert_sql(dispatched, pending, behind is not None)
        sql = head + ", ".join([row] * len(chunk)) + _INSERT_TAIL
        if dispatched:  # the runner needs their seq; RETURNING lists every inserted row
            returned = db.execute(sql + " RETURNING id, seq, worker", values).fetchall()
            seqs.update((job_id, seq) for job_id, seq, worker in returned if worker is not None)
        else:
            db.execute(sql, values)
    keys = [j.idempotency_key for j in jobs if j.idempotency_key is not None]
    if not keys:
        return Inserted([j.id for j in jobs], seqs=seqs, at=now)
    stored = dict(
        db.execute(
            "SELECT idempotency_key, id FROM asyncjobs_jobs WHERE idempotency_key IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        ).fetchall()
    )
    ids = [j.id if j.idempotency_key is None else stored[j.idempotency_key] for j in jobs]
    return Inserted(ids, seqs=seqs, at=now)


def _heartbeat(
    db: sqlite3.Connection,
    job_ids: Sequence[str],
    worker: str,
    lease_until: float | Callable[[], float],
) -> set[str]:
    if callable(lease_until):  # read with the write lock held, as in _claim
        lease_until = lease_until()
    rows = db.execute(
        "UPDATE asyncjobs_jobs SET lease_until = ? WHERE status = 'running' AND worker = ? "
        "AND id IN (SELECT value FROM json_each(?)) RETURNING id, cancel_requested_at",
        (lease_until, worker, json.dumps(list(job_ids))),
    ).fetchall()
    # A job asked to stop keeps its lease while it stops, but is no longer ours to run.
    return {job_id for job_id, cancel_requested in rows if cancel_requested is None}


_PENDING_KEYS = (
    "SELECT " + _SELECT + " FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_key_pending "  # noqa: S608
    "WHERE key_pending IS NOT NULL AND status = 'queued' "
    "AND task IN (SELECT value FROM json_each(?)) ORDER BY priority DESC, seq LIMIT ?"
)


def pending_keys(db: sqlite3.Connection, tasks: Collection[str], limit: int) -> list[JobRow]:
    rows = db.execute(_PENDING_KEYS, (json.dumps(sorted(tasks)), limit)).fetchall()
    return [_row(r) for r in rows]


def set_rate_keys(db: sqlite3.Connection, keys: Sequence[RateKeyed]) -> None:
    db.executemany(
        "UPDATE asyncjobs_jobs SET rate_key = ?, key_pending = NULL "
        "WHERE id = ? AND key_pending IS NOT NULL",
        [(k.rate_key, k.job_id) for k in keys],
    )
