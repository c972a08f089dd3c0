"""The SQL of ``PostgresStore``'s hot path: enqueue, claim and finish, and the chain
and batch releases (or cancellations) that a finished job sets off. Each function runs
on one asyncpg connection.

Functions named for a store operation run inside the transaction the store opened
(or, for ``insert_jobs``, inside the caller's own transaction). Claims lock rows with
``FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on each other's rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import asyncpg

from asyncjobs._errors import StoreError
from asyncjobs.stores._admission import has_limits
from asyncjobs.stores._dependents import (
    COUNTS_FLAG,
    RESULT_FLAG,
    pass_result,
    tally,
    wants,
    with_batch,
)
from asyncjobs.stores._postgres_limits import (
    GROUP_IDLE,
    GROUP_TURN,
    GROUP_WALK,
    HEADS_GROUP,
    GroupWalk,
)
from asyncjobs.stores._postgres_limits import choose as choose_limited
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
    previewed,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# JobRow's fields (a test holds them equal): the columns every read of a job returns.
COLUMNS = (
    "id", "seq", "task", "queue", "status", "priority", "payload", "options", "attempts",
    "max_attempts", "run_at", "enqueued_at", "started_at", "finished_at", "lease_until",
    "worker", "result", "error", "idempotency_key", "group_key", "progress",
    "progress_message", "chain_next", "batch_id",
)  # fmt: skip
SELECT = ", ".join(COLUMNS)


# list(preview=N): the PREVIEWED columns read as their first N + 1 characters ($1; on
# a TOASTed value substr reads only that slice), then the size of each in bytes
# (octet_length reads the TOAST header, not the value): a list view reads a bounded start
# of a 64 MiB result, and sees whether (and how much) was left out.
PREVIEW_SELECT = (
    ", ".join(f"substr({c}, 1, $1) AS {c}" if c in PREVIEWED else c for c in COLUMNS)
    + ", "
    + ", ".join(f"octet_length({c}) AS {c}_size" for c in PREVIEWED)
)
_PREVIEW_SIZES = tuple(f"{c}_size" for c in PREVIEWED)


def job_row(record: asyncpg.Record) -> JobRow:
    return JobRow._make(record[name] for name in COLUMNS)


def preview_row(record: asyncpg.Record, preview: int) -> JobRow:
    """A row read with ``PREVIEW_SELECT``, as ``list(preview=...)`` returns it."""
    return previewed(job_row(record), preview, [record[name] for name in _PREVIEW_SIZES])


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
    claim token, the last parameter (``_CLAIMED_BY``)."""
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
JSONB_LIMIT = 200 * 2**20
"""Bytes of one statement's JSON rows at most: PostgreSQL refuses a jsonb value over
256 MiB, so a bigger batch of inserts (each job within max_payload_bytes) or outcomes
(each result within MAX_RESULT_BYTES, at most doubled by escaping) goes in as several
statements."""


def json_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as the one JSON text a statement reads with ``jsonb_array_elements``.

    Characters beyond ASCII go as themselves, as in a text parameter: escaped as
    ``\\uXXXX`` (json.dumps' default) they were refused in a SQL_ASCII database, where
    jsonb converts no escape past ASCII (tests/postgres/test_pg_encoding.py)."""
    return json.dumps(list(rows), ensure_ascii=False)


def over_limit(rows: str) -> bool:
    """Whether ``rows`` (``json_rows``) encodes to more than ``JSONB_LIMIT`` bytes."""
    size = len(rows) if rows.isascii() else len(rows.encode())
    return size > JSONB_LIMIT


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
    carry ``claim_token``, this insert's own (``_CLAIMED_BY``). A clock for ``now`` is
    read here, once the connection is held (see ``NewJob.lease``).
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


# -- the functions below run on one connection (inside a transaction where noted) ---


# The schema's NOTIFY channel: 'asyncjobs:' and its name cut to 63 characters, or, when
# that is over PostgreSQL's 63 bytes (a long non-ASCII name), 'asyncjobs:' and the
# name's md5; the md5 too in a SQL_ASCII database when the cut, there at 63 bytes, would
# end inside a UTF-8 character (byte 64 a continuation byte, 0x80-0xbf): that channel
# could not be read back. The insert trigger computes the same (migration 0013).
CHANNEL = (
    "CASE WHEN octet_length(left('asyncjobs:' || current_schema(), 63)) <= 63 "
    "AND NOT (getdatabaseencoding() = 'SQL_ASCII' AND substring(convert_to("
    "'asyncjobs:' || current_schema(), 'SQL_ASCII') FROM 64 FOR 1) "
    "BETWEEN '\\x80'::bytea AND '\\xbf'::bytea) "
    "THEN left('asyncjobs:' || current_schema(), 63) "
    "ELSE 'asyncjobs:' || md5(current_schema()) END"
)
SELECT_CHANNEL = "SELECT " + CHANNEL
_NOTIFY = "SELECT pg_notify(" + CHANNEL + ", '')"


async def channel(conn: Connection) -> str:
    """The channel to LISTEN on for the inserts into this connection's schema."""
    name: str = await conn.fetchval(SELECT_CHANNEL)
    return name


async def notify(conn: Connection) -> None:
    """Wake listening workers when the surrounding transaction commits."""
    await conn.execute(_NOTIFY)


# The rows that the claims of worker $1 with the claim tokens $2 took, if it still holds
# them. Each claim (and each insert of jobs dispatched to a free slot) marks the rows it
# takes with a token of its own: no other write of this worker takes a row under it, not
# even one at the same clock reading (a started_at would match those too: a job
# dispatched here, or taken by an answered claim, that this worker runs). Rows asked to
# stop meanwhile are left to lease recovery, which ends them cancelled, never run.
_CLAIMED_BY = """status = 'running' AND worker = $1 AND claim_token = ANY($2::text[])
    AND cancel_requested_at IS NULL"""
_CLAIMED_UNSEEN = f"SELECT id, attempts FROM asyncjobs_jobs WHERE {_CLAIMED_BY} FOR UPDATE"  # noqa: S608
# ...taken again as if claimed now ($3) with a lease ending at $4 and by this claim ($5),
# so a later claim that hands out this one's rows (its answer lost too) finds them.
_CLAIMED_BEFORE = f"""UPDATE asyncjobs_jobs SET started_at = $3, lease_until = $4,
    claim_token = $5 WHERE {_CLAIMED_BY} RETURNING {SELECT}"""  # noqa: S608 - constants


async def claim_after(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    earlier: Sequence[tuple[str, float]],
    *,
    again: bool,
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """``claim`` (marking what it takes with ``claim_token``), or ``claim_again`` after
    claims that may have committed unseen: those in ``earlier``, and this claim's own
    first try if this is its retry (``again``; both tries carry the same token)."""
    moments = [*earlier, (claim_token, now + request.lease)] if again else earlier
    if moments:
        return await claim_again(conn, request, now, claim_token, moments, walk)
    return await claim(conn, request, now, claim_token, walk)


async def claim_again(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    earlier: Sequence[tuple[str, float]],
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """A claim after claims of this worker whose answer never came (a lost reply, a
    timeout): each may have committed. ``earlier`` holds the claim token and lease end
    of each. The rows they took (still running under this worker, unseen by it) come
    back with the claim's own, leased anew, so they run now rather than wait out their
    leases and spend an attempt they never had. The runner drops any it already holds
    (``handed_back``)."""
    tokens = [taken_by for taken_by, _ in earlier]
    records = await conn.fetch(
        _CLAIMED_BEFORE, request.worker, tokens, now, now + request.lease, claim_token
    )
    lost = [job_row(r) for r in records]
    limit = max(0, request.limit - len(lost))
    rows = await claim(
        conn,
        replace(request, limit=limit, ahead=min(request.ahead, limit)),
        now,
        claim_token,
        walk,
    )
    next_token_at = rows.next_token_at if isinstance(rows, Claimed) else None
    unkeyed = isinstance(rows, Claimed) and rows.unkeyed
    return Claimed(
        [*lost, *rows], next_token_at=next_token_at, handed_back=bool(lost), unkeyed=unkeyed
    )


async def release_claimed(
    conn: Connection, worker: str, earlier: Sequence[tuple[str, float]], now: float
) -> None:
    """Give back, attempt unspent, the rows the claims of a stopped ``worker`` whose
    answer never came took (``earlier``: claim token and lease end of each), as the
    runner gives back jobs it claimed ahead (inside a transaction)."""
    tokens = [taken_by for taken_by, _ in earlier]
    rows = await conn.fetch(_CLAIMED_UNSEEN, worker, tokens)
    outcomes = [
        Outcome(job_id=r["id"], worker=worker, attempt=r["attempts"], kind=OutcomeKind.RELEASE)
        for r in rows
    ]
    if outcomes:
        await finish(conn, outcomes, now)


async def claim(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """Take up to ``request.limit`` due jobs for ``request.worker``, marked with
    ``claim_token``, this claim's own (``_CLAIMED_BY``); past a full window, through the
    groups from where ``walk`` stopped (None: from the first), moving it on."""
    if has_limits(request) and not conn.is_in_transaction():
        async with conn.transaction():  # flow control counts and takes tokens atomically
            return await claim(conn, request, now, claim_token, walk)
    # Due scheduled jobs become queued; rows another claimer holds are left to it.
    await conn.execute(
        "UPDATE asyncjobs_jobs SET status = 'queued' WHERE seq IN (SELECT seq FROM "
        "asyncjobs_jobs WHERE status = 'scheduled' AND run_at <= $1 FOR UPDATE SKIP LOCKED)",
        now,
    )
    # Of ``limit``, the ``ahead`` last in claim order skip jobs on their last attempt
    # (not under concurrency or rate limits, which take none ahead).
    limited = has_limits(request)
    limit = request.limit - request.ahead if limited else request.limit
    slots = limit if limited else limit - request.ahead
    if limit <= 0:
        return Claimed()
    names = list(request.tasks)
    attempts = json.dumps(  # non-ASCII names as themselves, as json_rows sends them
        {name: limits.max_attempts for name, limits in request.tasks.items()}, ensure_ascii=False
    )
    params: list[Any] = [now, now + request.lease, request.worker, names, attempts, slots]
    params.append(claim_token)  # $7
    queue_filter = ""
    in_queues = ""  # the queue test on any alias (_PICK_READY)
    queues = ""  # their array
    if request.queues is not None:
        params.append(sorted(set(request.queues)))  # each once: a seek each (_TAKE_READY)
        queues = f"${len(params)}::text[]"
        in_queues = f".queue = ANY({queues})"
        queue_filter = "AND j" + in_queues
    next_token_at, unkeyed = None, False
    if limited:  # concurrency, rate limits: chosen by _postgres_limits
        walk = GroupWalk() if walk is None else walk
        admission = await choose_limited(conn, replace(request, limit=limit), now, walk)
        next_token_at, unkeyed = admission.wake_at, admission.unkeyed
        if not admission.chosen:
            return Claimed(next_token_at=next_token_at, unkeyed=unkeyed)
        params.append(admission.chosen)
    turn = "NULL::text"  # (limited: no walk)
    if limited:
        taken = _TAKE_CHOSEN.format(chosen=f"${len(params)}", queues=queue_filter)
    else:
        walk = GroupWalk() if walk is None else walk
        params.append(limit)
        limit_at = len(params)
        params.append(limit + WINDOW_MORE)
        window = f"${len(params)}"
        params.append(walk.after)
        after = f"${len(params)}::text"
        taken = _TAKE_READY.format(
            plain_next=_PLAIN_NEXT_IN_QUEUES.format(queues=queues) if queues else _PLAIN_NEXT,
            queues_w="AND w" + in_queues if in_queues else "",
            queues_f="AND f" + in_queues if in_queues else "",
            limit=f"${limit_at}",
            window=window,
            after=after,
        )
        turn = _TURN
    # The claimed rows, each with the walk's next turn; the turn alone when it took none.
    records = await conn.fetch(
        f"""
        WITH RECURSIVE {taken}, claimed AS (
            UPDATE asyncjobs_jobs AS t SET
                status = 'running', attempts = t.attempts + 1, started_at = $1,
                lease_until = $2, worker = $3, claim_token = $7, progress = NULL,
                progress_message = NULL,
                -- never below this attempt (a manual retry allows one more)
                max_attempts = GREATEST(t.attempts + 1, {_MAX_ATTEMPTS})
            -- by seq, one seek a row (joined to taken, on a table never analysed, the
            -- whole table was read and hashed)
            WHERE t.seq = ANY(ARRAY(SELECT got FROM taken WHERE got IS NOT NULL))
            RETURNING {", ".join("t." + c for c in COLUMNS)}
        )
        SELECT claimed.*, turn.turn_after
        FROM (SELECT {turn} AS turn_after) AS turn LEFT JOIN claimed ON true
        """,  # noqa: S608 - only constants are interpolated
        *params,
    )
    if walk is not None and records and records[0]["turn_after"] is not None:
        walk.after = records[0]["turn_after"]
    claimed = [job_row(r) for r in records if r["seq"] is not None]
    claimed.sort(key=lambda r: (-r.priority, r.seq))
    return Claimed(claimed, next_token_at=next_token_at, unkeyed=unkeyed)


# A job's attempts under this claim: the claimer's definition applies unless retries
# were given at enqueue (options is written only by json.dumps; a text test cannot fail
# on a corrupt row the way a ::jsonb cast would). $5 maps each task name to its attempts:
# a jsonb object finds a name by binary search, where a table of them was read through
# once per claimed job (200 tasks: 1.3 ms a claim of 100).
_MAX_ATTEMPTS_OF = """CASE
                WHEN {t}.options LIKE '%"retries"%' THEN {t}.max_attempts
                ELSE coalesce(($5::jsonb ->> {t}.task)::int, {t}.max_attempts)
                END"""
_MAX_ATTEMPTS = _MAX_ATTEMPTS_OF.format(t="t")


# Whether job j, read by its seq (a seek in the primary key), is still queued. Not an
# index condition ("IS TRUE"): as one, on a table never analysed, PostgreSQL could read
# the job from any index on the queued jobs instead, each row it locked a read of them
# all: asyncjobs_jobs_counts, whose queued jobs of one task and queue PostgreSQL keeps
# as one key (a page, up to about 1,300 jobs), looked cheaper than the primary key.
_STILL_QUEUED = "(j.status = 'queued') IS TRUE"


# The jobs a claim under limits takes (got): those _postgres_limits chose ({chosen}), if
# still ready and heads of their group, each read by its seq (joined to the chosen
# instead, on a table never analysed the rows were read from asyncjobs_jobs_ready_task:
# the tasks' whole backlog; a subquery that locks is planned on its own). It chose
# as many as its limit at most ($6: its slots, all of it), so each row it locks it takes.
_TAKE_CHOSEN = f"""taken AS (
    SELECT j.seq AS got FROM unnest({{chosen}}::bigint[]) AS c(seq) CROSS JOIN LATERAL (
        SELECT j.seq, j.priority FROM asyncjobs_jobs AS j
        WHERE j.seq = c.seq AND {_STILL_QUEUED} AND j.task = ANY($4::text[]) {{queues}}
          AND (j.group_key IS NULL OR {HEADS_GROUP.format(j="j")})
        FOR UPDATE SKIP LOCKED) AS j
    ORDER BY j.priority DESC, j.seq LIMIT $6)"""  # noqa: S608 - constants

WINDOW_MORE = 16
"""A claim of n reads the first n + WINDOW_MORE ready jobs of groups (_TAKE_READY)."""


# The {columns} of the first job (alias j) to pass the tests {where} after row {cursor}
# in claim order: a seek in the index in claim order (priority DESC, seq) whatever the
# statistics. Not "j.priority = p AND j.seq > s ORDER BY j.seq": that order PostgreSQL
# read from the primary key, testing each later job on the way (5,000 rows a step
# behind a group's backlog); nor one test "after the cursor", which reads again every
# job before it of the same priority.
_NEXT = """(SELECT {columns} FROM asyncjobs_jobs AS j
         WHERE {where} AND j.priority >= {cursor}.priority AND j.priority <= {cursor}.priority
           AND j.seq > {cursor}.seq ORDER BY j.priority DESC, j.seq LIMIT 1)
        UNION ALL
        (SELECT {columns} FROM asyncjobs_jobs AS j
         WHERE {where} AND j.priority < {cursor}.priority ORDER BY j.priority DESC, j.seq LIMIT 1)
        LIMIT 1"""

# Whether row {x} (an alias) comes after row {y} in claim order.
_AFTER = "({x}.priority < {y}.priority OR {x}.priority = {y}.priority AND {x}.seq > {y}.seq)"


# Whether the claim at row t of taken looked past its window (where h and p, the next
# head of the window and the next job of no group, are): the window is full (e, its
# last job), none of its heads is left, and no job of no group comes before its end.
# Past that point a group's head may come first that the window does not hold.
_PAST_WINDOW = (
    f"h.seq IS NULL AND e.seq IS NOT NULL AND (p.seq IS NULL OR {_AFTER.format(x='p', y='e')})"
)

# The group a claim that read the heads past its window stopped at, the next one's
# {after}: the last of GROUPS_PER_CLAIM groups, or '' when it read every group (the next
# starts from the first); NULL when it read none (the walk stays where it was).
_TURN = f"CASE WHEN (SELECT bool_or(walked) FROM taken) THEN {GROUP_TURN} END"  # noqa: S608

# The jobs a plain claim takes (got), locked: the first {limit} ready jobs in claim
# order (priority, then enqueue order) that it may take, of the jobs of no group and of
# the heads of the groups. Only a group's head can run (one job at a time, in enqueue
# order), so walking the ready jobs in claim order walked the backlog of a large group,
# every one of them unclaimable.
#
# The heads are read from the first {window} ready jobs of any group, in claim order
# (first_grouped), one seek each (_NEXT): read in one "ORDER BY ... LIMIT {window}", on
# a table never analysed PostgreSQL read every ready job of a group and sorted them (a
# bitmap scan: 40,000 rows a claim behind 20,000 jobs of groups). The heads among them
# that this claim may take (its tasks, its queues) come first among all heads up to the
# window's last job (window_end, when the window is full: jobs of groups may follow it).
# Past that point (a group's backlog filled the window, and the claim still wants jobs)
# the heads are read one group at a time: each group's first unfinished job (a loose
# scan of asyncjobs_jobs_group, a seek a group), if it is ready and its group runs none,
# of GROUPS_PER_CLAIM groups at most (group_first, GROUP_WALK): those after the group
# the store's last such claim stopped at ({after}: GroupWalk), then from the first. The
# claim order between groups holds among those a claim looks at, as on SQLite. The task
# and queue are tested on the rows as read (they never change): tested on the row
# joined by seq, a table never analysed had the join driven from
# asyncjobs_jobs_ready_task.
#
# taken walks the jobs in claim order, one a step from where the step before stopped
# (t): the next job of no group (p: a seek in asyncjobs_jobs_ready_plain), the next head
# of the window (h) or past it (w), whichever comes first (c); and locks it, skipping it
# if another claim holds it (or took it meanwhile), so a concurrent claim takes the next
# ones instead of coming back short. The heads are arrays in claim order, read at
# next_h and next_w (not scanned and sorted again at every step). Only the rows it
# takes are locked: locking every candidate as it was read (the first {limit} jobs of
# no group and the window's heads: up to twice {limit} and 16 more, held to the commit)
# left a concurrent claim only the jobs past them, none at all when they were every
# job. Of {limit}, those past $6 (the slots: the rest are claimed ahead) leave a job on
# its last attempt where it is, unlocked (spare), but count it (considered), so the
# claim stops where it did, as on SQLite. The walk through the groups (walk_heads,
# GROUP_WALK) runs only once a step looks past the window (walked). The first row of
# taken is no job: the start.
# {queues_w}, {queues_f}: the queue filter on w and f ("" for every queue).
#
# The task is no index condition in _PLAIN's seeks ("IS TRUE"): as one, on a table never
# analysed, PostgreSQL read the first step's jobs from asyncjobs_jobs_ready_task_plain
# (by task) and sorted them, every queued job of the claim's tasks (a million rows).
_PLAIN = "j.status = 'queued' AND j.group_key IS NULL AND (j.task = ANY($4::text[])) IS TRUE"
_PLAIN_NEXT = _NEXT.format(where=_PLAIN, cursor="t", columns="j.priority, j.seq")

# ...of a claim from some queues ({queues}: their array, each once): the first of each
# queue's next job of no group, each a seek in asyncjobs_jobs_ready_queue (migration
# 17). One walk of asyncjobs_jobs_ready_plain testing the queue read through every
# other queue's jobs before (100,000 rows a claim of 100 behind 100,000 in another).
_PLAIN_NEXT_IN_QUEUES = f"""SELECT n.priority, n.seq FROM unnest({{queues}}) AS q(queue)
        CROSS JOIN LATERAL ({
    _NEXT.format(where=_PLAIN + " AND j.queue = q.queue", cursor="t", columns="j.priority, j.seq")
}) AS n ORDER BY n.priority DESC, n.seq LIMIT 1"""  # noqa: S608 - constants
_GROUPED = "j.status = 'queued' AND j.group_key IS NOT NULL"
_GROUPED_COLUMNS = "j.seq, j.priority, j.group_key, j.task, j.queue"
_TAKE_READY = f"""first_grouped (n, seq, priority, group_key, task, queue) AS (
    (SELECT 1, {_GROUPED_COLUMNS} FROM asyncjobs_jobs AS j
     WHERE {_GROUPED} ORDER BY j.priority DESC, j.seq LIMIT 1)
    UNION ALL
    SELECT f.n + 1, x.* FROM first_grouped AS f CROSS JOIN LATERAL (
        {_NEXT.format(where=_GROUPED, cursor="f", columns=_GROUPED_COLUMNS)}) AS x
    WHERE f.n < {{window}}
), window_heads AS MATERIALIZED (
    SELECT array_agg(w.seq ORDER BY w.priority DESC, w.seq) AS seqs,
        array_agg(w.priority ORDER BY w.priority DESC, w.seq) AS priorities
    FROM first_grouped AS w
    WHERE w.task = ANY($4::text[]) {{queues_w}} AND {HEADS_GROUP.format(j="w")}
), window_end AS MATERIALIZED (
    SELECT w.seq, w.priority FROM first_grouped AS w
    WHERE (SELECT count(*) FROM first_grouped) >= {{window}}
    ORDER BY w.priority, w.seq DESC LIMIT 1
), {GROUP_WALK}, walk_heads AS MATERIALIZED (
    SELECT array_agg(f.seq ORDER BY f.priority DESC, f.seq) AS seqs,
        array_agg(f.priority ORDER BY f.priority DESC, f.seq) AS priorities
    FROM group_first AS f, window_end AS e  -- past the window: those in it are its heads
    WHERE {_AFTER.format(x="f", y="e")}
      AND f.status = 'queued' AND f.task = ANY($4::text[]) {{queues_f}}
      AND {GROUP_IDLE.format(j="f")}
), taken (priority, seq, considered, got, walked, next_h, next_w) AS (
    SELECT 2147483647, 0::bigint, 0, NULL::bigint, false, 1, 1
    UNION ALL
    SELECT c.priority, c.seq, t.considered + (l.seq IS NOT NULL OR a.spare IS TRUE)::int,
        l.seq, t.walked OR {_PAST_WINDOW},
        t.next_h + (c.seq = h.seq IS TRUE)::int, t.next_w + (c.seq = w.seq IS TRUE)::int
    FROM taken AS t
    LEFT JOIN window_end AS e ON true
    LEFT JOIN LATERAL (
        {{plain_next}}
    ) AS p ON true
    LEFT JOIN LATERAL (
        SELECT h.priorities[t.next_h] AS priority, h.seqs[t.next_h] AS seq
        FROM window_heads AS h
    ) AS h ON true
    LEFT JOIN LATERAL (
        SELECT w.priorities[t.next_w] AS priority, w.seqs[t.next_w] AS seq
        FROM walk_heads AS w WHERE {_PAST_WINDOW}
        LIMIT 1  -- (one row: kept a subquery, so the walk runs only past the window)
    ) AS w ON true
    LEFT JOIN LATERAL (
        SELECT n.priority, n.seq
        FROM (VALUES (p.priority, p.seq), (h.priority, h.seq), (w.priority, w.seq))
            AS n(priority, seq)
        WHERE n.seq IS NOT NULL ORDER BY n.priority DESC, n.seq LIMIT 1
    ) AS c ON true
    LEFT JOIN LATERAL (
        SELECT CASE WHEN t.considered >= $6 THEN (
            SELECT j.attempts + 1 >= {_MAX_ATTEMPTS_OF.format(t="j")} FROM asyncjobs_jobs AS j
            WHERE j.seq = c.seq) END AS spare
    ) AS a ON true
    LEFT JOIN LATERAL (
        SELECT j.seq FROM asyncjobs_jobs AS j
        WHERE a.spare IS NOT TRUE AND j.seq = c.seq AND {_STILL_QUEUED}
          AND (t.considered < $6 OR j.attempts + 1 < {_MAX_ATTEMPTS_OF.format(t="j")})
        FOR UPDATE SKIP LOCKED
    ) AS l ON true
    WHERE t.seq IS NOT NULL AND t.considered < {{limit}}
)"""  # noqa: S608 - constants


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


_GOES_ON = (OutcomeKind.RETRY, OutcomeKind.RELEASE)

DEADLOCK_TRIES = 3
"""Tries of a statement or transaction that PostgreSQL keeps ending to break deadlocks."""

GROUP_RUNNING = "asyncjobs_jobs_group_running"
"""The unique index that holds one running job per group (migration 0011)."""


async def retry_deadlocks(what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` (one statement, or one whole transaction), again if PostgreSQL ended
    it to break a deadlock: rolled back, nothing of it stayed. Operations that lock many
    rows (a purge, a bulk retry, a finish of jobs that lease recovery took meanwhile) can
    meet others in an order that no lock order rules out. A claim is made again too when
    another claim took a job of one of its groups at once (``GROUP_RUNNING``): the next
    try sees that job running."""
    for tries in range(1, DEADLOCK_TRIES + 1):
        try:
            return await attempt()
        except asyncpg.DeadlockDetectedError:
            if tries == DEADLOCK_TRIES:
                raise
            logger.info("PostgreSQL store: %s ended by a deadlock; trying again", what)
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name != GROUP_RUNNING or tries == DEADLOCK_TRIES:
                raise
            logger.info(
                "PostgreSQL store: %s took a group's job as another claim took one; trying again",
                what,
            )
    raise AssertionError("unreachable")  # pragma: no cover


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
