"""The SQL of ``SQLiteStore``'s hot path: enqueue, claim, finish and heartbeat, and
the chain and batch releases (or cancellations) that a finished job sets off.

Each function takes the sqlite3 connection it runs on as its first argument: the
store's connection thread, or a side connection on the event loop thread
(``_sqlite_side``). Writes run inside the transaction the store opened;
``insert_jobs`` also inside the caller's own, for transactional enqueue. ``_read``
wraps a function in one read transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from functools import cache
from typing import Any, Concatenate, ParamSpec, TypeVar

from asyncjobs.stores._dependents import (
    COUNTS_FLAG,
    RESULT_FLAG,
    pass_result,
    tally,
    wants,
    with_batch,
)
from asyncjobs.stores._protocol import (
    PREVIEWED,
    Applied,
    Claimed,
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    Outcome,
    OutcomeKind,
    RateKeyed,
)
from asyncjobs.stores._sqlite_limits import Walks, choose, has_limits

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


_ANY_QUEUED = "SELECT 1 FROM asyncjobs_jobs WHERE status = 'queued' LIMIT 1"


DUE_PER_CLAIM = 1000
"""The most scheduled jobs a claim makes queued: a claim runs on the event loop thread,
and 100,000 jobs due at once (a newsletter at 9:00) held it 0.4 s. The rest are queued
by the claims that follow at once (the runner wakes for a due job), those due longest
first: up to about 40 ms of work each. Priorities order the jobs made ready; a
high-priority job due later than 1,000 others waits for those to be made ready (as
Sidekiq's scheduled poller moves jobs in order of due time), not for them to run."""


def _claim(
    db: sqlite3.Connection,
    request: ClaimRequest,
    now: float,
    walks: Walks | None = None,
    version: int | None = None,
) -> Claimed:
    """``walks``: the store's walks past the window (``Walks``; None: from the start),
    and ``version`` the file's data version read before the claim."""
    if walks is not None:
        walks.claiming(version)
    # The write lock is held (BEGIN IMMEDIATE): read the time now. ``now`` was read
    # before any wait for another process's lock, and a lease counted from it would be
    # written short by that wait, even already expired.
    if request.clock is not None:
        now = request.clock()
    db.execute(
        # INDEXED BY: as in next_run_at, the due rows only, not every scheduled one.
        "UPDATE asyncjobs_jobs SET status = 'queued' WHERE seq IN (SELECT seq FROM "
        "asyncjobs_jobs INDEXED BY asyncjobs_jobs_scheduled WHERE status = 'scheduled' "
        "AND run_at <= ? ORDER BY run_at LIMIT ?)",
        (now, DUE_PER_CLAIM),
    )
    if not db.execute(_ANY_QUEUED).fetchall():
        # Nothing ready (a runner's claim with each write of outcomes, an idle poll):
        # a probe of the status index costs a twentieth of the claim's statement.
        return Claimed()
    slots = request.limit - request.ahead
    claimed = _claim_ready(db, request, slots, now, walks, last_attempts=True)
    # More may be ready: look ahead (not under concurrency or rate limits, which choose
    # jobs by their own rules).
    if request.ahead and len(claimed) == slots and not has_limits(request):
        ahead = _claim_ready(db, request, request.ahead, now, walks, last_attempts=False)
        claimed.extend(ahead)
        claimed.sort(key=lambda r: (-r.priority, r.seq))
    return claimed


# A job's attempts under this claim: the claimer's definition applies unless retries
# were given at enqueue. Corrupt options must not fail the whole claim (the runner
# sends that job to dead); CASE evaluates in order, so json_extract sees valid JSON.
# The two parameters are ``_task_attempts``: the tasks whose attempts differ from the
# usual, and the usual (every claimed job's task is one of the claimer's).
_MAX_ATTEMPTS = """CASE
                WHEN options IS NOT NULL AND NOT json_valid(options) THEN max_attempts
                WHEN json_extract(options, '$.retries') IS NOT NULL THEN max_attempts
                ELSE coalesce((SELECT value FROM json_each(?) WHERE key = task), ?)
                END"""


def _task_attempts(request: ClaimRequest) -> tuple[str, int]:
    """``_MAX_ATTEMPTS``' parameters: as a JSON object, the claimer's tasks whose attempts
    differ from the most common number, and that number. The object is read through for
    each claimed job, so it holds only the exceptions (with every task in it, a claim
    of 100 by a worker of 200 tasks took three times one of a single task's)."""
    counts = Counter(limits.max_attempts for limits in request.tasks.values())
    usual = counts.most_common(1)[0][0] if counts else 1
    others = {n: t.max_attempts for n, t in request.tasks.items() if t.max_attempts != usual}
    return json.dumps(others), usual


def _claim_ready(
    db: sqlite3.Connection,
    request: ClaimRequest,
    limit: int,
    now: float,
    walks: Walks | None,
    *,
    last_attempts: bool,
) -> Claimed:
    """Claim up to ``limit`` ready jobs in claim order; without ``last_attempts``,
    leave those about to start their last attempt where they are."""
    if limit <= 0:
        return Claimed()
    attempts = _task_attempts(request)
    params: list[Any] = [now, now + request.lease, request.worker, *attempts]
    next_token_at, unkeyed, partial = None, False, False
    if has_limits(request):  # concurrency, rate limits: chosen in Python, same transaction
        admission = choose(db, replace(request, limit=limit), now, walks)
        next_token_at, unkeyed = admission.wake_at, admission.unkeyed
        partial = walks is not None and walks.more
        if not admission.chosen:
            return Claimed(next_token_at=next_token_at, unkeyed=unkeyed, partial=partial)
        pick = "SELECT value FROM json_each(?)"
        params.append(json.dumps(admission.chosen))
    elif request.queues is None:  # the fast path: one statement
        params.extend((json.dumps(list(request.tasks)), limit))
        pick = _PICK_READY
    else:  # each queue's first ``limit``, then the first ``limit`` of them all
        picks: list[str] = []
        for queue in sorted(set(request.queues)):
            picks.append(_PICK_QUEUE)
            params.extend((queue, json.dumps(list(request.tasks)), limit))
        if not picks:  # queues=[]: none
            picks.append(_PICK_NONE)
        params.append(limit)
        pick = _PICK_QUEUES.format(picks=" UNION ALL ".join(picks))
    spare = ""
    if not last_attempts:  # the next ``limit`` in order, less those on their last attempt
        spare = f"AND attempts + 1 < {_MAX_ATTEMPTS}"
        params.extend(attempts)
    rows = db.execute(
        f"""
        UPDATE asyncjobs_jobs SET
            status = 'running', attempts = attempts + 1, started_at = ?, lease_until = ?,
            worker = ?, progress = NULL, progress_message = NULL,
            -- never below this attempt (a manual retry allows one more)
            max_attempts = max(attempts + 1, {_MAX_ATTEMPTS})
        WHERE seq IN ({pick}) AND status = 'queued' {spare}
        RETURNING {_SELECT}
        """,  # noqa: S608 - only constants are interpolated
        params,
    ).fetchall()
    claimed = Claimed(sorted((_row(r) for r in rows), key=lambda r: (-r.priority, r.seq)))
    claimed.next_token_at, claimed.unkeyed, claimed.partial = next_token_at, unkeyed, partial
    return claimed


# INDEXED BY: without ANALYZE statistics the planner prefers the (status, seq) index
# and sorts every queued row on each claim (38 ms per claim with a 100k backlog); the
# partial ready index yields them already in claim order (0.04 ms). It leaves out the
# jobs behind another of their group (migration 0012), so a group's backlog is not read;
# the group's first job is still checked (a later one of its group may run).
_READY_HEAD = """j.status = 'queued' AND j.behind IS NULL
              AND j.task IN (SELECT value FROM json_each(?))
              AND (j.group_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM asyncjobs_jobs AS g
                    WHERE g.group_key = j.group_key
                      AND g.status IN ('scheduled', 'queued', 'running')
                      AND (g.seq < j.seq OR g.status = 'running')))"""
_PICK_READY = f"""
            SELECT j.seq FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready
            WHERE {_READY_HEAD}
            ORDER BY j.priority DESC, j.seq
            LIMIT ?"""  # noqa: S608 - constants
# A claim from some queues: the first jobs of each queue in claim order (_PICK_QUEUE, a
# walk of asyncjobs_jobs_ready_queue each, migration 0014), then the first of them all.
# One walk of asyncjobs_jobs_ready testing the queue read every other queue's jobs
# before them (1,400,000 VM steps a claim of 100 behind 100,000 in another queue).
_PICK_QUEUE = f"""SELECT * FROM (
            SELECT j.seq, j.priority FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready_queue
            WHERE j.queue = ? AND {_READY_HEAD}
            ORDER BY j.priority DESC, j.seq LIMIT ?)"""  # noqa: S608 - constants
_PICK_NONE = "SELECT NULL AS seq, NULL AS priority WHERE false"
_PICK_QUEUES = """
            SELECT seq FROM ({picks}) ORDER BY priority DESC, seq LIMIT ?"""


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


def _finish_and_claim(
    db: sqlite3.Connection,
    outcomes: Sequence[Outcome],
    request: ClaimRequest,
    now: float,
    walks: Walks | None = None,
    version: int | None = None,
) -> tuple[list[str], Claimed]:
    applied = _finish(db, outcomes, now)
    return applied, _claim(db, request, now, walks, version)


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
