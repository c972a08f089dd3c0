"""``SQLiteStore``: the default store, one SQLite file in WAL mode.

Every operation is one call into aiosqlite's connection thread that runs the
whole transaction there (``BEGIN IMMEDIATE`` … ``COMMIT``), so an operation costs
one thread round trip however many statements it takes. Write transactions
begin IMMEDIATE, wait on the busy timeout and are retried a bounded number of
times, so several processes can share the file without "database is locked"
reaching a user.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from asyncjobs._errors import ConfigurationError, StoreError
from asyncjobs.stores._dependents import (
    COUNTS_FLAG,
    RESULT_FLAG,
    prepend_result,
    wants,
    with_batch,
)
from asyncjobs.stores._protocol import (
    Claimed,
    ClaimRequest,
    FinishedSample,
    Inserted,
    JobRow,
    NewJob,
    OpsSnapshot,
    Outcome,
    OutcomeKind,
    Recovered,
    StuckJob,
    WorkerBeat,
    WorkerRow,
)
from asyncjobs.stores._sqlite_limits import choose, has_limits
from asyncjobs.stores._sqlite_side import (
    ChangeWatch,
    Checkpointer,
    InlineWriter,
    hand_checkpoints_over,
    is_busy,
)

logger = logging.getLogger(__name__)

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
_PENDING = ("scheduled", "queued")
_SYNCHRONOUS = {
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

_REQUEUE = (
    "status = 'queued', run_at = ?, finished_at = NULL, lease_until = NULL, worker = NULL, "
    "max_attempts = max(max_attempts, attempts + 1)"
)
"""A manual retry: queued now, with one more attempt than it had (``run_at`` first)."""

INLINE_ROWS = 100
"""The most rows a write may touch on the event loop thread (InlineWriter): a hundred
inserts or finishes hold the loop one to two milliseconds. A runner claims at most this
many jobs at a time, so its finish-and-claim fits."""

_BUSY_RETRIES = 5
"""How many busy timeouts a write waits out before it gives up with StoreError."""

SCHEMA_VERSION_TABLE = "asyncjobs_migrations"


def _row(values: Sequence[Any]) -> JobRow:
    return JobRow._make(values)


def _while_busy(db: sqlite3.Connection, write: Callable[[], T]) -> T:
    """Run ``write`` (one statement, or a whole transaction), again while the file is
    busy: busy_timeout already waited; a few more rounds ride out a long writer."""
    for attempt in range(_BUSY_RETRIES):
        try:
            return write()
        except sqlite3.OperationalError as error:
            if is_busy(error) and attempt < _BUSY_RETRIES - 1 and not db.in_transaction:
                logger.warning("SQLite store busy, retrying the write (%d)", attempt + 1)
                continue
            raise
    raise sqlite3.OperationalError("database is locked")  # pragma: no cover - loop returns


def _switch_to_wal(db: sqlite3.Connection) -> tuple[str]:
    """``PRAGMA journal_mode=WAL``, retried: when several processes open a new file at
    once, the switch can fail with SQLITE_BUSY without waiting on the busy timeout."""
    for attempt in range(_WAL_RETRIES):
        try:
            row: tuple[str] = db.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as error:
            if not is_busy(error) or attempt == _WAL_RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))  # in the connection thread, not the loop
        else:
            return row
    raise AssertionError("unreachable")  # pragma: no cover


_WAL_RETRIES = 30


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("asyncjobs.stores").joinpath("migrations", "sqlite")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


def _statements(script: str) -> list[str]:
    """Split a migration script into complete statements."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--") and not current:
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ConfigurationError(f"incomplete SQL statement in migration: {current[:80]!r}")
    return statements


def migrate(db: sqlite3.Connection) -> None:
    """Create or upgrade the schema through ``db`` (any sqlite3 connection)."""
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    (current,) = db.execute(
        f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}"  # noqa: S608 - constant
    ).fetchone()
    for version, script in _migrations():
        if version <= current:
            continue
        for statement in _statements(script):
            db.execute(statement)
        db.execute(
            f"INSERT INTO {SCHEMA_VERSION_TABLE} (version, applied_at) VALUES (?, ?)",  # noqa: S608
            (version, time.time()),  # noqa: TID251 - bookkeeping only, not job time
        )


class SQLiteStore:
    """A job store in one SQLite file (WAL). Safe for several processes on one host."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        busy_timeout: float = 5.0,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._watch: ChangeWatch | None = None
        self._inline: InlineWriter | None = None  # synchronous=NORMAL only

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- plumbing --------------------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        pending = aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await pending
        except (OSError, sqlite3.Error) as error:
            # aiosqlite stops its thread on a failed connect but does not wait for it;
            # wait here, with the loop alive, or the thread reports to a closed loop.
            if pending._thread.is_alive():
                await anyio.to_thread.run_sync(pending._thread.join, 5.0)
            raise StoreError(f"cannot open the SQLite store at {self.path}: {error}") from error
        # aiosqlite exposes no public way to run a function in its connection thread;
        # _execute is how its own methods do it, and it saves a round trip per statement.
        raw = db._connection
        if raw is None or not hasattr(db, "_execute"):  # pragma: no cover - aiosqlite changed
            await db.close()
            raise StoreError("this aiosqlite version is not supported; install aiosqlite<0.23")
        self._db, self._raw = db, raw
        try:
            await self._call(self._setup)
            self._checkpointer = Checkpointer(self.path)
            self._watch = await self._call(lambda _: ChangeWatch(self.path))
            if self.synchronous == "NORMAL":  # FULL fsyncs each commit: not on the loop
                self._inline = await self._call(lambda _: InlineWriter(self.path))
        except BaseException:
            await self.close()
            raise

    def _setup(self, db: sqlite3.Connection) -> None:
        (mode,) = _switch_to_wal(db)
        if str(mode).lower() != "wal":
            raise StoreError(f"could not switch {self.path} to WAL mode (got {mode!r})")
        # PRAGMAs take no parameters: a fixed statement per setting; the busy timeout
        # is set by connect(timeout=...) through sqlite3_busy_timeout.
        db.execute(_SYNCHRONOUS[self.synchronous])
        hand_checkpoints_over(db)
        self._write(db, migrate)

    async def close(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        watch, self._watch = self._watch, None
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()
        if checkpointer is not None:
            await checkpointer.close()
        if watch is not None:
            watch.close()
        db, self._db, self._raw = self._db, None, None
        if db is not None:
            await db.close()

    async def _call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(connection, ...)`` in the connection thread; map driver errors."""
        db, raw = self._db, self._raw
        if db is None or raw is None:
            await self.open()
            db, raw = self._db, self._raw
            assert db is not None  # noqa: S101 - set by open()
            assert raw is not None  # noqa: S101 - set by open()
        try:
            result: T = await db._execute(fn, raw, *args, **kwargs)  # type: ignore[no-untyped-call]
        except sqlite3.Error as error:
            raise StoreError(f"SQLite store {self.path}: {error}") from error
        return result

    @staticmethod
    def _write(
        db: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` in a write transaction that begins IMMEDIATE (in the thread)."""

        def transaction() -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db, *args, **kwargs)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return _while_busy(db, transaction)

    @staticmethod
    def _statement(
        db: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn``, which runs exactly one write statement, in autocommit mode."""
        return _while_busy(db, lambda: fn(db, *args, **kwargs))

    async def _transaction(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        result = await self._call(self._write, fn, *args, **kwargs)
        self._committed()
        return result

    async def _on_loop(
        self,
        transaction: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """Run a write of at most ``INLINE_ROWS`` rows on the event loop thread
        (``InlineWriter``: synchronous=NORMAL, file free right now); ``fn`` runs one
        statement unless ``transaction``. None: not written, go through the thread."""
        if self._inline is None:
            return None
        # Let the loop run first, as the thread's round trip would: a producer that
        # enqueues in a loop must not starve every other task (and a cancellation
        # arriving here leaves nothing written).
        await anyio.lowlevel.checkpoint()
        write = self._inline.try_transaction if transaction else self._inline.try_write
        try:
            result = write(fn, *args, **kwargs)
        except sqlite3.Error as error:
            raise StoreError(f"SQLite store {self.path}: {error}") from error
        if result is not None:
            self._committed()
        return result

    async def _short_transaction(
        self,
        rows: int,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A transaction touching about ``rows`` rows: on the loop if it is short and
        the file is free, else in the connection thread."""
        if rows <= INLINE_ROWS:
            result = await self._on_loop(True, fn, *args, **kwargs)
            if result is not None:
                return result
        return await self._transaction(fn, *args, **kwargs)

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float) -> Inserted:
        if len(jobs) <= _INSERT_CHUNK and all(j.idempotency_key is None for j in jobs):
            # The common enqueue is one INSERT statement, atomic on its own (autocommit);
            # like BEGIN IMMEDIATE it takes the write lock up front, in two fewer steps.
            # A group commit's batch goes in on the loop when the file is free.
            if len(jobs) <= INLINE_ROWS:
                ids = await self._on_loop(False, insert_jobs, jobs, now)
                if ids is not None:
                    return ids
            ids = await self._call(self._statement, insert_jobs, jobs, now)
            self._committed()
            return ids
        return await self._transaction(insert_jobs, jobs, now)

    # -- claim and finish ------------------------------------------------------------

    async def claim(self, request: ClaimRequest, *, now: float) -> list[JobRow]:
        if request.limit <= 0 or not request.tasks:
            return []
        return await self._short_transaction(request.limit, _claim, request, now)

    async def finish(self, outcomes: Sequence[Outcome], *, now: float) -> list[str]:
        if not outcomes:
            return []
        return await self._short_transaction(len(outcomes), _finish, outcomes, now)

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        if request.limit <= 0 or not request.tasks:
            return await self.finish(outcomes, now=now), []
        rows = max(len(outcomes), request.limit)
        return await self._short_transaction(rows, _finish_and_claim, outcomes, request, now)

    async def heartbeat(
        self, job_ids: Sequence[str], *, worker: str, lease_until: float
    ) -> set[str]:
        if not job_ids:
            return set()
        return await self._transaction(_heartbeat, job_ids, worker, lease_until)

    async def recover(self, *, now: float) -> list[Recovered]:
        return await self._transaction(_recover, now)

    async def next_run_at(self) -> float | None:
        # A runner asks each time it goes idle: an index lookup, read on the loop.
        try:
            rows = None if self._watch is None else self._watch.try_read(_next_run_at)
        except sqlite3.Error as error:
            raise StoreError(f"SQLite store {self.path}: {error}") from error
        if rows is None:
            rows = await self._call(_next_run_at)
        value = rows[0][0]
        return None if value is None else float(value)

    async def changed(self) -> bool:
        if self._watch is None:
            await self.open()
        assert self._watch is not None  # noqa: S101 - set by open()
        return self._watch.changed()

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobRow | None:
        rows = await self._call(
            _fetchall,
            f"SELECT {_SELECT} FROM asyncjobs_jobs WHERE id = ?",  # noqa: S608 - constant columns
            (job_id,),
        )
        return _row(rows[0]) if rows else None

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
        where, params = _status_filter(status, now)
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if task is not None:
            where.append("task = ?")
            params.append(task)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        sql = f"SELECT {_SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant columns
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [_row(r) for r in await self._call(_fetchall, sql, tuple(params))]

    async def retry(self, job_id: str, *, now: float) -> bool:
        return await self._transaction(_retry, job_id, now)

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        return await self._transaction(_cancel, job_ids, now)

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        where, params = _status_filter(status, now)
        if older_than is not None:
            where.append("finished_at < ?")
            params.append(older_than)
        if not where:
            raise ValueError("purge() needs a status or older_than")
        where.append("status != 'running'")
        # Only fixed terms with ? placeholders are joined here; values go in params.
        sql = "DELETE FROM asyncjobs_jobs WHERE " + " AND ".join(where)  # noqa: S608
        return await self._transaction(_rowcount, sql, tuple(params))

    async def set_progress(self, job_id: str, progress: float, message: str | None) -> None:
        await self._transaction(
            _rowcount,
            "UPDATE asyncjobs_jobs SET progress = ?, progress_message = ? "
            "WHERE id = ? AND status = 'running'",
            (progress, message, job_id),
        )

    async def counts(self, *, now: float) -> dict[tuple[str, str, str], int]:
        rows = await self._call(
            _fetchall,
            "SELECT queue, task, CASE WHEN status IN ('scheduled', 'queued') THEN "
            "CASE WHEN run_at > ? THEN 'scheduled' ELSE 'queued' END ELSE status END AS s, "
            "count(*) FROM asyncjobs_jobs GROUP BY queue, task, s",
            (now,),
        )
        return {(q, t, s): n for q, t, s, n in rows}

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        return dict(await self._call(_batch_counts, batch_id))

    # -- operations (see asyncjobs/_stats.py) -----------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        return await self._call(_read, _snapshot, now, windows, sample, workers_since)

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        await self._transaction(_record_worker, beat, now)

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        return await self._transaction(_prune, finished_before, dead_before, workers_before, limit)

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        return await self._transaction(
            _rowcount,
            f"UPDATE asyncjobs_jobs SET {_REQUEUE} "  # noqa: S608 - constant
            "WHERE status = 'dead' AND (? IS NULL OR queue = ?) AND (? IS NULL OR task = ?)",
            (now, queue, queue, task, task),
        )

    async def delete(self, job_ids: Sequence[str]) -> int:
        if not job_ids:
            return 0
        return await self._transaction(
            _rowcount,
            "DELETE FROM asyncjobs_jobs WHERE status != 'running' "
            "AND id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(job_ids)),),
        )

    async def meta(self, key: str, default: str) -> str:
        return await self._transaction(_meta, key, default)


# -- the functions below run in the connection thread, inside a transaction ---------


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


def _fetchall(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _next_run_at(db: sqlite3.Connection) -> list[Any]:
    # INDEXED BY: the planner picks the (status, seq) index and reads every scheduled row
    # (1 ms with 10,000 of them) instead of the first of this one.
    return db.execute(
        "SELECT min(run_at) FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_scheduled "
        "WHERE status = 'scheduled'"
    ).fetchall()


def _rowcount(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return db.execute(sql, params).rowcount


def _status_filter(status: str | None, now: float) -> tuple[list[str], list[Any]]:
    """WHERE terms for a status as users see it (scheduled/queued follow run_at)."""
    if status is None:
        return [], []
    if status == "scheduled":
        return ["status IN ('scheduled', 'queued')", "run_at > ?"], [now]
    if status == "queued":
        return ["status IN ('scheduled', 'queued')", "run_at <= ?"], [now]
    return ["status = ?"], [str(status)]


_INSERT_HEAD = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, options, "
    "max_attempts, run_at, enqueued_at, idempotency_key, group_key, chain_next, batch_id, "
    "rate_key) VALUES "
)
_INSERT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# With a job dispatched at insert: four columns more. Only then, as the driver binds
# every parameter holding the GIL.
_INSERT_STARTED_HEAD = _INSERT_HEAD[: -len(") VALUES ")] + (
    ", attempts, started_at, lease_until, worker) VALUES "
)
_INSERT_STARTED_ROW = _INSERT_ROW[:-1] + ", ?, ?, ?, ?)"
_INSERT_TAIL = " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
_NOT_STARTED = (0, None, None, None)
_INSERT_CHUNK = 500
"""Rows per INSERT statement (at most 19 values each, well under SQLite's 32,766)."""


def insert_jobs(db: sqlite3.Connection, jobs: Sequence[NewJob], now: float) -> Inserted:
    """Insert ``jobs`` through ``db`` (already in a transaction); return their ids.

    Also used by transactional enqueue on the caller's own connection. One multi-row
    statement per chunk rather than ``executemany``: each statement step releases and
    retakes the GIL, and under a busy event loop every retake can wait.
    """
    seqs: dict[str, int] = {}
    for start in range(0, len(jobs), _INSERT_CHUNK):
        chunk = jobs[start : start + _INSERT_CHUNK]
        dispatched = any(j.worker is not None for j in chunk)
        values: list[Any] = []
        for j in chunk:
            values += (
                j.id, j.task, j.queue, j.status, j.priority, j.payload, j.options,
                j.max_attempts, j.run_at, now, j.idempotency_key, j.group_key,
                j.chain_next, j.batch_id, j.rate_key,
            )  # fmt: skip
            if dispatched:  # a dispatched job's first attempt starts now
                values += _NOT_STARTED if j.worker is None else (1, now, j.lease_until, j.worker)
        head = _INSERT_STARTED_HEAD if dispatched else _INSERT_HEAD
        row = _INSERT_STARTED_ROW if dispatched else _INSERT_ROW
        sql = head + ", ".join([row] * len(chunk)) + _INSERT_TAIL
        if dispatched:  # the runner needs their seq; RETURNING lists every inserted row
            returned = db.execute(sql + " RETURNING id, seq, worker", values).fetchall()
            seqs.update((job_id, seq) for job_id, seq, worker in returned if worker is not None)
        else:
            db.execute(sql, values)
    keys = [j.idempotency_key for j in jobs if j.idempotency_key is not None]
    if not keys:
        return Inserted([j.id for j in jobs], seqs=seqs)
    stored = dict(
        db.execute(
            "SELECT idempotency_key, id FROM asyncjobs_jobs WHERE idempotency_key IN "
            "(SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        ).fetchall()
    )
    ids = [j.id if j.idempotency_key is None else stored[j.idempotency_key] for j in jobs]
    return Inserted(ids, seqs=seqs)


def _claim(db: sqlite3.Connection, request: ClaimRequest, now: float) -> Claimed:
    db.execute(
        # INDEXED BY: as in next_run_at, the due rows only, not every scheduled one.
        "UPDATE asyncjobs_jobs INDEXED BY asyncjobs_jobs_scheduled SET status = 'queued' "
        "WHERE status = 'scheduled' AND run_at <= ?",
        (now,),
    )
    attempts = json.dumps({name: limits.max_attempts for name, limits in request.tasks.items()})
    params: list[Any] = [now, now + request.lease, request.worker, attempts]
    next_token_at = None
    if has_limits(request):  # concurrency, rate limits: chosen in Python, same transaction
        seqs, next_token_at = choose(db, request, now)
        if not seqs:
            return Claimed(next_token_at=next_token_at)
        pick = "SELECT value FROM json_each(?)"
        params.append(json.dumps(seqs))
    else:  # the fast path: one statement
        queue_filter = ""
        params.append(json.dumps(list(request.tasks)))
        if request.queues is not None:
            queue_filter = "AND j.queue IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(request.queues)))
        params.append(request.limit)
        pick = _PICK_READY.format(queue_filter=queue_filter)
    rows = db.execute(
        f"""
        UPDATE asyncjobs_jobs SET
            status = 'running', attempts = attempts + 1, started_at = ?, lease_until = ?,
            worker = ?, progress = NULL, progress_message = NULL,
            -- The claimer's definition applies unless retries were given at enqueue;
            -- never below this attempt (a manual retry allows one more).
            max_attempts = max(attempts + 1, CASE
                -- Corrupt options must not fail the whole claim (the runner sends that
                -- job to dead); CASE evaluates in order, so json_extract sees valid JSON.
                WHEN options IS NOT NULL AND NOT json_valid(options) THEN max_attempts
                WHEN json_extract(options, '$.retries') IS NOT NULL THEN max_attempts
                ELSE coalesce((SELECT value FROM json_each(?) WHERE key = task), max_attempts)
                END)
        WHERE seq IN ({pick}) AND status = 'queued'
        RETURNING {_SELECT}
        """,  # noqa: S608 - only constants are interpolated
        params,
    ).fetchall()
    claimed = Claimed(sorted((_row(r) for r in rows), key=lambda r: (-r.priority, r.seq)))
    claimed.next_token_at = next_token_at
    return claimed


# INDEXED BY: without ANALYZE statistics the planner prefers the (status, seq) index
# and sorts every queued row on each claim (38 ms per claim with a 100k backlog); the
# partial ready index yields them already in claim order (0.04 ms).
_PICK_READY = """
            SELECT j.seq FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready
            WHERE j.status = 'queued'
              AND j.task IN (SELECT value FROM json_each(?)) {queue_filter}
              AND (j.group_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM asyncjobs_jobs AS g
                    WHERE g.group_key = j.group_key AND g.seq < j.seq
                      AND g.status IN ('scheduled', 'queued', 'running')))
            ORDER BY j.priority DESC, j.seq
            LIMIT ?"""


_FINISH_SQL = {
    OutcomeKind.SUCCEEDED: (
        "status = 'succeeded', result = ?, error = NULL, finished_at = ?, lease_until = NULL"
    ),
    OutcomeKind.DEAD: "status = 'dead', result = ?, error = ?, finished_at = ?, lease_until = NULL",
    OutcomeKind.CANCELLED: (
        "status = 'cancelled', result = ?, error = ?, finished_at = ?, lease_until = NULL"
    ),
    OutcomeKind.RETRY: (
        "status = 'scheduled', result = ?, error = ?, run_at = ?, lease_until = NULL, worker = NULL"
    ),
    OutcomeKind.RELEASE: (
        "status = 'queued', result = ?, attempts = attempts - 1, lease_until = NULL, worker = NULL"
    ),
}


def _finish_and_claim(
    db: sqlite3.Connection, outcomes: Sequence[Outcome], request: ClaimRequest, now: float
) -> tuple[list[str], Claimed]:
    applied = _finish(db, outcomes, now)
    return applied, _claim(db, request, now)


# Every success of a flush in one statement (the common case: no-op jobs finish by
# the dozen). Each outcome is a JSON array [id, worker, attempt, result, max_attempts].
_FINISH_SUCCEEDED = """
    UPDATE asyncjobs_jobs INDEXED BY sqlite_autoindex_asyncjobs_jobs_1
    SET status = 'succeeded', result = json_extract(o.value, '$[3]'),
        error = NULL, finished_at = ?, lease_until = NULL,
        max_attempts = coalesce(json_extract(o.value, '$[4]'), max_attempts)
    FROM json_each(?) AS o
    WHERE asyncjobs_jobs.id = json_extract(o.value, '$[0]')
      AND asyncjobs_jobs.status = 'running'
      AND asyncjobs_jobs.worker = json_extract(o.value, '$[1]')
      AND asyncjobs_jobs.attempts = json_extract(o.value, '$[2]')
    RETURNING asyncjobs_jobs.id, chain_next, batch_id"""


def _finish(db: sqlite3.Connection, outcomes: Sequence[Outcome], now: float) -> list[str]:
    applied: list[str] = []
    successes = [o for o in outcomes if o.kind is OutcomeKind.SUCCEEDED]
    if len(successes) > 1:
        outcomes = [o for o in outcomes if o.kind is not OutcomeKind.SUCCEEDED]
        results = {o.job_id: o.result for o in successes}
        encoded = json.dumps(
            [[o.job_id, o.worker, o.attempt, o.result, o.max_attempts] for o in successes]
        )
        for job_id, chain_next, batch_id in db.execute(
            _FINISH_SUCCEEDED, (now, encoded)
        ).fetchall():
            applied.append(job_id)
            if chain_next is not None or batch_id is not None:
                _release_dependents(
                    db, OutcomeKind.SUCCEEDED, chain_next, batch_id, now, results[job_id]
                )
    for o in outcomes:
        if o.kind is OutcomeKind.SUCCEEDED:
            values: tuple[Any, ...] = (o.result, now)
        elif o.kind is OutcomeKind.RETRY:
            values = (o.result, o.error, o.run_at)
        elif o.kind is OutcomeKind.RELEASE:
            values = (o.result,)
        else:
            values = (o.result, o.error, now)
        row = db.execute(
            f"UPDATE asyncjobs_jobs SET {_FINISH_SQL[o.kind]}, "  # noqa: S608 - constant
            "max_attempts = coalesce(?, max_attempts) "
            "WHERE id = ? AND status = 'running' AND worker = ? AND attempts = ? "
            "RETURNING chain_next, batch_id",
            (*values, o.max_attempts, o.job_id, o.worker, o.attempt),
        ).fetchone()
        if row is None:
            continue
        applied.append(o.job_id)
        _release_dependents(db, o.kind, row[0], row[1], now, o.result)
    return applied


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
            _rewrite_waiting(db, chain_next, RESULT_FLAG, lambda p: prepend_result(p, result))
            db.execute(
                "UPDATE asyncjobs_jobs SET status = CASE WHEN run_at > ? THEN 'scheduled' "
                "ELSE 'queued' END, run_at = max(run_at, ?) WHERE id = ? AND status = 'waiting'",
                (now, now, chain_next),
            )
        else:
            _cancel(db, [chain_next], now, reason="an earlier job in its chain did not succeed")
    if batch_id is not None:
        (left,) = db.execute(
            "SELECT count(*) FROM asyncjobs_jobs WHERE batch_id = ? "
            "AND status IN ('waiting', 'scheduled', 'queued', 'running')",
            (batch_id,),
        ).fetchone()
        if left == 0:
            _rewrite_waiting(
                db,
                batch_id,
                COUNTS_FLAG,
                lambda p: with_batch(p, batch_id, dict(_batch_counts(db, batch_id))),
            )
            db.execute(
                "UPDATE asyncjobs_jobs SET status = 'queued', run_at = ? "
                "WHERE id = ? AND status = 'waiting'",
                (now, batch_id),
            )


def _rewrite_waiting(
    db: sqlite3.Connection, job_id: str, flag: str, rewrite: Callable[[str], str]
) -> None:
    """Rewrite the payload of waiting job ``job_id`` if its options set ``flag``."""
    row = db.execute(
        "SELECT payload, options FROM asyncjobs_jobs WHERE id = ? AND status = 'waiting'",
        (job_id,),
    ).fetchone()
    if row is not None and wants(row[1], flag):
        db.execute("UPDATE asyncjobs_jobs SET payload = ? WHERE id = ?", (rewrite(row[0]), job_id))


def _batch_counts(db: sqlite3.Connection, batch_id: str) -> list[tuple[str, int]]:
    return db.execute(
        "SELECT status, count(*) FROM asyncjobs_jobs WHERE batch_id = ? GROUP BY status",
        (batch_id,),
    ).fetchall()


def _heartbeat(
    db: sqlite3.Connection, job_ids: Sequence[str], worker: str, lease_until: float
) -> set[str]:
    rows = db.execute(
        "UPDATE asyncjobs_jobs SET lease_until = ? WHERE status = 'running' AND worker = ? "
        "AND id IN (SELECT value FROM json_each(?)) RETURNING id",
        (lease_until, worker, json.dumps(list(job_ids))),
    ).fetchall()
    return {r[0] for r in rows}


def _recover(db: sqlite3.Connection, now: float) -> list[Recovered]:
    rows = db.execute(
        """
        UPDATE asyncjobs_jobs SET
            status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
            error = CASE WHEN attempts >= max_attempts
                THEN 'lease expired: the worker running attempt ' || attempts ||
                     ' stopped heartbeating (crashed or killed) and no attempts are left'
                ELSE error END,
            finished_at = CASE WHEN attempts >= max_attempts THEN ? ELSE NULL END,
            lease_until = NULL, worker = NULL
        WHERE status = 'running' AND lease_until < ?
        RETURNING id, task, attempts, status, chain_next, batch_id
        """,
        (now, now),
    ).fetchall()
    recovered = []
    for job_id, task, attempts, status, chain_next, batch_id in rows:
        dead = status == "dead"
        if dead:
            _release_dependents(db, OutcomeKind.DEAD, chain_next, batch_id, now)
        recovered.append(Recovered(id=job_id, task=task, attempts=attempts, dead=dead))
    return recovered


def _retry(db: sqlite3.Connection, job_id: str, now: float) -> bool:
    row = db.execute(
        f"UPDATE asyncjobs_jobs SET {_REQUEUE} "  # noqa: S608 - constant
        "WHERE id = ? AND status IN ('dead', 'cancelled') RETURNING id",
        (now, job_id),
    ).fetchone()
    return row is not None


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
            "WHERE id = ? AND status IN ('waiting', 'scheduled', 'queued', 'running') "
            "RETURNING chain_next, batch_id",
            (now, reason, job_id),
        ).fetchone()
        if row is None:
            continue
        cancelled.append(job_id)
        chain_next, batch_id = row
        if chain_next is not None:
            pending.append(chain_next)
        if batch_id is not None:
            _release_dependents(db, OutcomeKind.CANCELLED, None, batch_id, now)
    return cancelled


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
    oldest_due: dict[tuple[str, str], float] = {}
    for queue, task, scheduled, queued, oldest in db.execute(
        "SELECT queue, task, sum(run_at > ?), sum(run_at <= ?), "
        "min(CASE WHEN run_at <= ? THEN run_at END) FROM asyncjobs_jobs "
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
            "INDEXED BY asyncjobs_jobs_finished WHERE finished_at >= ? "
            "GROUP BY queue, task, status",
            (*since_each, min(since_each)),
        )
        for queue, task, status, *per_window in rows:
            finished[(queue, task, status)] = [int(n or 0) for n in per_window]
    samples = [
        FinishedSample(queue=q, task=t, status=st, run_at=r, started_at=s, finished_at=f)
        for q, t, st, r, s, f in db.execute(
            "SELECT queue, task, status, run_at, started_at, finished_at FROM asyncjobs_jobs "
            "INDEXED BY asyncjobs_jobs_finished WHERE finished_at IS NOT NULL "
            "AND status IN ('succeeded', 'dead') ORDER BY finished_at DESC LIMIT ?",
            (sample,),
        )
    ]
    stuck = [
        StuckJob(id=i, queue=q, task=t, worker=w, attempts=a, lease_until=lu)
        for i, q, t, w, a, lu in db.execute(
            "SELECT id, queue, task, worker, attempts, lease_until FROM asyncjobs_jobs "
            "WHERE status = 'running' AND lease_until < ? ORDER BY lease_until LIMIT 1000",
            (now,),
        )
    ]
    workers = [
        WorkerRow(
            id=i, host=h, pid=p, started_at=sa, last_seen_at=ls, stopped_at=so, running=r,
            concurrency=c, queues=None if qs is None else tuple(json.loads(qs)),
        )
        for i, h, p, sa, ls, so, r, c, qs in db.execute(
            "SELECT id, host, pid, started_at, last_seen_at, stopped_at, running, concurrency, "
            "queues FROM asyncjobs_workers WHERE last_seen_at >= ? ORDER BY started_at, id",
            (since,),
        )
    ]  # fmt: skip
    return OpsSnapshot(
        counts=counts,
        oldest_due=oldest_due,
        finished=finished,
        samples=samples,
        stuck=stuck,
        workers=workers,
    )


def _record_worker(db: sqlite3.Connection, beat: WorkerBeat, now: float) -> None:
    db.execute(
        "INSERT INTO asyncjobs_workers (id, host, pid, started_at, last_seen_at, stopped_at, "
        "running, concurrency, queues) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET last_seen_at = excluded.last_seen_at, "
        "stopped_at = excluded.stopped_at, running = excluded.running",
        (
            beat.id, beat.host, beat.pid, beat.started_at, now, now if beat.stopped else None,
            beat.running, beat.concurrency,
            None if beat.queues is None else json.dumps(list(beat.queues)),
        ),
    )  # fmt: skip


def _prune(
    db: sqlite3.Connection, finished_before: float, dead_before: float, workers_before: float,
    limit: int,
) -> int:  # fmt: skip
    deleted = db.execute(
        "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT seq FROM asyncjobs_jobs "
        "INDEXED BY asyncjobs_jobs_finished WHERE finished_at < ? "
        "AND status IN ('succeeded', 'cancelled') LIMIT ?)",
        (finished_before, limit),
    ).rowcount
    if deleted < limit:
        deleted += db.execute(
            "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT seq FROM asyncjobs_jobs "
            "INDEXED BY asyncjobs_jobs_finished WHERE finished_at < ? AND status = 'dead' "
            "LIMIT ?)",
            (dead_before, limit - deleted),
        ).rowcount
    db.execute("DELETE FROM asyncjobs_workers WHERE last_seen_at < ?", (workers_before,))
    return int(deleted)


def _meta(db: sqlite3.Connection, key: str, default: str) -> str:
    db.execute(
        "INSERT INTO asyncjobs_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        (key, default),
    )
    (value,) = db.execute("SELECT value FROM asyncjobs_meta WHERE key = ?", (key,)).fetchone()
    return str(value)
