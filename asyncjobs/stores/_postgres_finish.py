"""The SQL of ``PostgresStore``'s finish: applying outcomes (in one statement for jobs
nothing waits on, in a transaction for chain and batch members, whose dependents it
releases through ``_postgres_release``), waking other processes when that frees a job
or a slot, and finding what earlier writes whose answer never came applied.

Each function runs on one asyncpg connection, inside the transaction the store opened
where noted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, NamedTuple

import asyncpg

from asyncjobs.stores._postgres_release import _GOES_ON, lock_callbacks, release_dependents
from asyncjobs.stores._postgres_sql import json_rows, notify, over_limit, retry_deadlocks
from asyncjobs.stores._protocol import Applied, ClaimRequest, Outcome, OutcomeKind

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection


# What an outcome does to its row. A job asked to stop while it ran (cancel_requested_at)
# ends cancelled where it would have run again (retry, release): _KIND is the kind that
# applies, read from the row being updated (no join: finishing costs what it did).
_KIND = """(CASE WHEN o.kind IN ('retry', 'release') AND j.cancel_requested_at IS NOT NULL
    THEN 'cancelled' ELSE o.kind END)"""
_FINISH_SET = f"""
UPDATE asyncjobs_jobs AS j SET
    status = CASE {_KIND} WHEN 'succeeded' THEN 'succeeded' WHEN 'dead' THEN 'dead'
        WHEN 'cancelled' THEN 'cancelled' WHEN 'retry' THEN 'scheduled' ELSE 'queued' END,
    result = o.result,
    error = CASE {_KIND} WHEN 'succeeded' THEN NULL WHEN 'release' THEN j.error
        WHEN 'cancelled' THEN coalesce(o.error, 'cancelled') ELSE o.error END,
    finished_at = CASE WHEN {_KIND} IN ('succeeded', 'dead', 'cancelled') THEN $1
        ELSE j.finished_at END,
    run_at = CASE {_KIND} WHEN 'retry' THEN o.run_at ELSE j.run_at END,
    attempts = CASE {_KIND} WHEN 'release' THEN j.attempts - 1 ELSE j.attempts END,
    -- a release that refunds the only attempt: the job has not started
    started_at = CASE WHEN {_KIND} = 'release' AND j.attempts = 1 THEN NULL
        ELSE j.started_at END,
    worker = CASE WHEN {_KIND} IN ('retry', 'release') THEN NULL ELSE j.worker END,
    lease_until = NULL,
    max_attempts = coalesce(o.max_attempts, j.max_attempts)
FROM (
    SELECT e->>0 AS id, e->>1 AS worker, (e->>2)::int AS attempt, e->>3 AS kind,
        e->>4 AS result, e->>5 AS error, (e->>6)::float8 AS run_at, (e->>7)::int AS max_attempts
    FROM jsonb_array_elements($2::jsonb) AS e
) AS o
"""  # noqa: S608 - only the constant above is interpolated
# ...and returns, besides what each outcome did, what it may free for another process
# (``wake_others``): its job's task and queue (a slot of a concurrency limit), and
# ``frees``: the job itself given back (queued again), or, the job ended, a due job of
# its group (the next one; the snapshot shows this one running still). The subquery, a
# seek in asyncjobs_jobs_group, runs for a job of a group alone.
_FINISH_OWNED = """
    j.id = o.id AND j.status = 'running' AND j.worker = o.worker AND j.attempts = o.attempt
RETURNING j.id, CASE WHEN j.status = 'cancelled' THEN 'cancelled' ELSE o.kind END AS kind,
    j.chain_next, j.batch_id, j.result, j.task, j.queue,
    j.status = 'queued' OR j.group_key IS NOT NULL
        AND j.status IN ('succeeded', 'dead', 'cancelled')
        AND EXISTS (SELECT 1 FROM asyncjobs_jobs AS n WHERE n.group_key = j.group_key
            AND n.status IN ('scheduled', 'queued') AND n.run_at <= $1) AS frees
"""
_FINISH = _FINISH_SET + "WHERE" + _FINISH_OWNED
# Only jobs nothing waits on: no dependents to release, so no transaction is needed.
# Not "chain_next IS NULL AND batch_id IS NULL", nor "= 0": without statistics (a table
# never analysed) PostgreSQL takes each IS NULL (and an unknown equality) for 0.5% of
# rows, so the running rows of a large table read as one, and the finish walked them
# once per outcome (tests/postgres/test_pg_plans.py); an inequality it cannot read is
# taken for a third of them, and the join hashes.
_FINISH_PLAIN = _FINISH_SET + "WHERE num_nonnulls(j.chain_next, j.batch_id) < 1 AND" + _FINISH_OWNED


def _outcome_rows(outcomes: Sequence[Outcome]) -> str:
    """The outcomes as _FINISH_SET reads them: a JSON array of rows, as an insert's.

    Not one array per column: PostgreSQL plans a prepared statement for an array
    parameter of 10 elements, and for a batch against "few running rows" (what the
    statistics say of a working queue) it then walked the running rows and read every
    outcome again for each (a batch of 100 against 1,000 running: 100,000 comparisons).
    jsonb_array_elements is planned for 100 rows, and the join hashes instead
    (tests/postgres/test_pg_plans.py)."""
    return json_rows(
        (o.job_id, o.worker, o.attempt, o.kind, o.result, o.error, o.run_at, o.max_attempts)
        for o in outcomes
    )


class Slots(NamedTuple):
    """The tasks and queues under a concurrency limit (across the store), as the claims
    of this store's workers last told them: a job of one that stops running frees a
    slot that a job waiting in another process may take."""

    tasks: frozenset[str] = frozenset()
    queues: frozenset[str] = frozenset()

    @classmethod
    def of(cls, request: ClaimRequest) -> Slots:
        limited = (name for name, limits in request.tasks.items() if limits.concurrency)
        return cls(frozenset(limited), frozenset(request.queue_concurrency))


NO_SLOTS = Slots()


async def wake_others(conn: Connection, records: Sequence[asyncpg.Record], slots: Slots) -> None:
    """NOTIFY (once) if the finished ``records`` freed a job that another process may
    now claim (``frees``: a job given back, the next job of a group), or a slot of a
    concurrency limit: that process would otherwise wait for its next poll. The usual
    finish, of jobs of no group and no limit, sends none."""
    if any(r["frees"] or r["task"] in slots.tasks or r["queue"] in slots.queues for r in records):
        await notify(conn)


async def finish_plain(
    conn: Connection, outcomes: Sequence[Outcome], now: float, slots: Slots = NO_SLOTS
) -> dict[str, str]:
    """Apply the outcomes of jobs nothing waits on, in one statement (atomic on its own;
    a batch over ``JSONB_LIMIT``: several, in a transaction);
    return the kind each applied one took, by id (a retry or release of a job asked to
    stop ends it cancelled). What they free wakes other processes (``wake_others``).

    Outcomes of chain members and batch members are left for ``finish``, which
    releases their dependents in the same transaction.
    """
    records = await _finish_rows(conn, outcomes, now, plain=True)
    await wake_others(conn, records, slots)
    return {r["id"]: r["kind"] for r in records}


def applied(outcomes: Sequence[Outcome], kinds: dict[str, str]) -> Applied:
    """The ids of ``outcomes`` applied (``kinds``: by id, the kind each took), in the
    order the outcomes came, and which of them ended cancelled instead."""
    return Applied(
        [o.job_id for o in outcomes if o.job_id in kinds],
        cancelled=[
            o.job_id for o in outcomes
            if kinds.get(o.job_id) == "cancelled" and o.kind is not OutcomeKind.CANCELLED
        ],
    )  # fmt: skip


async def apply(
    conn: Connection,
    outcomes: Sequence[Outcome],
    now: float,
    earlier: Sequence[Write],
    slots: Slots = NO_SLOTS,
    committed: Callable[[], None] = lambda: None,
) -> Applied:
    """Apply outcomes: in one statement for the usual jobs, in a transaction for chain
    and batch members (``finish``), and report as applied what the ``earlier`` writes,
    unanswered, applied before (``finished_before``). Outside a transaction, each is
    tried again if PostgreSQL ends it to break a deadlock (``retry_deadlocks``), and
    ``committed`` is told once the first committed (a failure after it leaves that)."""
    if conn.is_in_transaction():
        kinds = await finish_plain(conn, outcomes, now, slots)
        rest = [o for o in outcomes if o.job_id not in kinds]
        if rest:
            kinds.update(await finish(conn, rest, now, slots))
    else:
        kinds = await retry_deadlocks("finish", lambda: finish_plain(conn, outcomes, now, slots))
        committed()
        rest = [o for o in outcomes if o.job_id not in kinds]
        if rest:

            async def in_transaction() -> dict[str, str]:
                async with conn.transaction():
                    return await finish(conn, rest, now, slots)

            kinds.update(await retry_deadlocks("finish", in_transaction))
    kinds.update(await finished_before(conn, outcomes, kinds, earlier))
    return applied(outcomes, kinds)


async def finish(
    conn: Connection, outcomes: Sequence[Outcome], now: float, slots: Slots = NO_SLOTS
) -> dict[str, str]:
    """Apply outcomes and release what waits on them (inside a transaction); return the
    kind each applied one took, by id."""
    records = await _finish_rows(conn, outcomes, now, plain=False)
    await wake_others(conn, records, slots)
    done = {r["id"]: r for r in records}
    # Only an ending (not a retry or a release) moves a batch on.
    await lock_callbacks(conn, [r["batch_id"] for r in records if r["kind"] not in _GOES_ON])
    for record in done.values():
        if record["chain_next"] is not None or record["batch_id"] is not None:
            await release_dependents(
                conn,
                record["kind"],
                record["chain_next"],
                record["batch_id"],
                now,
                record["result"],
            )
    return {job_id: record["kind"] for job_id, record in done.items()}


async def _finish_rows(
    conn: Connection, outcomes: Sequence[Outcome], now: float, *, plain: bool
) -> list[asyncpg.Record]:
    """``_FINISH_PLAIN`` (``plain``) or ``_FINISH`` over ``outcomes``: one statement,
    or past ``JSONB_LIMIT`` one per half, as ``insert_jobs`` splits, all or none (a
    transaction, or a savepoint in the caller's). ``finish`` releases dependents only
    after all of them: every job of its outcomes is locked before any on_complete row
    (``lock_callbacks``)."""
    rows = _outcome_rows(outcomes)
    if not over_limit(rows) or len(outcomes) == 1:
        return await conn.fetch(_FINISH_PLAIN if plain else _FINISH, now, rows)
    half = len(outcomes) // 2
    async with conn.transaction():
        first = await _finish_rows(conn, outcomes[:half], now, plain=plain)
        return [*first, *await _finish_rows(conn, outcomes[half:], now, plain=plain)]


_FINISHED_BEFORE = """
SELECT j.id, CASE WHEN j.status = 'cancelled' THEN 'cancelled' ELSE o.kind END AS kind
FROM asyncjobs_jobs AS j
JOIN unnest($2::text[], $3::text[], $4::int[], $5::text[], $6::float8[])
    AS o(id, worker, attempt, kind, run_at) ON j.id = o.id
WHERE CASE
    WHEN j.status IN ('succeeded', 'dead', 'cancelled')
        THEN j.finished_at = ANY($1::float8[]) AND j.worker = o.worker
             AND j.attempts = o.attempt
    WHEN o.kind = 'retry'
        THEN j.status = 'scheduled' AND j.worker IS NULL AND j.attempts = o.attempt
             AND j.run_at = o.run_at
          -- ...or claimed again by the same write's claim (a retry due at once)
          OR j.status = 'running' AND j.worker = o.worker AND j.attempts = o.attempt + 1
             AND EXISTS (SELECT 1 FROM unnest($1::float8[], $7::text[]) AS w(at, token)
                         WHERE w.token = j.claim_token AND o.run_at <= w.at)
    WHEN o.kind = 'release'
        THEN j.status = 'queued' AND j.worker IS NULL AND j.attempts = o.attempt - 1
    ELSE false END
"""


class Write(NamedTuple):
    """A write of outcomes whose answer never came: when it was made, and the claim
    token of a finish-and-claim (its claim may have taken a retry again at once)."""

    at: float
    claim_token: str | None


async def finished_before(
    conn: Connection,
    outcomes: Sequence[Outcome],
    applied: Collection[str],
    earlier: Sequence[Write],
) -> dict[str, str]:
    """Of ``outcomes`` not ``applied`` by a write after ``earlier`` writes of them whose
    answer never came (a lost reply, a timeout), those an earlier one applied, with the
    kind each took: each row reads as that outcome at one of those writes left it (at
    its time; a retry claimed again under its claim token), which neither lease
    recovery (no worker, its own time) nor another worker's attempt (another worker or
    attempt number) can have done."""
    if not earlier:  # the usual write: none unanswered before it
        return {}
    rest = [o for o in outcomes if o.job_id not in applied]
    if not rest:
        return {}
    records = await conn.fetch(
        _FINISHED_BEFORE,
        [write.at for write in earlier],
        [o.job_id for o in rest],
        [o.worker for o in rest],
        [o.attempt for o in rest],
        [str(o.kind) for o in rest],
        [o.run_at for o in rest],
        [write.claim_token for write in earlier],
    )
    return {r["id"]: r["kind"] for r in records}
