"""``PostgresStore``: the store for many hosts, on asyncpg.

Claims take rows with ``FOR UPDATE SKIP LOCKED``, so any number of workers on
any number of hosts claim disjoint jobs without waiting on each other. Inserts
``NOTIFY`` the schema's channel (a statement trigger, so an insert made through
the application's own connection wakes workers too); one dedicated connection
``LISTEN``s and ``changed()`` reports what it heard. Polling stays the fallback.
That connection opens on the first ``changed()`` (a runner waiting for work), so
a process that only enqueues holds no extra connection and is not interrupted by
every insert's notification.

Connections: the pool (``pool_min`` to ``pool_max``) for everything but two
things; the LISTEN connection; and the enqueue connection, opened by the first
``insert``, so a lone producer skips the pool's acquire and release (inserts that
overlap it use the pool). Pool connections are the store's own and never change
session state, so they are released without asyncpg's reset round trip.

The schema lives in the first schema of the connection's ``search_path``
(``postgresql://host/db?search_path=jobs`` picks one). Migrations are numbered
files in ``migrations/postgres`` recorded in ``asyncjobs_migrations``; an advisory
lock keeps two processes from migrating at once.

Driver errors become ``StoreError`` here. While the server is unreachable every
operation fails at once with a ``StoreError`` saying so, and reconnecting is
tried again after an exponential backoff; a connection that died under a
restart is replaced and the operation retried once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from asyncjobs._errors import ConfigurationError, StoreError
from asyncjobs.stores import _postgres_sql as sql
from asyncjobs.stores._postgres_sql import (
    DRIVER_ERRORS,
    SELECT,
    insert_jobs,
    is_connection_error,
    job_row,
    migrate,
    notify,
    status_filter,
)
from asyncjobs.stores._protocol import (
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    OpsSnapshot,
    Outcome,
    Recovered,
    WorkerBeat,
)

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection, Pool

__all__ = ["PostgresStore", "insert_jobs"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


_REQUEUE = (
    "status = 'queued', run_at = $1, finished_at = NULL, lease_until = NULL, worker = NULL, "
    "max_attempts = greatest(max_attempts, attempts + 1)"
)
"""A manual retry: queued now, with one more attempt than it had (``run_at`` is $1)."""


async def _keep_session(conn: Connection) -> None:
    """Release a pooled connection without asyncpg's default reset round trip.

    The default runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: a round trip per store operation (0.15 ms of a
    0.6 ms enqueue when measured). Pool connections are this store's own and never
    change session state (no SET, LISTEN, session advisory lock or cursor outside
    a transaction; the LISTEN connection is not pooled), so there is nothing to
    reset. asyncpg still rolls back a transaction left open before calling this.
    """


class PostgresStore:
    """A job store in PostgreSQL, shared by any number of processes and hosts."""

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        try:
            pool_min = int(query.pop("pool_min", pool_min))
            pool_max = int(query.pop("pool_max", pool_max))
        except ValueError as error:
            raise ConfigurationError(f"pool_min/pool_max in {url!r} must be integers") from error
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ConfigurationError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
            )
        self.url = urlunsplit(parts._replace(query=urlencode(query)))
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self._pool: Pool | None = None
        self._opening = asyncio.Lock()
        self._listener: Connection | None = None
        self._producer: Connection | None = None
        self._producing = False
        self._channel: str | None = None
        self._schema: str | None = None
        self._notified = False
        self._failures = 0
        self._retry_at = 0.0

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"PostgresStore('postgresql://{host}{port}{parts.path}')"

    # -- connections -----------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._opening:
            if self._is_open():
                return
            async with self._errors("open"):
                pool = await asyncpg.create_pool(
                    self.url,
                    min_size=self.pool_min,
                    max_size=self.pool_max,
                    timeout=self.connect_timeout,
                    reset=_keep_session,
                )
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                        self._schema = await conn.fetchval("SELECT current_schema()")
                        self._channel = await conn.fetchval(
                            "SELECT left('asyncjobs:' || current_schema(), 63)"
                        )
                except BaseException:
                    await pool.close()
                    raise
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        producer, self._producer = self._producer, None
        for conn in (listener, producer):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except DRIVER_ERRORS:
                pool.terminate()

    def _is_open(self) -> bool:
        return self._pool is not None

    async def _listen(self) -> bool:
        """(Re)open the LISTEN connection; failures leave polling to do the work."""
        channel = self._channel
        if channel is None:
            return False
        try:
            conn = await asyncpg.connect(self.url, timeout=self.connect_timeout)
            try:
                await conn.add_listener(channel, self._on_notify)
            except BaseException:
                conn.terminate()
                raise
        except DRIVER_ERRORS as error:
            logger.warning("PostgreSQL store: cannot LISTEN (%s); polling instead", error)
            return False
        self._listener = conn
        return True

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._notified = True

    @contextlib.asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        """Map driver errors to StoreError; track reachability for the backoff."""
        try:
            yield
        except DRIVER_ERRORS as error:
            if not is_connection_error(error):
                raise StoreError(f"PostgreSQL store {self!r} ({what}): {error}") from error
            delay = self._backoff()
            raise StoreError(
                f"PostgreSQL store {self!r} is unreachable ({what}): "
                f"{type(error).__name__}: {error}; reconnecting in {delay:.1f}s"
            ) from error
        else:
            self._failures = 0

    def _backoff(self) -> float:
        """Count a failed connection; the next attempt waits 0.1 s, doubling up to max_backoff."""
        self._failures += 1
        delay = min(self.max_backoff, 0.1 * 2.0 ** (self._failures - 1))
        # Reconnect bookkeeping on the loop's clock; job time never comes from here.
        self._retry_at = asyncio.get_running_loop().time() + delay
        return delay

    async def _run(
        self, what: str, fn: Callable[[Connection], Awaitable[T]], *, producer: bool = False
    ) -> T:
        """Run ``fn`` on a pooled connection (``producer``: on the enqueue connection when
        it is free): open on first use, back off while down, and retry once when the
        connection turns out to have died (server restart)."""
        if self._failures and asyncio.get_running_loop().time() < self._retry_at:
            raise StoreError(
                f"PostgreSQL store {self!r} is unreachable ({what}); "
                "waiting before the next reconnect attempt"
            )
        if self._pool is None:
            await self.open()
        pool = self._pool
        if pool is None:
            raise StoreError(f"PostgreSQL store {self!r} is closed")
        async with self._errors(what):
            for attempt in (1, 2):
                try:
                    if producer and not self._producing:
                        return await self._on_producer(fn)
                    async with pool.acquire() as conn:
                        return await fn(conn)
                except (
                    asyncpg.ConnectionDoesNotExistError,
                    asyncpg.AdminShutdownError,
                    ConnectionResetError,
                ):
                    if attempt == 2:
                        raise
                    logger.info("PostgreSQL store: connection lost; retrying %s once", what)
            raise AssertionError("unreachable")  # pragma: no cover

    async def _on_producer(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn`` on the enqueue connection, the store's own outside the pool: a lone
        producer skips the pool's acquire and release (a task and loop iterations each
        time). Opened on first use; dropped (and opened again) after an error that is not
        the server's answer to the statement."""
        self._producing = True
        try:
            conn = self._producer
            if conn is None or conn.is_closed():
                if self._pool is None:  # closed meanwhile: open nothing it would not close
                    raise StoreError(f"PostgreSQL store {self!r} is closed")
                conn = await asyncpg.connect(self.url, timeout=self.connect_timeout)
                self._producer = conn
            try:
                return await fn(conn)
            except asyncpg.PostgresError:
                raise  # the statement failed, the connection is fine (or is_closed())
            except BaseException:  # cancelled, cut off: its state is unknown
                self._producer = None
                conn.terminate()
                raise
        finally:
            self._producing = False

    async def _transaction(self, what: str, fn: Callable[[Connection], Awaitable[T]]) -> T:
        async def in_transaction(conn: Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self._run(what, in_transaction)

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float) -> Inserted:
        if not jobs:
            return Inserted()
        # One INSERT statement, atomic on its own: no BEGIN/COMMIT round trips.
        return await self._run("enqueue", lambda conn: insert_jobs(conn, jobs, now), producer=True)

    async def insert_with(
        self, conn: Connection, jobs: Sequence[NewJob], *, now: float
    ) -> Inserted:
        """Insert through the caller's connection (and so its open transaction)."""
        await self.open()
        if self._schema is None:  # pragma: no cover - set by open()
            raise StoreError(f"PostgreSQL store {self!r} is closed")
        table = f'"{self._schema.replace(chr(34), chr(34) * 2)}".asyncjobs_jobs'
        async with self._errors("enqueue"):
            return await insert_jobs(conn, jobs, now, table=table)

    # -- claim and finish ------------------------------------------------------------

    async def claim(self, request: ClaimRequest, *, now: float) -> list[JobRow]:
        if request.limit <= 0 or not request.tasks:
            return []
        return await self._run("claim", lambda conn: sql.claim(conn, request, now))

    async def finish(self, outcomes: Sequence[Outcome], *, now: float) -> list[str]:
        if not outcomes:
            return []

        async def finish(conn: Connection) -> list[str]:
            # One statement for the usual job; a transaction only for chains and batches.
            applied = await sql.finish_plain(conn, outcomes, now)
            rest = [o for o in outcomes if o.job_id not in applied]
            if rest:
                async with conn.transaction():
                    applied.update(await sql.finish(conn, rest, now))
            return [o.job_id for o in outcomes if o.job_id in applied]

        return await self._run("finish", finish)

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        if request.limit <= 0 or not request.tasks:
            return await self.finish(outcomes, now=now), []

        async def both(conn: Connection) -> tuple[list[str], list[JobRow]]:
            # One transaction: one commit (one WAL flush) for the acks and the claim.
            async with conn.transaction():
                applied = await sql.finish_plain(conn, outcomes, now)
                rest = [o for o in outcomes if o.job_id not in applied]
                if rest:
                    applied.update(await sql.finish(conn, rest, now))
                claimed = await sql.claim(conn, request, now)
            return [o.job_id for o in outcomes if o.job_id in applied], claimed

        return await self._run("claim", both)

    async def heartbeat(
        self, job_ids: Sequence[str], *, worker: str, lease_until: float
    ) -> set[str]:
        if not job_ids:
            return set()
        rows = await self._run(
            "heartbeat",
            lambda conn: conn.fetch(
                "UPDATE asyncjobs_jobs SET lease_until = $1 WHERE status = 'running' "
                "AND worker = $2 AND id = ANY($3::text[]) RETURNING id",
                lease_until,
                worker,
                list(job_ids),
            ),
        )
        return {r["id"] for r in rows}

    async def recover(self, *, now: float) -> list[Recovered]:
        return await self._transaction("recover", lambda conn: sql.recover(conn, now))

    async def next_run_at(self) -> float | None:
        value = await self._run(
            "next_run_at",
            lambda conn: conn.fetchval(
                "SELECT min(run_at) FROM asyncjobs_jobs WHERE status = 'scheduled'"
            ),
        )
        return None if value is None else float(value)

    async def changed(self) -> bool:
        """True when a NOTIFY arrived since the last call; no round trip otherwise."""
        if self._pool is None:
            return False
        listener = self._listener
        if listener is None or listener.is_closed():
            # (Re)connect (with the backoff) and report a change: nothing was heard so
            # far, so the caller looks once more now that it will be told.
            self._listener = None
            if self._failures and asyncio.get_running_loop().time() < self._retry_at:
                return False
            if not await self._listen():
                self._backoff()
                return False
            return True
        notified, self._notified = self._notified, False
        return notified

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobRow | None:
        record = await self._run(
            "get",
            lambda conn: conn.fetchrow(
                f"SELECT {SELECT} FROM asyncjobs_jobs WHERE id = $1",  # noqa: S608 - constant
                job_id,
            ),
        )
        return None if record is None else job_row(record)

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
        now: float,
    ) -> list[JobRow]:
        params: list[Any] = []
        where = status_filter(status, now, params)
        for column, value in (("queue", queue), ("task", task), ("seq", before_seq)):
            if value is not None:
                params.append(value)
                op = "<" if column == "seq" else "="
                where.append(f"{column} {op} ${len(params)}")
        sql = f"SELECT {SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant columns
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(limit)
        sql += f" ORDER BY seq DESC LIMIT ${len(params)}"
        records = await self._run("list", lambda conn: conn.fetch(sql, *params))
        return [job_row(r) for r in records]

    async def retry(self, job_id: str, *, now: float) -> bool:
        async def retry(conn: Connection) -> bool:
            row = await conn.fetchrow(
                f"UPDATE asyncjobs_jobs SET {_REQUEUE} "  # noqa: S608 - constant
                "WHERE id = $2 AND status IN ('dead', 'cancelled') RETURNING id",
                now,
                job_id,
            )
            if row is None:
                return False
            await notify(conn)
            return True

        return await self._transaction("retry", retry)

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        return await self._transaction("cancel", lambda conn: sql.cancel(conn, job_ids, now))

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        params: list[Any] = []
        where = status_filter(status, now, params)
        if older_than is not None:
            params.append(older_than)
            where.append(f"finished_at < ${len(params)}")
        if not where:
            raise ValueError("purge() needs a status or older_than")
        where.append("status != 'running'")
        # Only fixed terms with $n placeholders are joined here; values go in params.
        sql = "DELETE FROM asyncjobs_jobs WHERE " + " AND ".join(where)  # noqa: S608
        result = await self._run("purge", lambda conn: conn.execute(sql, *params))
        return int(result.rsplit(" ", 1)[-1])

    async def set_progress(self, job_id: str, progress: float, message: str | None) -> None:
        await self._run(
            "set_progress",
            lambda conn: conn.execute(
                "UPDATE asyncjobs_jobs SET progress = $1, progress_message = $2 "
                "WHERE id = $3 AND status = 'running'",
                progress,
                message,
                job_id,
            ),
        )

    async def counts(self, *, now: float) -> dict[tuple[str, str, str], int]:
        rows = await self._run(
            "counts",
            lambda conn: conn.fetch(
                "SELECT queue, task, CASE WHEN status IN ('scheduled', 'queued') THEN "
                "CASE WHEN run_at > $1 THEN 'scheduled' ELSE 'queued' END ELSE status END AS s, "
                "count(*) AS n FROM asyncjobs_jobs GROUP BY 1, 2, 3",
                now,
            ),
        )
        return {(r["queue"], r["task"], r["s"]): r["n"] for r in rows}

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        rows = await self._run(
            "batch_counts",
            lambda conn: conn.fetch(
                "SELECT status, count(*) AS n FROM asyncjobs_jobs WHERE batch_id = $1 "
                "GROUP BY status",
                batch_id,
            ),
        )
        return {r["status"]: r["n"] for r in rows}

    # -- operations (see asyncjobs/_stats.py) -----------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        async def read(conn: Connection) -> OpsSnapshot:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await sql.snapshot(conn, now, windows, sample, workers_since)

        return await self._run("snapshot", read)

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        await self._run("record_worker", lambda conn: sql.record_worker(conn, beat, now))

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        return await self._transaction(
            "prune",
            lambda conn: sql.prune(conn, finished_before, dead_before, workers_before, limit),
        )

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        async def retry_dead(conn: Connection) -> int:
            status = await conn.execute(
                f"UPDATE asyncjobs_jobs SET {_REQUEUE} WHERE status = 'dead' "  # noqa: S608
                "AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR task = $3)",
                now,
                queue,
                task,
            )
            await notify(conn)
            return int(status.rsplit(" ", 1)[-1])

        return await self._transaction("retry_dead", retry_dead)

    async def delete(self, job_ids: Sequence[str]) -> int:
        if not job_ids:
            return 0
        status = await self._run(
            "delete",
            lambda conn: conn.execute(
                "DELETE FROM asyncjobs_jobs WHERE status != 'running' AND id = ANY($1::text[])",
                list(job_ids),
            ),
        )
        return int(status.rsplit(" ", 1)[-1])

    async def meta(self, key: str, default: str) -> str:
        return await self._run("meta", lambda conn: sql.meta(conn, key, default))
