"""The SQL of ``PostgresStore``'s operator and maintenance calls: lease recovery, a
manual retry, the operations snapshot (see ``asyncjobs/_stats.py``), worker records, pruning and the
store's metadata.

Each function runs on the asyncpg connection it is given: ``snapshot`` inside the
store's REPEATABLE READ transaction, ``recover`` and ``prune`` inside the transaction
the store opened. Lease recovery locks rows with ``FOR UPDATE SKIP LOCKED``, as claims
do. Cancelling lives in ``_postgres_release``, with the chain and batch releases it
calls and that call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from asyncjobs.stores._dependents import RESULT_FLAG, result_gone, wants
from asyncjobs.stores._postgres_release import (
    lock_callbacks,
    release_dependents,
    tally_deleted,
    wait_again,
)
from asyncjobs.stores._postgres_sql import notify
from asyncjobs.stores._protocol import (
    FinishedSample,
    OpsSnapshot,
    Recovered,
    StuckJob,
    WorkerBeat,
    WorkerRow,
)
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGE_FOLLOWER, RETRYABLE

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection


async def recover(conn: Connection, now: float) -> list[Recovered]:
    records = await conn.fetch(
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
                THEN $1 ELSE NULL END,
            lease_until = NULL, worker = NULL
        WHERE seq IN (SELECT seq FROM asyncjobs_jobs
                      WHERE status = 'running' AND lease_until < $1 FOR UPDATE SKIP LOCKED)
        RETURNING id, task, attempts, status, chain_next, batch_id
        """,
        now,
    )
    recovered = []
    await lock_callbacks(conn, [r["batch_id"] for r in records if r["status"] != "queued"])
    for r in records:
        status = r["status"]
        if status != "queued":
            await release_dependents(conn, status, r["chain_next"], r["batch_id"], now)
        recovered.append(
            Recovered(id=r["id"], task=r["task"], attempts=r["attempts"], status=status)
        )
    if recovered:  # requeued, or ended: its group and its concurrency slot are free
        await notify(conn)
    return recovered


# -- operations (stats, dashboard, pruning) ------------------------------------------


_REQUEUE = (
    "status = 'queued', run_at = $1, finished_at = NULL, lease_until = NULL, worker = NULL, "
    "cancel_requested_at = NULL, max_attempts = greatest(max_attempts, attempts + 1)"
)
"""A manual retry: queued now, with one more attempt than it had (``run_at`` is $1), and
no longer asked to stop if it was cancelled while running."""
_RESUME_REST = """
    WITH RECURSIVE rest(id) AS (
        SELECT chain_next FROM asyncjobs_jobs WHERE id = ANY($1::text[])
        UNION ALL
        SELECT j.chain_next FROM asyncjobs_jobs AS j JOIN rest ON j.id = rest.id
        WHERE j.status = 'cancelled' AND j.attempts = 0
    )
    UPDATE asyncjobs_jobs SET status = 'waiting', finished_at = NULL, cancel_requested_at = NULL
    WHERE id IN (SELECT id FROM rest) AND status = 'cancelled' AND attempts = 0
"""
"""As ``_RESUME_REST`` in ``_sqlite_admin.py``: the chain members after the retried ones
($1) that were cancelled before they ran wait again. Run after the retried rows are
updated, so it locks a chain in its order, as a finish and a deletion do."""
PREDECESSOR = "SELECT status, result FROM asyncjobs_jobs WHERE chain_next = $1 FOR UPDATE"
"""The chain member before a job, locked (index asyncjobs_jobs_chain_next, migration 0012)."""


async def retry(conn: Connection, job_id: str, now: float, *, or_skip: bool = False) -> bool:
    """A manual retry of one job (``RETRYABLE``), in the store's transaction; False if it
    is not one. As ``_retry`` in ``_sqlite_admin.py``: one that never ran, or a batch's
    on_complete, waits again (``wait_again``), and so do the chain members after it that
    its end cancelled (``_RESUME_REST``); a chain member that takes the previous result
    and never got it, the member before it gone, is refused (``RetryRefused``, or False
    with ``or_skip``)."""
    row = await conn.fetchrow(
        f"SELECT attempts, options FROM asyncjobs_jobs WHERE id = $1 AND {RETRYABLE}",  # noqa: S608
        job_id,
    )
    if row is None:
        return False
    predecessor = None
    if row["attempts"] == 0:  # it may wait again for the chain member before it
        # That one first, as its finish and its deletion lock it before this job:
        # read unlocked, it could be finishing or deleted unseen, and nothing
        # would release this job from waiting.
        predecessor = await conn.fetchrow(PREDECESSOR, job_id)
        if predecessor is None and wants(row["options"], RESULT_FLAG):
            if or_skip:
                return False
            raise result_gone(job_id)
    requeued = await conn.fetchrow(
        f"UPDATE asyncjobs_jobs SET {_REQUEUE} "  # noqa: S608 - constant
        f"WHERE id = $2 AND {RETRYABLE} RETURNING attempts",
        now,
        job_id,
    )
    if requeued is None:
        return False
    # Never ran, it may have been cancelled while it waited; an on_complete that ran
    # takes its batch's counts again.
    await wait_again(conn, job_id, predecessor, now)
    await conn.execute(_RESUME_REST, [job_id])
    return True


_ON_COMPLETE = (
    "(EXISTS (SELECT 1 FROM asyncjobs_jobs AS m WHERE m.batch_id = asyncjobs_jobs.id) "
    "OR EXISTS (SELECT 1 FROM asyncjobs_batch_deleted AS d WHERE d.batch_id = asyncjobs_jobs.id))"
)
"""Whether the updated job is a batch's on_complete (its members' batch_id)."""


async def retry_dead(conn: Connection, queue: str | None, task: str | None, now: float) -> int:
    """Retry every job that reads as dead (of that queue/task); return how many. One that
    never ran (a status this version does not know, on a job that was waiting) is retried
    as ``retry`` does, so it waits again for what it waited on (one ``retry`` refuses is
    left as it is: ``jobs.retry(id)`` says why); the chain members after each that its
    end cancelled wait again too, and a batch's on_complete that ran is released
    again (``wait_again``)."""
    never_ran = await conn.fetch(
        f"SELECT id FROM asyncjobs_jobs WHERE {DEAD_AS_READ} AND attempts = 0 "  # noqa: S608
        "AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR task = $2) ORDER BY seq",
        queue,
        task,
    )
    count = 0
    for record in never_ran:
        count += await retry(conn, record["id"], now, or_skip=True)
    ran = await conn.fetch(
        f"UPDATE asyncjobs_jobs SET {_REQUEUE} WHERE {DEAD_AS_READ} AND attempts > 0 "  # noqa: S608
        "AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR task = $3) "
        "RETURNING id, chain_next IS NOT NULL AS chained, "
        f"{_ON_COMPLETE} AS on_complete",
        now,
        queue,
        task,
    )
    chained = [r["id"] for r in ran if r["chained"]]
    if chained:
        await conn.execute(_RESUME_REST, chained)
    for r in ran:
        if r["on_complete"]:
            await wait_again(conn, r["id"], None, now)
    return count + len(ran)


# The jobs of each status that ``stats()`` counts, finished since each of the windows'
# starts ($1), the earliest $2: each status is a range of asyncjobs_jobs_finished
# (status, finished_at), read from $2 on.
_WINDOWS = (
    "SELECT queue, task, status, array_agg(n ORDER BY i) AS per_window FROM ("
    "  SELECT queue, task, status, w.i, count(*) FILTER (WHERE finished_at >= w.since) AS n"
    "  FROM asyncjobs_jobs CROSS JOIN unnest($1::float8[]) WITH ORDINALITY AS w(since, i)"
    "  WHERE status IN ('succeeded', 'dead', 'cancelled') AND finished_at >= $2"
    "  GROUP BY queue, task, status, w.i"
    ") AS c GROUP BY queue, task, status"
)
# The newest succeeded and dead jobs: each status is read from its newest in the
# finished index on its own and the two merged; as one IN of both, PostgreSQL could
# not read them in order and sorted every succeeded and dead job.
_SAMPLE = (
    "(SELECT queue, task, status, greatest(run_at, enqueued_at) AS run_at, started_at, "
    "finished_at, seq FROM asyncjobs_jobs WHERE status = '{status}' "
    "AND finished_at IS NOT NULL ORDER BY finished_at DESC, seq DESC LIMIT $1)"
)
_SAMPLES = (
    "SELECT queue, task, status, run_at, started_at, finished_at FROM ("  # noqa: S608 - constants
    f"{_SAMPLE.format(status='succeeded')} UNION ALL {_SAMPLE.format(status='dead')}"
    ") AS s ORDER BY finished_at DESC, seq DESC LIMIT $1"
)


async def snapshot(
    conn: Connection, now: float, windows: Sequence[float], sample: int, since: float
) -> OpsSnapshot:
    """What ``jobs.stats()`` needs; run in one REPEATABLE READ transaction (one state)."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in await conn.fetch(
        "SELECT status, queue, task, count(*) AS n FROM asyncjobs_jobs "
        "WHERE status NOT IN ('scheduled', 'queued') GROUP BY status, queue, task"
    ):
        counts[(r["queue"], r["task"], r["status"])] = r["n"]
    oldest_due: dict[tuple[str, str], float] = {}
    for r in await conn.fetch(
        "SELECT queue, task, count(*) FILTER (WHERE run_at > $1) AS scheduled, "
        "count(*) FILTER (WHERE run_at <= $1) AS queued, "
        "min(greatest(run_at, enqueued_at)) FILTER (WHERE run_at <= $1) AS oldest "
        "FROM asyncjobs_jobs "
        "WHERE status IN ('scheduled', 'queued') GROUP BY queue, task",
        now,
    ):
        key = (r["queue"], r["task"])
        if r["scheduled"]:
            counts[(*key, "scheduled")] = r["scheduled"]
        if r["queued"]:
            counts[(*key, "queued")] = r["queued"]
        if r["oldest"] is not None:
            oldest_due[key] = float(r["oldest"])
    finished: dict[tuple[str, str, str], list[int]] = {}
    if windows:
        since_each = [now - w for w in windows]
        for r in await conn.fetch(_WINDOWS, since_each, min(since_each)):
            finished[(r["queue"], r["task"], r["status"])] = [int(n) for n in r["per_window"]]
    # Each query selects exactly the fields of its dataclass, by name.
    samples = [FinishedSample(**r) for r in await conn.fetch(_SAMPLES, sample)]
    stuck = [
        StuckJob(**r)
        for r in await conn.fetch(
            "SELECT id, queue, task, worker, attempts, lease_until FROM asyncjobs_jobs "
            "WHERE status = 'running' AND lease_until < $1 ORDER BY lease_until, seq LIMIT 1000",
            now,
        )
    ]
    stuck_counts = {
        (r["queue"], r["task"]): r["n"]
        for r in await conn.fetch(
            "SELECT queue, task, count(*) AS n FROM asyncjobs_jobs "
            "WHERE status = 'running' AND lease_until < $1 GROUP BY queue, task",
            now,
        )
    }
    workers = [
        WorkerRow.from_columns(row)
        for row in await conn.fetch(
            "SELECT id, host, pid, started_at, last_seen_at, stopped_at, running, concurrency, "
            "queues, visibility_timeout FROM asyncjobs_workers "
            "WHERE last_seen_at >= $1 ORDER BY started_at, id",
            since,
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


async def record_worker(conn: Connection, beat: WorkerBeat, now: float) -> None:
    await conn.execute(
        "INSERT INTO asyncjobs_workers (id, host, pid, started_at, last_seen_at, stopped_at, "
        "running, concurrency, queues, visibility_timeout) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
        "ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at, "
        "last_seen_at = excluded.last_seen_at, "
        "stopped_at = excluded.stopped_at, running = excluded.running, "
        "visibility_timeout = excluded.visibility_timeout",
        *beat.columns(now),
    )


# The batch is the oldest finished jobs of one status, read from asyncjobs_jobs_finished
# (status, finished_at) in order up to the limit: each status is a range of its own,
# walked up to its own retention. By finished_at alone, a prune of succeeded jobs
# walked past every dead one still kept (for longer), and an IN of two statuses could
# not be read in order: each status is pruned in turn. The DELETE takes the batch's
# seqs as an array, a seek each: as IN (subquery), once analysed, it hashed them
# against a scan of the whole table.
_PRUNE = (
    "DELETE FROM asyncjobs_jobs WHERE seq = ANY(ARRAY(SELECT seq FROM asyncjobs_jobs AS j "
    "WHERE status = '{status}' AND finished_at < $1 "
    # Each rule below is a scalar subquery, an index seek per candidate row: as NOT
    # EXISTS, PostgreSQL read every job it names (every waiting one, every chain member)
    # into a hash once per batch of a prune instead.
    # A batch's on_complete that still waits counts its members when the last ends.
    "AND (batch_id IS NULL OR coalesce((SELECT b.status FROM asyncjobs_jobs AS b "
    "WHERE b.id = j.batch_id), '') <> 'waiting') "
    # A chain member retried by hand waits for this one to be retried and succeed.
    "AND (chain_next IS NULL OR coalesce((SELECT c.status FROM asyncjobs_jobs AS c "
    "WHERE c.id = j.chain_next), '') <> 'waiting') "
    # A chain member cancelled before it ran, behind one that did not succeed, goes
    # with that one (on its retention): a retry of it takes this one back (_RESUME_REST).
    "AND (status <> 'cancelled' OR attempts > 0 OR coalesce((SELECT p.status "
    "FROM asyncjobs_jobs AS p WHERE p.chain_next = j.id LIMIT 1), 'succeeded') = 'succeeded') "
    "ORDER BY finished_at LIMIT $2 "
    # Rows another transaction holds are left to the next prune: one retried by hand
    # meanwhile would be deleted once free (the outer DELETE matches by seq alone),
    # and waiting on rows that a bulk retry or delete locks in another order deadlocked.
    "FOR UPDATE SKIP LOCKED)) RETURNING batch_id, status, finished_at, chain_next"
)
_PRUNE_SUCCEEDED = _PRUNE.format(status="succeeded")
_PRUNE_CANCELLED = _PRUNE.format(status="cancelled")
# As _PRUNE_FOLLOWERS in _sqlite_admin.py: the run of members cancelled before they ran
# after the pruned ones goes with them in the same prune, found by id from their
# chain_next ($1), past retention ($2); those another transaction holds are left.
_FOLLOWER = (
    f"{PURGE_FOLLOWER} AND j.finished_at < $2 "  # noqa: S608 - constants
    "AND (j.chain_next IS NULL OR coalesce((SELECT c.status FROM asyncjobs_jobs AS c "
    "WHERE c.id = j.chain_next), '') <> 'waiting')"
)
# Each member is looked up by id in a LATERAL subquery that the planner cannot flatten
# (OFFSET 0, FOR UPDATE): joined plainly, statistics that counted few cancelled jobs
# had it read every cancelled job past retention and match them against the walk.
_PRUNE_FOLLOWERS = (
    "WITH RECURSIVE rest(id) AS (SELECT unnest($1::text[]) UNION ALL "  # noqa: S608 - constant
    "SELECT f.chain_next FROM rest CROSS JOIN LATERAL (SELECT j.chain_next "
    "FROM asyncjobs_jobs AS j WHERE j.id = rest.id "
    f"AND j.chain_next IS NOT NULL AND {_FOLLOWER} OFFSET 0) AS f) "
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT f.seq FROM rest CROSS JOIN LATERAL "
    "(SELECT j.seq FROM asyncjobs_jobs AS j WHERE j.id = rest.id "
    f"AND {_FOLLOWER} FOR UPDATE SKIP LOCKED) AS f LIMIT $3) "
    "RETURNING batch_id, status, finished_at, chain_next"
)
# The tallies of deleted batch members (``tally_deleted``) go with the last job of
# their batch, once they are as old as the members retention prunes; those another
# transaction holds are left to the next prune. Those past the later of the two times
# are read in asyncjobs_batch_deleted_age (finished_at), migration 0019, and their
# batch's jobs looked up by scalar subqueries, a seek each: as NOT EXISTS, PostgreSQL
# hashed every batch member and every job id against every tally, once per batch of
# a prune. The DELETE takes their row addresses, as _PRUNE_BUCKETS does.
_PRUNE_TALLIES = (
    "DELETE FROM asyncjobs_batch_deleted WHERE ctid = ANY(ARRAY(SELECT ctid "
    "FROM asyncjobs_batch_deleted AS d WHERE finished_at < greatest($1::float8, $2::float8) "
    "AND finished_at < CASE WHEN status = 'dead' THEN $1::float8 ELSE $2::float8 END "
    "AND (SELECT 1 FROM asyncjobs_jobs AS j WHERE j.batch_id = d.batch_id LIMIT 1) IS NULL "
    "AND (SELECT 1 FROM asyncjobs_jobs AS j WHERE j.id = d.batch_id) IS NULL "
    "FOR UPDATE SKIP LOCKED))"
)
_PRUNE_DEAD = _PRUNE.format(status="dead")


async def prune(
    conn: Connection, finished_before: float, dead_before: float, workers_before: float,
    limit: int,
) -> int:  # fmt: skip
    deleted = await conn.fetch(_PRUNE_SUCCEEDED, finished_before, limit)
    if len(deleted) < limit:
        deleted += await conn.fetch(_PRUNE_CANCELLED, finished_before, limit - len(deleted))
    if len(deleted) < limit:
        deleted += await conn.fetch(_PRUNE_DEAD, dead_before, limit - len(deleted))
    followers = [r["chain_next"] for r in deleted if r["chain_next"] is not None]
    if followers and len(deleted) < limit:
        deleted += await conn.fetch(
            _PRUNE_FOLLOWERS, followers, finished_before, limit - len(deleted)
        )
    await tally_deleted(conn, deleted)
    if len(deleted) < limit:  # the last batch of a prune, as in _sqlite_admin's _prune
        await conn.execute(_PRUNE_TALLIES, dead_before, finished_before)
    await conn.execute("DELETE FROM asyncjobs_workers WHERE last_seen_at < $1", workers_before)
    return len(deleted)


# The oldest buckets of the name counted before the time, read in order from
# asyncjobs_rate_buckets_age (name, updated_at), migration 0019, up to the limit: those
# that have not refilled are not read. Unordered, PostgreSQL read a bitmap of every one
# due, or (analysed) the whole table. The DELETE takes the batch's row addresses, a
# seek each, stable while it holds their locks: as IN (subquery), once analysed, it
# hashed them against a scan of the whole table.
_PRUNE_BUCKETS = (
    "DELETE FROM asyncjobs_rate_buckets WHERE ctid = ANY(ARRAY(SELECT ctid "
    "FROM asyncjobs_rate_buckets WHERE name = $1 AND updated_at < $2 "
    "ORDER BY updated_at LIMIT $3 "
    # A bucket a claim holds is in use, not full: left to the next prune.
    "FOR UPDATE SKIP LOCKED)) RETURNING key"
)


# The names that have buckets, ascending, one seek each in the primary key (name, key):
# a keyed limiter's buckets are stepped over, not read.
BUCKET_NAMES = (
    "WITH RECURSIVE names(name) AS ((SELECT name FROM asyncjobs_rate_buckets "
    "ORDER BY name LIMIT 1) UNION ALL SELECT (SELECT b.name FROM asyncjobs_rate_buckets AS b "
    "WHERE b.name > names.name ORDER BY b.name LIMIT 1) FROM names "
    "WHERE names.name IS NOT NULL) SELECT name FROM names WHERE name IS NOT NULL"
)


async def prune_buckets(
    conn: Connection, full_before: Mapping[str, float], others_before: float | None,
    limit: int,
) -> int:  # fmt: skip
    if others_before is not None:
        stored = [r["name"] for r in await conn.fetch(BUCKET_NAMES)]
        full_before = {name: full_before.get(name, others_before) for name in stored}
    deleted = 0
    for name, before in full_before.items():
        if deleted >= limit:
            break
        deleted += len(await conn.fetch(_PRUNE_BUCKETS, name, before, limit - deleted))
    return deleted


async def last_slot(conn: Connection, key: str, slot: int | None) -> int | None:
    if slot is not None:
        await conn.execute(
            "INSERT INTO asyncjobs_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
            "SET value = greatest(asyncjobs_meta.value::bigint, excluded.value::bigint)::text",
            key,
            str(slot),
        )
    value = await conn.fetchval("SELECT value FROM asyncjobs_meta WHERE key = $1", key)
    return None if value is None else int(value)


async def meta(conn: Connection, key: str, default: str) -> str:
    await conn.execute(
        "INSERT INTO asyncjobs_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        key,
        default,
    )
    value = await conn.fetchval("SELECT value FROM asyncjobs_meta WHERE key = $1", key)
    return str(value)
