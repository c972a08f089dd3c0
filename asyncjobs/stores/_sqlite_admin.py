"""The SQL of ``SQLiteStore``'s operator and maintenance calls: lease recovery, a
manual retry, the operations snapshot (see ``asyncjobs/_stats.py``), worker records,
pruning and the store's metadata.

Each function runs in the store's connection thread on the connection it is given:
``_snapshot`` inside one read transaction (``_read``), the others inside the write
transaction the store opened. Cancelling lives in ``_sqlite_finish``, with the chain
and batch releases it calls and that call it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence

from asyncjobs.stores._dependents import RESULT_FLAG, result_gone, wants
from asyncjobs.stores._ops_rows import FinishedSample, OpsSnapshot, StuckJob, WorkerBeat, WorkerRow
from asyncjobs.stores._outcomes import OutcomeKind, Recovered
from asyncjobs.stores._sqlite_finish import _batch_counts, _release_dependents, tally_deleted
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGE_FOLLOWER, RETRYABLE

_PENDING = ("scheduled", "queued")

_REQUEUE = (
    "status = 'queued', run_at = ?, finished_at = NULL, lease_until = NULL, worker = NULL, "
    "cancel_requested_at = NULL, max_attempts = max(max_attempts, attempts + 1)"
)
"""A manual retry: queued now, with one more attempt than it had (``run_at`` first), and
no longer asked to stop if it was cancelled while running."""


def _recover(db: sqlite3.Connection, now: float) -> list[Recovered]:
    rows = db.execute(
        """
        UPDATE asyncjobs_jobs SET
            status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
            error = CASE WHEN cancel_requested_at IS NOT NULL
                THEN 'cancelled while running (its worker stopped heartbeating)'
                WHEN attempts >= max_attempts
                THEN 'lease expired: the worker running attempt ' || attempts ||
                     ' stopped heartbeating (crashed or killed) and no attempts are left'
                ELSE error END,
            finished_at = CASE WHEN cancel_requested_at IS NOT NULL OR attempts >= max_attempts
                THEN ? ELSE NULL END,
            lease_until = NULL, worker = NULL
        WHERE status = 'running' AND lease_until < ?
        RETURNING id, task, attempts, status, chain_next, batch_id
        """,
        (now, now),
    ).fetchall()
    recovered = []
    for job_id, task, attempts, status, chain_next, batch_id in rows:
        if status != "queued":
            _release_dependents(db, status, chain_next, batch_id, now)
        recovered.append(Recovered(id=job_id, task=task, attempts=attempts, status=status))
    return recovered


ADMIN_BATCH = 5000
"""Rows one transaction of ``purge`` or ``retry_dead`` takes at most: a writer in another
process, or this one's heartbeat, waits for one batch, not for the whole operation."""

_RESUME_REST = """
    WITH RECURSIVE rest(id) AS (
        SELECT chain_next FROM asyncjobs_jobs WHERE id IN (SELECT value FROM json_each(?))
        UNION ALL
        SELECT j.chain_next FROM asyncjobs_jobs AS j JOIN rest ON j.id = rest.id
        WHERE j.status = 'cancelled' AND j.attempts = 0
    )
    UPDATE asyncjobs_jobs SET status = 'waiting', finished_at = NULL, cancel_requested_at = NULL
    WHERE id IN (SELECT id FROM rest) AND status = 'cancelled' AND attempts = 0
"""
"""A manual retry of chain members (a JSON list of ids) takes back the members after
each that were cancelled before they ran, when it ended dead or cancelled: they wait
again, each for the one before it, so the chain goes on once the retried one succeeds.
The walk stops at the first member that is not one of them."""

_PICK_DEAD = (
    f"SELECT id, seq, attempts FROM asyncjobs_jobs WHERE {DEAD_AS_READ} "  # noqa: S608 - constant
    "AND (? IS NULL OR queue = ?) AND (? IS NULL OR task = ?) AND seq > ? ORDER BY seq LIMIT ?"
)
_REQUEUE_IDS = (
    f"UPDATE asyncjobs_jobs SET {_REQUEUE} "  # noqa: S608 - constant
    "WHERE id IN (SELECT value FROM json_each(?))"
)

_ON_COMPLETES = (
    "SELECT value FROM json_each(?) WHERE EXISTS (SELECT 1 FROM asyncjobs_jobs "
    "WHERE batch_id = value) OR EXISTS (SELECT 1 FROM asyncjobs_batch_deleted "
    "WHERE batch_id = value)"
)
"""The batches' on_complete jobs among a JSON list of ids (their members' batch_id)."""


def _requeue_dead_batch(
    db: sqlite3.Connection, queue: str | None, task: str | None, after: int, now: float
) -> tuple[int, int | None]:
    """Requeue the next ``ADMIN_BATCH`` jobs that read as dead after seq ``after``; return
    how many, and the seq to go on after (None: that was the last batch). One that never
    ran (a status this version does not know, on a job that was waiting) is retried as
    ``_retry`` does, so it waits again for what it waited on (one ``_retry`` refuses is
    left as it is: ``jobs.retry(id)`` says why); a batch's on_complete that ran is
    released again as ``_wait_again`` says."""
    rows = db.execute(_PICK_DEAD, (queue, queue, task, task, after, ADMIN_BATCH)).fetchall()
    ran = [job_id for job_id, _, attempts in rows if attempts]
    if ran:
        db.execute(_REQUEUE_IDS, (now, json.dumps(ran)))
        db.execute(_RESUME_REST, (json.dumps(ran),))
        for (on_complete,) in db.execute(_ON_COMPLETES, (json.dumps(ran),)).fetchall():
            _wait_again(db, on_complete, None, now)
    requeued = len(ran) + sum(
        _retry(db, job_id, now, or_skip=True) for job_id, _, attempts in rows if not attempts
    )
    return requeued, rows[-1][1] if len(rows) == ADMIN_BATCH else None


_RETRYABLE_ROW = f"SELECT attempts, options FROM asyncjobs_jobs WHERE id = ? AND {RETRYABLE}"  # noqa: S608
_REQUEUE_ONE = f"UPDATE asyncjobs_jobs SET {_REQUEUE} WHERE id = ?"  # noqa: S608 - constant
PREDECESSOR = "SELECT status, result FROM asyncjobs_jobs WHERE chain_next = ?"
"""The chain member before a job (index asyncjobs_jobs_chain_next, migration 0011)."""


def _retry(db: sqlite3.Connection, job_id: str, now: float, *, or_skip: bool = False) -> bool:
    """A manual retry of one job (``RETRYABLE``); False if it is not one. A job that never
    ran, or a batch's on_complete, waits again for what it waited on (``_wait_again``);
    the chain members after it that its end cancelled wait again too (``_RESUME_REST``).
    A chain member that takes the previous result and never got it, the member before
    it gone, is refused: ``RetryRefused`` (``result_gone``), or False with ``or_skip``
    (``retry_dead``)."""
    row = db.execute(_RETRYABLE_ROW, (job_id,)).fetchone()
    if row is None:
        return False
    attempts, options = row
    predecessor = None
    if attempts == 0:  # never ran: it may have been cancelled while it waited
        predecessor = db.execute(PREDECESSOR, (job_id,)).fetchone()
        if predecessor is None and wants(options, RESULT_FLAG):
            if or_skip:
                return False
            raise result_gone(job_id)
    db.execute(_REQUEUE_ONE, (now, job_id))
    _wait_again(db, job_id, predecessor, now)
    db.execute(_RESUME_REST, (json.dumps([job_id]),))
    return True


def _wait_again(
    db: sqlite3.Connection, job_id: str, predecessor: tuple[str, str | None] | None, now: float
) -> None:
    """A job retried by hand that never ran, cancelled while it waited on others: a chain
    member whose ``predecessor`` (status, result) is still stored, or a batch's
    on_complete, waits again and is released as it would have been (at once if what it
    waited on is done: the chain member with its predecessor's result, the on_complete
    with the counts). A chain member runs only after its predecessor succeeded: behind
    a dead or cancelled one it waits until that one is retried and succeeds. One whose
    predecessor is gone (pruned or purged) has nothing to wait for and runs on its own
    (``_retry`` refuses it if it takes the previous result).

    An on_complete that ran (``predecessor`` None) is released so too: the counts it
    ran with may be stale, a member retried by hand since having succeeded, and one
    still under way is waited for."""
    members = sum(n for _, n in _batch_counts(db, job_id))  # deleted ones too
    status, result = predecessor or (None, None)
    if predecessor is not None or members:
        db.execute("UPDATE asyncjobs_jobs SET status = 'waiting' WHERE id = ?", (job_id,))
    if status == "succeeded":
        _release_dependents(db, OutcomeKind.SUCCEEDED, job_id, None, now, result)
    if members:
        _release_dependents(db, OutcomeKind.SUCCEEDED, None, job_id, now)


# The statuses of finished jobs that the windows of ``stats()`` count, each a range of
# the finished index.
_FINISHED = "'succeeded', 'dead', 'cancelled'"
# The newest succeeded and dead jobs: the finished index is by (status, finished_at),
# so each status is walked from its newest on its own, and the two samples merged (a
# sort of theirs alone); one walk of both statuses sorted every succeeded and dead job.
_SAMPLE = (
    "SELECT * FROM (SELECT queue, task, status, max(run_at, enqueued_at), started_at, "
    "finished_at, seq FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_finished "
    "WHERE status = '{status}' AND finished_at IS NOT NULL "
    "ORDER BY finished_at DESC, seq DESC LIMIT ?)"
)
_SAMPLES = (
    f"{_SAMPLE.format(status='succeeded')} UNION ALL {_SAMPLE.format(status='dead')} "
    "ORDER BY finished_at DESC, seq DESC LIMIT ?"
)


def _snapshot(
    db: sqlite3.Connection, now: float, windows: Sequence[float], sample: int, since: float
) -> OpsSnapshot:
    # Every status from the (status, queue, task) index alone, without table rows.
    counts: dict[tuple[str, str, str], int] = {}
    for status, queue, task, n in db.execute(
        "SELECT status, queue, task, count(*) FROM asyncjobs_jobs "
        "INDEXED BY asyncjobs_jobs_counts GROUP BY status, queue, task"
    ):
        if status not in _PENDING:
            counts[(queue, task, status)] = n
    # Pending jobs are split by run_at as users see them (a store updates that lazily).
    # A queued job waits from when it was due, or enqueued if later (a run_at in the past).
    oldest_due: dict[tuple[str, str], float] = {}
    for queue, task, scheduled, queued, oldest in db.execute(
        "SELECT queue, task, sum(run_at > ?), sum(run_at <= ?), "
        "min(CASE WHEN run_at <= ? THEN max(run_at, enqueued_at) END) FROM asyncjobs_jobs "
        "WHERE status IN ('scheduled', 'queued') GROUP BY queue, task",
        (now, now, now),
    ):
        if scheduled:
            counts[(queue, task, "scheduled")] = scheduled
        if queued:
            counts[(queue, task, "queued")] = queued
        if oldest is not None:
            oldest_due[(queue, task)] = float(oldest)
    finished: dict[tuple[str, str, str], list[int]] = {}
    if windows:
        since_each = [now - w for w in windows]
        sums = ", ".join("sum(finished_at >= ?)" for _ in windows)
        rows = db.execute(
            f"SELECT queue, task, status, {sums} FROM asyncjobs_jobs "  # noqa: S608 - constant
            f"INDEXED BY asyncjobs_jobs_finished WHERE status IN ({_FINISHED}) "
            "AND finished_at >= ? GROUP BY queue, task, status",
            (*since_each, min(since_each)),
        )
        for queue, task, status, *per_window in rows:
            finished[(queue, task, status)] = [int(n or 0) for n in per_window]
    samples = [
        FinishedSample(queue=q, task=t, status=st, run_at=r, started_at=s, finished_at=f)
        for q, t, st, r, s, f, _ in db.execute(_SAMPLES, (sample, sample, sample))
    ]
    stuck = [
        StuckJob(id=i, queue=q, task=t, worker=w, attempts=a, lease_until=lu)
        for i, q, t, w, a, lu in db.execute(
            "SELECT id, queue, task, worker, attempts, lease_until FROM asyncjobs_jobs "
            "WHERE status = 'running' AND lease_until < ? ORDER BY lease_until, seq LIMIT 1000",
            (now,),
        )
    ]
    stuck_counts = {
        (queue, task): n
        for queue, task, n in db.execute(
            "SELECT queue, task, count(*) FROM asyncjobs_jobs "
            "WHERE status = 'running' AND lease_until < ? GROUP BY queue, task",
            (now,),
        )
    }
    workers = [
        WorkerRow.from_columns(row)
        for row in db.execute(
            "SELECT id, host, pid, started_at, last_seen_at, stopped_at, running, concurrency, "
            "queues, visibility_timeout FROM asyncjobs_workers "
            "WHERE last_seen_at >= ? ORDER BY started_at, id",
            (since,),
        )
    ]
    return OpsSnapshot(
        counts=counts,
        oldest_due=oldest_due,
        finished=finished,
        samples=samples,
        stuck=stuck,
        stuck_counts=stuck_counts,
        workers=workers,
    )


def _record_worker(db: sqlite3.Connection, beat: WorkerBeat, now: float) -> None:
    db.execute(
        "INSERT INTO asyncjobs_workers (id, host, pid, started_at, last_seen_at, stopped_at, "
        "running, concurrency, queues, visibility_timeout) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at, "
        "last_seen_at = excluded.last_seen_at, "
        "stopped_at = excluded.stopped_at, running = excluded.running, "
        "visibility_timeout = excluded.visibility_timeout",
        beat.columns(now),
    )


# The finished index is by (status, finished_at): each status is a range of its own,
# walked from the oldest up to its retention. By finished_at alone, a prune of the
# succeeded and cancelled jobs walked past every dead one still kept (for longer).
_PRUNE = (
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT seq FROM asyncjobs_jobs AS j "
    "INDEXED BY asyncjobs_jobs_finished WHERE status IN ({statuses}) AND finished_at < ? "
    # A batch's on_complete that still waits counts its members when the last ends.
    "AND (batch_id IS NULL OR NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS b "
    "WHERE b.id = j.batch_id AND b.status = 'waiting')) "
    # A chain member retried by hand waits for this one to be retried and succeed.
    "AND (chain_next IS NULL OR NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS c "
    "WHERE c.id = j.chain_next AND c.status = 'waiting')) "
    # A chain member cancelled before it ran, behind one that did not succeed, goes
    # with that one (on its retention): a retry of it takes this one back (_RESUME_REST).
    # A scalar subquery, a seek in asyncjobs_jobs_chain_next per such row: as NOT EXISTS,
    # PostgreSQL may hash the whole table's chain members once per prune instead.
    "AND (status <> 'cancelled' OR attempts > 0 OR coalesce((SELECT p.status "
    "FROM asyncjobs_jobs AS p WHERE p.chain_next = j.id LIMIT 1), 'succeeded') = 'succeeded') "
    "LIMIT ?) "
    "RETURNING batch_id, status, finished_at, chain_next"
)
_PRUNE_FINISHED = _PRUNE.format(statuses="'succeeded', 'cancelled'")
# The members after the pruned ones (a JSON list of their chain_next) that were
# cancelled before they ran, each waiting for the one before it to go (above), go with
# it in the same prune, a whole run of them at once, by their ids: else a chain of N
# cancelled members took N prunes. The walk stops where _PRUNE would keep one (not yet
# past retention, or one retried by hand waits for it), as the run after it then must.
# CROSS JOIN: SQLite keeps that order, so the walk drives a lookup by id per member;
# as a plain join, without statistics (as stores run), it read every cancelled job
# through asyncjobs_jobs_status instead.
_FOLLOWER = (
    f"{PURGE_FOLLOWER} AND j.finished_at < ? "  # noqa: S608 - constants
    "AND (j.chain_next IS NULL OR NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS c "
    "WHERE c.id = j.chain_next AND c.status = 'waiting'))"
)
_PRUNE_FOLLOWERS = (
    "WITH RECURSIVE rest(id) AS (SELECT value FROM json_each(?) UNION ALL "  # noqa: S608 - constant
    "SELECT j.chain_next FROM rest CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id "
    f"WHERE j.chain_next IS NOT NULL AND {_FOLLOWER}) "
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT j.seq FROM rest "
    f"CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id WHERE {_FOLLOWER} LIMIT ?) "
    "RETURNING batch_id, status, finished_at, chain_next"
)
# The tallies of deleted batch members (``tally_deleted``) go with the last job of
# their batch, once they are as old as the members retention prunes. Those past the
# later of the two times are read in asyncjobs_batch_deleted_age (finished_at),
# migration 0016, a seek or two each: the recent ones are not read.
_PRUNE_TALLIES = (
    "DELETE FROM asyncjobs_batch_deleted AS d WHERE finished_at < max(?, ?) "
    "AND finished_at < CASE WHEN status = 'dead' THEN ? ELSE ? END "
    "AND NOT EXISTS (SELECT 1 FROM asyncjobs_jobs WHERE batch_id = d.batch_id) "
    "AND NOT EXISTS (SELECT 1 FROM asyncjobs_jobs WHERE id = d.batch_id)"
)
_PRUNE_DEAD = _PRUNE.format(statuses="'dead'")


def _prune(
    db: sqlite3.Connection, finished_before: float, dead_before: float, workers_before: float,
    limit: int,
) -> int:  # fmt: skip
    deleted = db.execute(_PRUNE_FINISHED, (finished_before, limit)).fetchall()
    if len(deleted) < limit:
        deleted += db.execute(_PRUNE_DEAD, (dead_before, limit - len(deleted))).fetchall()
    followers = [chain_next for *_, chain_next in deleted if chain_next is not None]
    if followers and len(deleted) < limit:
        params = (json.dumps(followers), finished_before, finished_before, limit - len(deleted))
        deleted += db.execute(_PRUNE_FOLLOWERS, params).fetchall()
    tally_deleted(db, [(batch_id, status, at) for batch_id, status, at, _ in deleted])
    # The tallies once a prune, in its last batch (``in_batches`` stops at the first
    # that deletes fewer than ``limit``), not once a batch.
    if len(deleted) < limit:
        db.execute(_PRUNE_TALLIES, (dead_before, finished_before) * 2)
    db.execute("DELETE FROM asyncjobs_workers WHERE last_seen_at < ?", (workers_before,))
    return len(deleted)


# The buckets of the name counted before the time, read in asyncjobs_rate_buckets_age
# (name, updated_at), migration 0016: those that have not refilled are not read.
_PRUNE_BUCKETS = (
    "DELETE FROM asyncjobs_rate_buckets WHERE (name, key) IN (SELECT name, key "
    "FROM asyncjobs_rate_buckets WHERE name = ? AND updated_at < ? LIMIT ?)"
)


# The names that have buckets, ascending, one seek each in the primary key (name, key):
# a keyed limiter's buckets are stepped over, not read.
BUCKET_NAMES = (
    "WITH RECURSIVE names(name) AS (SELECT min(name) FROM asyncjobs_rate_buckets "
    "UNION ALL SELECT (SELECT min(name) FROM asyncjobs_rate_buckets WHERE name > names.name) "
    "FROM names WHERE names.name IS NOT NULL) SELECT name FROM names WHERE name IS NOT NULL"
)


def _prune_buckets(
    db: sqlite3.Connection, full_before: Mapping[str, float], others_before: float | None,
    limit: int,
) -> int:  # fmt: skip
    if others_before is not None:
        stored = [name for (name,) in db.execute(BUCKET_NAMES)]
        full_before = {name: full_before.get(name, others_before) for name in stored}
    deleted = 0
    for name, before in full_before.items():
        if deleted >= limit:
            break
        deleted += db.execute(_PRUNE_BUCKETS, (name, before, limit - deleted)).rowcount
    return deleted


META_VALUE = "SELECT value FROM asyncjobs_meta WHERE key = ?"
"""A stored metadata value: read first, so a store whose file turned read-only still
serves the ones it has (the dashboard's CSRF key, on every page). A schedule's last
slot is read with it alone, on the reading connection: each due tick reads it."""

_RECORD_SLOT = (
    "INSERT INTO asyncjobs_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
    "SET value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)"
)


def _record_slot(db: sqlite3.Connection, key: str, slot: int) -> int:
    """Record ``slot`` (a later one recorded is kept); return the one recorded now."""
    db.execute(_RECORD_SLOT, (key, str(slot)))
    (value,) = db.execute(META_VALUE, (key,)).fetchone()
    return int(value)


def _meta(db: sqlite3.Connection, key: str, default: str) -> str:
    db.execute(
        "INSERT INTO asyncjobs_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        (key, default),
    )
    (value,) = db.execute(META_VALUE, (key,)).fetchone()
    return str(value)
