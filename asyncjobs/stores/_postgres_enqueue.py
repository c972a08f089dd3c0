"""The SQL of ``PostgresStore``'s enqueue: inserting jobs (one statement, atomic on its
own; or, through the caller's connection, inside the caller's transaction), with the
locks that keep inserts of the same idempotency keys from deadlocking; and the jobs
whose rate key is still to be set (``pending_keys``, ``set_rate_keys``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from asyncjobs._errors import StoreError
from asyncjobs.stores._postgres_sql import SELECT, job_row, json_rows, over_limit
from asyncjobs.stores._protocol import Inserted, JobRow, NewJob, RateKeyed

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection


_INSERT_COLUMNS = (
    "id, task, queue, status, priority, payload, options, max_attempts, run_at, enqueued_at, "
    "idempotency_key, group_key, chain_next, batch_id, rate_key, attempts, started_at, "
    "lease_until, worker, claim_token, key_pending"
)
_ON_KEY_CONFLICT = "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
"""A stored idempotency key wins (written only when a job has a key: an insert that
may conflict checks each row before it goes in, and that costs a twentieth of it)."""
_ON_ANY_CONFLICT = "ON CONFLICT DO NOTHING"
"""Inserted again, a stored id wins too (the store's retry after the reply to an insert
that committed was lost with the connection)."""


def _on_conflict(*, again: bool, keyed: bool) -> str:
    return _ON_ANY_CONFLICT if again else _ON_KEY_CONFLICT if keyed else ""


def _insert_sql(table: str, *, rows: int, again: bool, keyed: bool) -> str:
    """The INSERT of ``rows`` jobs: $1 is ``now``; for a single job, one parameter per
    column; for several, $2 is a JSON array of rows, one array of column values each
    (``_job_values``). One JSON text costs the client far less to encode than one
    array per column, and the server parses it once (jsonb). A job with a ``worker``
    (local dispatch) starts its first attempt at ``now``, marked with the insert's
    claim token, the last parameter (``_CLAIMED_BY`` in ``_postgres_claim``)."""
    if rows == 1:
        return (
            f"INSERT INTO {table} ({_INSERT_COLUMNS}) "  # noqa: S608 - identifier, constants
            "VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $1, $11, $12, $13, $14, $15, "
            "CASE WHEN $17::text IS NULL THEN 0 ELSE 1 END, "
            "CASE WHEN $17::text IS NULL THEN NULL ELSE $1::float8 END, $16, $17, "
            "CASE WHEN $17::text IS NULL THEN NULL ELSE $19::text END, $18) "
            + _on_conflict(again=again, keyed=keyed)
        )
    return (
        f"INSERT INTO {table} ({_INSERT_COLUMNS}) "  # noqa: S608 - identifier, constants
        "SELECT j->>0, j->>1, j->>2, j->>3, (j->>4)::int, j->>5, j->>6, (j->>7)::int, "
        "(j->>8)::float8, $1, j->>9, j->>10, j->>11, j->>12, j->>13, "
        "CASE WHEN j->>15 IS NULL THEN 0 ELSE 1 END, "
        "CASE WHEN j->>15 IS NULL THEN NULL ELSE $1::float8 END, (j->>14)::float8, j->>15, "
        "CASE WHEN j->>15 IS NULL THEN NULL ELSE $3::text END, (j->>16)::boolean "
        "FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS n(j, ord) "
        "ORDER BY ord " + _on_conflict(again=again, keyed=keyed)
    )


def _job_values(j: NewJob, now: float) -> tuple[Any, ...]:
    return (
        j.id, j.task, j.queue, j.status, j.priority, j.payload, j.options, j.max_attempts,
        j.run_at, j.idempotency_key, j.group_key, j.chain_next, j.batch_id, j.rate_key,
        j.lease_end(now), j.worker, True if j.key_pending else None,
    )  # fmt: skip


_KEY_ATTEMPTS = 3
_ALL_KEYS = 0x616A6B69
"""The advisory lock (two-part: (_ALL_KEYS, 0), apart from one-number locks) that an
insert of many keys takes alone, and one of a few keys shares."""
_LOCK_KEYS = (
    "SELECT CASE WHEN n = 1 THEN pg_advisory_xact_lock_shared($2::int, 0) "
    "ELSE pg_advisory_xact_lock(hashtextextended('asyncjobs idempotency ' || k, 0)) END "
    "FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n)"
)
"""Shares the lock of all keys, then locks each key ($1 from its 2nd element) in the
order given (sorted): unnest keeps the array's order."""
_LOCK_ALL_KEYS = "SELECT pg_advisory_xact_lock($1::int, 0)"
KEY_LOCKS = 64
"""Keys an insert locks one by one at most; one of more takes the lock of all keys
instead. Every lock is an entry in the server's one lock table, shared by every
connection and held to the commit (max_locks_per_transaction x (max_connections +
max_prepared_transactions) entries, 6,400 by default): with one per key, an
enqueue_many of 20,000 keys failed with "out of shared memory", and a caller's
transaction holding thousands left every other connection short."""


async def insert_jobs(
    conn: Connection,
    jobs: Sequence[NewJob],
    now: float | Callable[[], float],
    *,
    table: str = "asyncjobs_jobs",
    attempt: int = 1,
    again: bool = False,
    claim_token: str | None = None,
) -> Inserted:
    """Insert ``jobs`` through ``conn``; return their ids (the stored one for a known key).

    Used by ``PostgresStore.insert`` and by transactional enqueue on the caller's own
    connection (inside the caller's transaction, so the jobs exist iff it commits).
    One statement, so atomic on its own (a batch of more than ``JSONB_LIMIT`` bytes:
    several, in a transaction). A job whose idempotency key is already
    stored is not inserted again; only then is the stored id read back (a second
    round trip). Jobs inserted running (local dispatch) have their seq returned, and
    carry ``claim_token``, this insert's own (``_CLAIMED_BY``, in ``_postgres_claim``).
    A clock for ``now`` is read here, once the connection is held (see ``NewJob.lease``).
    """
    if callable(now):
        now = now()
    if not jobs:
        return Inserted(at=now)
    keys = sorted({j.idempotency_key for j in jobs if j.idempotency_key is not None})
    if len(keys) > 1 and attempt == 1:
        # The INSERT takes each key's slot in the unique index in the order of the rows:
        # two inserts of the same keys in other orders deadlocked. Each first takes a
        # lock per key in one order (held to its commit), then inserts in its own; one
        # of many keys takes the lock of them all (which the others share) instead.
        if not conn.is_in_transaction():
            async with conn.transaction():
                return await insert_jobs(
                    conn, jobs, now, table=table, again=again, claim_token=claim_token
                )
        if len(keys) > KEY_LOCKS:
            await conn.execute(_LOCK_ALL_KEYS, _ALL_KEYS)
        else:
            await conn.execute(_LOCK_KEYS, ["", *keys], _ALL_KEYS)
    if len(jobs) == 1:
        params: list[Any] = list(_job_values(jobs[0], now))
    else:
        params = [json_rows(_job_values(j, now) for j in jobs)]
        if over_limit(params[0]):  # halves, in one transaction (or savepoint)
            half = len(jobs) // 2
            async with conn.transaction():
                first = await insert_jobs(
                    conn, jobs[:half], now, table=table, again=again, claim_token=claim_token
                )
                rest = await insert_jobs(
                    conn, jobs[half:], now, table=table, again=again, claim_token=claim_token
                )
            return Inserted([*first, *rest], seqs={**first.seqs, **rest.seqs}, at=now)
    keyed = any(j.idempotency_key is not None for j in jobs)
    query = _insert_sql(table, rows=len(jobs), again=again, keyed=keyed)
    dispatched = any(j.worker is not None for j in jobs)
    if not dispatched and not keyed:
        await conn.execute(query, now, *params, claim_token)
        return Inserted([j.id for j in jobs], at=now)
    inserted = await conn.fetch(
        query + " RETURNING idempotency_key, id, seq, worker", now, *params, claim_token
    )
    seqs = {r["id"]: r["seq"] for r in inserted if r["worker"] is not None}
    if again and dispatched:
        # The first try may have committed before its reply was lost: the jobs it
        # inserted running are this worker's, and without their seq the runner would
        # never start them (they would wait out their leases, an attempt spent).
        missing = [j.id for j in jobs if j.worker is not None and j.id not in seqs]
        if missing:
            rows = await conn.fetch(
                f"SELECT id, seq FROM {table} WHERE id = ANY($1::text[]) AND status = 'running'",  # noqa: S608
                missing,
            )
            seqs.update((r["id"], r["seq"]) for r in rows)
    stored = {r["idempotency_key"]: r["id"] for r in inserted if r["idempotency_key"] is not None}
    known = [k for j in jobs if (k := j.idempotency_key) is not None and k not in stored]
    if known:
        rows = await conn.fetch(
            f"SELECT idempotency_key, id FROM {table} WHERE idempotency_key = ANY($1::text[])",  # noqa: S608
            known,
        )
        stored.update((r["idempotency_key"], r["id"]) for r in rows)
    lost = [j for j in jobs if j.idempotency_key is not None and j.idempotency_key not in stored]
    if lost:
        # The job holding the key was deleted (pruned, discarded) between the two
        # statements, so the key is free again: insert these after all.
        if attempt == _KEY_ATTEMPTS:
            raise StoreError(
                f"idempotency key {lost[0].idempotency_key!r} kept changing hands; not enqueued"
            )
        retried = await insert_jobs(
            conn, lost, now, table=table, attempt=attempt + 1, claim_token=claim_token
        )
        stored.update((j.idempotency_key, id_) for j, id_ in zip(lost, retried, strict=True))
        seqs.update(retried.seqs)
    ids = [j.id if j.idempotency_key is None else stored[j.idempotency_key] for j in jobs]
    return Inserted(ids, seqs=seqs, at=now)


_PENDING_KEYS = (
    "SELECT " + SELECT + " FROM asyncjobs_jobs "  # noqa: S608 - constants
    "WHERE key_pending IS NOT NULL AND status = 'queued' AND task = ANY($1::text[]) "
    "ORDER BY priority DESC, seq LIMIT $2"
)


async def pending_keys(conn: Connection, tasks: Collection[str], limit: int) -> list[JobRow]:
    records = await conn.fetch(_PENDING_KEYS, sorted(tasks), limit)
    return [job_row(r) for r in records]


async def set_rate_keys(conn: Connection, keys: Sequence[RateKeyed]) -> None:
    await conn.execute(
        "UPDATE asyncjobs_jobs AS j SET rate_key = k.rate_key, key_pending = NULL "
        "FROM unnest($1::text[], $2::text[]) AS k(id, rate_key) "
        "WHERE j.id = k.id AND j.key_pending IS NOT NULL",
        [k.job_id for k in keys],
        [k.rate_key for k in keys],
    )
