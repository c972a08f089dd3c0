"""What the SQL of ``PostgresStore`` shares: the connection types, the columns every
read of a job returns and the rows built from them, the JSON rows of bulk statements
(and their size limit), the schema's NOTIFY channel, and trying a statement again when
PostgreSQL ends it to break a deadlock. Each function runs on one asyncpg connection.

The SQL of the store's operations lives in modules beside this one:
``_postgres_enqueue`` (insert), ``_postgres_claim`` (claim), ``_postgres_finish``
(finish), ``_postgres_release`` (the chain and batch releases, or cancellations, that a
finished job sets off), ``_postgres_limits`` (flow control inside a claim) and
``_postgres_admin`` (operator and maintenance calls).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from asyncjobs.stores._protocol import PREVIEWED, JobRow, previewed

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
