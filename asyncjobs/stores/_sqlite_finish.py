"""The SQL of ``SQLiteStore``'s finish, and of what a finished job sets off: the next
member of its chain released (or the rest of its chain cancelled) and its batch's
callback released once the batch is done, with the tally of a batch's deleted members.
Cancelling lives here too, with the releases it calls and that call it.

Each function takes the sqlite3 connection it runs on as its first argument (as in
``_sqlite_sql``), and runs inside the write transaction the store opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from asyncjobs.stores._dependents import (
    COUNTS_FLAG,
    RESULT_FLAG,
    pass_result,
    tally,
    wants,
    with_batch,
)
from asyncjobs.stores._outcomes import Applied, Outcome, OutcomeKind

_FINISH_SQL = {
    OutcomeKind.SUCCEEDED: (
        "status = 'succeeded', result = ?, error = NULL, finished_at = ?, lease_until = NULL"
    ),
    OutcomeKind.DEAD: "status = 'dead', result = ?, error = ?, finished_at = ?, lease_until = NULL",
    OutcomeKind.CANCELLED: (  # as a cancel writes it when the outcome gives no error
        "status = 'cancelled', result = ?, error = coalesce(?, 'cancelled'), finished_at = ?, "
        "lease_until = NULL"
    ),
    OutcomeKind.RETRY: (
        "status = 'scheduled', result = ?, error = ?, run_at = ?, lease_until = NULL, worker = NULL"
    ),
    OutcomeKind.RELEASE: (
        "status = 'queued', result = ?, attempts = attempts - 1, lease_until = NULL, "
        # The only attempt refunded: the job has not started (the claim set started_at).
        "worker = NULL, started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END"
    ),
}


# Every success of a flush in one statement (the common case: no-op jobs finish by
# the dozen), its outcomes bound as rows of VALUES: (id, worker, attempt, result,
# max_attempts). A json_each of the same rows cost 20% more per job.
_FINISH_SUCCEEDED_HEAD = "WITH o(id, worker, attempt, result, max_attempts) AS (VALUES "
_FINISH_SUCCEEDED_ROW = "(?, ?, ?, ?, ?)"
_FINISH_SUCCEEDED_TAIL = """)
    UPDATE asyncjobs_jobs INDEXED BY sqlite_autoindex_asyncjobs_jobs_1
    SET status = 'succeeded', result = o.result, error = NULL, finished_at = ?,
        lease_until = NULL, max_attempts = coalesce(o.max_attempts, asyncjobs_jobs.max_attempts)
    FROM o
    WHERE asyncjobs_jobs.id = o.id AND asyncjobs_jobs.status = 'running'
      AND asyncjobs_jobs.worker = o.worker AND asyncjobs_jobs.attempts = o.attempt
    RETURNING asyncjobs_jobs.id, chain_next, batch_id"""
_FINISH_CHUNK = 500
"""Successes per statement (five values each, well under SQLite's 32,766)."""


def _finish(db: sqlite3.Connection, outcomes: Sequence[Outcome], now: float) -> Applied:
    applied: list[str] = []
    cancelled: list[str] = []
    successes = [o for o in outcomes if o.kind is OutcomeKind.SUCCEEDED]
    if len(successes) > 1:
        outcomes = [o for o in outcomes if o.kind is not OutcomeKind.SUCCEEDED]
        results = {o.job_id: o.result for o in successes}
        for start in range(0, len(successes), _FINISH_CHUNK):
            chunk = successes[start : start + _FINISH_CHUNK]
            values: list[Any] = []
            for o in chunk:
                values += (o.job_id, o.worker, o.attempt, o.result, o.max_attempts)
            values.append(now)
            rows = ", ".join([_FINISH_SUCCEEDED_ROW] * len(chunk))
            sql = _FINISH_SUCCEEDED_HEAD + rows + _FINISH_SUCCEEDED_TAIL
            for job_id, chain_next, batch_id in db.execute(sql, values).fetchall():
                applied.append(job_id)
                if chain_next is not None or batch_id is not None:
                    _release_dependents(
                        db, OutcomeKind.SUCCEEDED, chain_next, batch_id, now, results[job_id]
                    )
    for o in outcomes:
        if o.kind in (OutcomeKind.RETRY, OutcomeKind.RELEASE) and _cancel_requested(db, o.job_id):
            # Asked to stop while it ran: it ends cancelled instead of running again.
            o = o._replace(kind=OutcomeKind.CANCELLED, error=o.error or "cancelled")
            cancelled.append(o.job_id)
        if o.kind is OutcomeKind.SUCCEEDED:
            row_values: tuple[Any, ...] = (o.result, now)
        elif o.kind is OutcomeKind.RETRY:
            row_values = (o.result, o.error, o.run_at)
        elif o.kind is OutcomeKind.RELEASE:
            row_values = (o.result,)
        else:
            row_values = (o.result, o.error, now)
        row = db.execute(
            f"UPDATE asyncjobs_jobs SET {_FINISH_SQL[o.kind]}, "  # noqa: S608 - constant
            "max_attempts = coalesce(?, max_attempts) "
            "WHERE id = ? AND status = 'running' AND worker = ? AND attempts = ? "
            "RETURNING chain_next, batch_id",
            (*row_values, o.max_attempts, o.job_id, o.worker, o.attempt),
        ).fetchone()
        if row is None:
            continue
        applied.append(o.job_id)
        _release_dependents(db, o.kind, row[0], row[1], now, o.result)
    return Applied(applied, cancelled=[job_id for job_id in cancelled if job_id in applied])


def _cancel_requested(db: sqlite3.Connection, job_id: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM asyncjobs_jobs WHERE id = ? AND cancel_requested_at IS NOT NULL",
        (job_id,),
    ).fetchone()
    return row is not None


_RELEASE = (
    "UPDATE asyncjobs_jobs SET status = CASE WHEN run_at > ? THEN 'scheduled' "
    "ELSE 'queued' END, run_at = max(run_at, ?) WHERE id = ? AND status = 'waiting'"
)
"""A waiting job released (``now``, ``now``, id): due at once, or when its own delay
(counted from when it was enqueued) ends."""


def _release_dependents(
    db: sqlite3.Connection,
    kind: str,
    chain_next: str | None,
    batch_id: str | None,
    now: float,
    result: str | None = None,
) -> None:
    """After a job finished: move its chain on (or cancel the rest) and its batch.

    A released job marked for it gets the result or the batch counts in its payload
    (``asyncjobs/stores/_dependents.py``).
    """
    if kind in (OutcomeKind.RETRY, OutcomeKind.RELEASE):
        return
    if chain_next is not None:
        if kind == OutcomeKind.SUCCEEDED:
            row = _waiting(db, chain_next)
            if row is not None and wants(row[1], RESULT_FLAG):
                db.execute(
                    "UPDATE asyncjobs_jobs SET payload = ?, options = ? WHERE id = ?",
                    (*pass_result(row[0], row[1], result), chain_next),
                )
            db.execute(_RELEASE, (now, now, chain_next))
        else:
            _cancel(db, [chain_next], now, reason="an earlier job in its chain did not succeed")
    if batch_id is not None:
        unfinished = db.execute(  # a seek in asyncjobs_jobs_batch, not a count of members
            "SELECT 1 FROM asyncjobs_jobs WHERE batch_id = ? "
            "AND status IN ('waiting', 'scheduled', 'queued', 'running') LIMIT 1",
            (batch_id,),
        ).fetchone()
        if unfinished is None:
            row = _waiting(db, batch_id)
            if row is not None and wants(row[1], COUNTS_FLAG):
                counts = dict(_batch_counts(db, batch_id))
                db.execute(
                    "UPDATE asyncjobs_jobs SET payload = ? WHERE id = ?",
                    (with_batch(row[0], batch_id, counts), batch_id),
                )
            db.execute(_RELEASE, (now, now, batch_id))


def _waiting(db: sqlite3.Connection, job_id: str) -> tuple[str, str | None] | None:
    """The payload and options of job ``job_id`` if it is still waiting to be released."""
    row = db.execute(
        "SELECT payload, options FROM asyncjobs_jobs WHERE id = ? AND status = 'waiting'",
        (job_id,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


_BATCH_COUNTS = (
    "SELECT status, sum(n) FROM (SELECT status, count(*) AS n FROM asyncjobs_jobs "
    "WHERE batch_id = ? GROUP BY status UNION ALL "
    "SELECT status, n FROM asyncjobs_batch_deleted WHERE batch_id = ?) GROUP BY status"
)


def _batch_counts(db: sqlite3.Connection, batch_id: str) -> list[tuple[str, int]]:
    """A batch's members by status: the stored ones, and those deleted since
    (``tally_deleted``)."""
    return db.execute(_BATCH_COUNTS, (batch_id, batch_id)).fetchall()


_TALLY = (
    "INSERT INTO asyncjobs_batch_deleted (batch_id, status, n, finished_at) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]') FROM json_each(?) WHERE true "
    "ON CONFLICT (batch_id, status) DO UPDATE SET n = n + excluded.n, "
    "finished_at = max(finished_at, excluded.finished_at)"
)


def tally_deleted(
    db: sqlite3.Connection, deleted: Sequence[tuple[str | None, str, float | None]]
) -> None:
    """After rows were deleted, (batch_id, status, finished_at) each: add the batch
    members among them to their batch's tally of deleted members, which the batch's
    counts add back (``prune`` drops a tally with the last job of its batch)."""
    rows = tally(deleted)
    if rows:
        db.execute(_TALLY, (json.dumps(rows),))


def _cancel(
    db: sqlite3.Connection, job_ids: Sequence[str], now: float, reason: str = "cancelled"
) -> list[str]:
    cancelled: list[str] = []
    pending = list(job_ids)
    while pending:
        job_id = pending.pop()
        row = db.execute(
            "UPDATE asyncjobs_jobs SET status = 'cancelled', finished_at = ?, lease_until = NULL, "
            "error = coalesce(error, ?) "
            "WHERE id = ? AND status IN ('waiting', 'scheduled', 'queued') "
            "RETURNING chain_next, batch_id",
            (now, reason, job_id),
        ).fetchone()
        if row is None:
            # Running: ask its worker to stop it. It holds its slot until then, and its
            # outcome (cancelled, or what it reached first) moves its chain and batch on.
            if db.execute(
                "UPDATE asyncjobs_jobs SET cancel_requested_at = ? "
                "WHERE id = ? AND status = 'running' AND cancel_requested_at IS NULL "
                "RETURNING id",
                (now, job_id),
            ).fetchone():
                cancelled.append(job_id)
            continue
        cancelled.append(job_id)
        chain_next, batch_id = row
        if chain_next is not None:
            pending.append(chain_next)
        if batch_id is not None:
            _release_dependents(db, OutcomeKind.CANCELLED, None, batch_id, now)
    return cancelled
