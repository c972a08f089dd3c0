"""The SQL of what a finished job sets off in ``PostgresStore``: its chain moved on (or
the rest of it cancelled) and its batch's on_complete released, a job retried by hand
waiting again, cancelling jobs, and the tallies of deleted batch members. Each function
runs on one asyncpg connection, inside the transaction the store opened.

The statements of deleting jobs (``PostgresStore.delete`` and ``purge``, which cancel
the unfinished ones first, then tally the deleted members) are here too; ``_delete`` in
``_postgres.py`` runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import asyncpg

from asyncjobs.stores._dependents import (
    COUNTS_FLAG,
    RESULT_FLAG,
    pass_result,
    tally,
    wants,
    with_batch,
)
from asyncjobs.stores._postgres_sql import notify
from asyncjobs.stores._protocol import OutcomeKind
from asyncjobs.stores._statuses import PURGE_FOLLOWER

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection


_GOES_ON = (OutcomeKind.RETRY, OutcomeKind.RELEASE)


async def wait_again(
    conn: Connection, job_id: str, predecessor: asyncpg.Record | None, now: float
) -> None:
    """A job retried by hand that never ran, or a batch's on_complete, waits again for
    what it waited on, as ``_wait_again`` in ``_sqlite_admin.py`` describes (the same
    steps, in PostgreSQL); ``predecessor`` is the chain member before it (status,
    result), locked, or None."""
    members = sum((await batch_counts(conn, job_id)).values())  # deleted ones too
    status, result = predecessor or (None, None)
    if predecessor is not None or members:
        await conn.execute("UPDATE asyncjobs_jobs SET status = 'waiting' WHERE id = $1", job_id)
    if status == "succeeded":
        await release_dependents(conn, OutcomeKind.SUCCEEDED, job_id, None, now, result)
    if members:
        await release_dependents(conn, OutcomeKind.SUCCEEDED, None, job_id, now)


async def batch_counts(conn: Connection, batch_id: str) -> dict[str, int]:
    """A batch's members by status: the stored ones, and those deleted since
    (``tally_deleted``), read in one statement (one snapshot: a deletion committing
    meanwhile is counted once, as a row or in the tally)."""
    records = await conn.fetch(
        "SELECT status, sum(n)::bigint AS n FROM (SELECT status, count(*) AS n "
        "FROM asyncjobs_jobs WHERE batch_id = $1 GROUP BY status UNION ALL "
        "SELECT status, n FROM asyncjobs_batch_deleted WHERE batch_id = $1) AS c GROUP BY status",
        batch_id,
    )
    return {r["status"]: r["n"] for r in records}


# Tallies are locked by deletions only, each adding to them in (batch_id, status) order
# as its last wait, so two deletions never wait on each other's tallies in a cycle;
# prune drops them skipping those another transaction holds.
_TALLY = """
    INSERT INTO asyncjobs_batch_deleted AS d (batch_id, status, n, finished_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::float8[])
    ON CONFLICT (batch_id, status) DO UPDATE
    SET n = d.n + excluded.n, finished_at = greatest(d.finished_at, excluded.finished_at)
"""


async def tally_deleted(conn: Connection, deleted: Sequence[asyncpg.Record]) -> None:
    """After rows were deleted (records with ``batch_id``, ``status``, ``finished_at``):
    add the batch members among them to their batch's tally of deleted members, which
    the batch's counts add back (``prune`` drops a tally with the last job of its
    batch)."""
    rows = tally((r["batch_id"], r["status"], r["finished_at"]) for r in deleted)
    if rows:
        await conn.execute(_TALLY, *(list(column) for column in zip(*rows, strict=True)))


async def release_dependents(
    conn: Connection,
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
    if kind in _GOES_ON:
        return
    if chain_next is not None:
        if kind == OutcomeKind.SUCCEEDED:
            waiting = await conn.fetchrow(
                "SELECT payload, options FROM asyncjobs_jobs "
                "WHERE id = $1 AND status = 'waiting' FOR UPDATE",
                chain_next,
            )
            if waiting is not None:
                payload, options = waiting["payload"], waiting["options"]
                if wants(options, RESULT_FLAG):
                    payload, options = pass_result(payload, options, result)
                await conn.execute(
                    "UPDATE asyncjobs_jobs SET payload = $3, options = $4, "
                    "status = CASE WHEN run_at > $1 THEN 'scheduled' ELSE 'queued' END, "
                    "run_at = greatest(run_at, $1) WHERE id = $2",
                    now,
                    chain_next,
                    payload,
                    options,
                )
                await notify(conn)
        else:
            await cancel(
                conn, [chain_next], now, reason="an earlier job in its chain did not succeed"
            )
    if batch_id is not None:
        # Lock the callback first: members finishing at once in other transactions
        # count in turn, so the last one sees every other member finished.
        callback = await conn.fetchrow(
            "SELECT status, payload, options FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE",
            batch_id,
        )
        if callback is None or callback["status"] != "waiting":
            return
        if await conn.fetchval(  # a seek in asyncjobs_jobs_batch, not a count of members
            "SELECT 1 FROM asyncjobs_jobs WHERE batch_id = $1 "
            "AND status IN ('waiting', 'scheduled', 'queued', 'running') LIMIT 1",
            batch_id,
        ):
            return
        counts = await batch_counts(conn, batch_id)
        payload = callback["payload"]
        if wants(callback["options"], COUNTS_FLAG):
            payload = with_batch(payload, batch_id, counts)
        await conn.execute(
            "UPDATE asyncjobs_jobs SET payload = $3, "
            "status = CASE WHEN run_at > $1 THEN 'scheduled' ELSE 'queued' END, "
            "run_at = greatest(run_at, $1) WHERE id = $2",
            now,
            batch_id,
            payload,
        )
        await notify(conn)


_CANCEL = (
    "UPDATE asyncjobs_jobs SET "
    "status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END, "
    "finished_at = CASE WHEN status = 'running' THEN finished_at ELSE $1 END, "
    "lease_until = CASE WHEN status = 'running' THEN lease_until END, "
    "error = CASE WHEN status = 'running' THEN error ELSE coalesce(error, $2) END, "
    "cancel_requested_at = CASE WHEN status = 'running' THEN $1 ELSE cancel_requested_at END "
    "WHERE id = $3 AND (status IN ('waiting', 'scheduled', 'queued') "
    "OR $4 AND status = 'running' AND cancel_requested_at IS NULL) "
    "RETURNING status = 'cancelled' AS ended, chain_next, batch_id, group_key"
)
"""A cancel of one job ($3 at $1, error $2): one not yet running ends cancelled, a running
one is asked to stop (if $4). One statement, so it acts on the row as it is once free:
in two (cancel it if pending, else ask it to stop if running), a running job that went
back to the queue between them (its retry, its release at shutdown, lease recovery
committing meanwhile) was neither, the cancel said False, and the job ran again."""


async def cancel(
    conn: Connection,
    job_ids: Sequence[str],
    now: float,
    reason: str = "cancelled",
    *,
    stop_running: bool = True,
) -> list[str]:
    """Cancel ``job_ids`` and the rest of their chains; return those cancelled or (with
    ``stop_running``) asked to stop. A deletion passes False: the jobs it found pending
    and a claim took since are left running, not deleted, as its caller says."""
    cancelled: list[str] = []
    batches: set[str] = set()
    freed = False
    pending = list(job_ids)
    while pending:
        job_id = pending.pop()
        record = await conn.fetchrow(_CANCEL, now, reason, job_id, stop_running)
        if record is None:
            continue
        cancelled.append(job_id)
        if not record["ended"]:
            # Running: its worker was asked to stop it. It holds its slot until then, and
            # its outcome (cancelled, or what it reached first) moves its chain and batch on.
            continue
        if record["group_key"] is not None:
            freed = True  # the next job of its group may run now
        if record["chain_next"] is not None:
            pending.append(record["chain_next"])  # a chain member, of no batch
        if record["batch_id"] is not None:
            batches.add(record["batch_id"])
    # The jobs first, then their batches' on_complete rows in id order, as ``finish``
    # locks them (``lock_callbacks``).
    await lock_callbacks(conn, batches)
    for batch_id in sorted(batches):
        await release_dependents(conn, OutcomeKind.CANCELLED, None, batch_id, now)
    if freed:
        await notify(conn)
    return cancelled


async def lock_callbacks(conn: Connection, batch_ids: Iterable[str | None]) -> None:
    """Lock the on_complete rows of these batches in id order, before releasing any.

    Every member that ends locks its batch's on_complete (``release_dependents``), so
    that members ending at once count in turn. Two transactions ending members of the
    same batches (two workers' finishes, a cancel, lease recovery) that locked them in
    different orders deadlocked; each now takes its jobs' rows first, then these.
    """
    ids = sorted({batch_id for batch_id in batch_ids if batch_id is not None})
    if len(ids) > 1:  # one is locked where it is released
        await conn.execute(
            "SELECT 1 FROM asyncjobs_jobs WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", ids
        )


# A deletion (discard, purge) of the jobs matching a condition: _UNFINISHED + condition
# finds the unfinished ones (and whether they belong to a chain or batch), and
# _DELETE + condition + _DELETE_END deletes what the condition matched before the
# cancel in between changed any row: finished rows it matches (but not those that
# cancel just finished), and the unfinished ones found first (not those it released).
_UNFINISHED = (
    "SELECT id, chain_next IS NOT NULL OR batch_id IS NOT NULL AS member, "
    "group_key IS NOT NULL AS grouped FROM asyncjobs_jobs "
    "WHERE status IN ('waiting', 'scheduled', 'queued') AND "
)
_DELETE = "DELETE FROM asyncjobs_jobs WHERE status != 'running' AND (("


# ...the condition's parameters come first, then the two lists: .format(changed=n + 1,
# matched=n + 2) for a condition of n parameters.
_DELETE_END = (
    ") AND status NOT IN ('waiting', 'scheduled', 'queued') "
    "AND id <> ALL(${changed}::text[]) OR id = ANY(${matched}::text[])) "
    "RETURNING chain_next, batch_id, status, finished_at"
)
# The run of chain members after the jobs a purge deleted (their chain_next: ${after},
# .format(after=n + 1) after the condition's n parameters) that PURGEABLE kept while
# the one before each was stored: cancelled before they ran, they go with it when the
# purge's condition ({matching}) takes them too. The walk stops at the first that is
# not one. Each member is looked up by id in a LATERAL subquery the planner cannot
# flatten (OFFSET 0, FOR UPDATE), as _PRUNE_FOLLOWERS (in _postgres_admin) does:
# joined plainly, it may read every cancelled job and match them against the walk. FOR
# UPDATE waits for a row another transaction holds and then checks it again (one
# retried meanwhile is left). It takes nothing the purge itself cancelled: the member
# waiting for a deleted one is cancelled after the walk (_delete, in _postgres.py), and
# the rest of an unfinished job it deletes
# finished now, which no purge condition matches (not dead, not finished before
# ``now``, and a purge of cancelled jobs matches no unfinished job).
_PURGE_FOLLOWERS = (
    "WITH RECURSIVE rest(id) AS (SELECT unnest(${after}::text[]) UNION ALL "  # noqa: S608 - constant
    "SELECT f.chain_next FROM rest CROSS JOIN LATERAL (SELECT j.chain_next "
    "FROM asyncjobs_jobs AS j WHERE j.id = rest.id AND j.chain_next IS NOT NULL "
    f"AND {PURGE_FOLLOWER} AND {{matching}} OFFSET 0) AS f) "
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT f.seq FROM rest CROSS JOIN LATERAL "
    "(SELECT j.seq FROM asyncjobs_jobs AS j WHERE j.id = rest.id "
    f"AND {PURGE_FOLLOWER} AND {{matching}} FOR UPDATE) AS f) "
    "RETURNING chain_next, batch_id, status, finished_at"
)
