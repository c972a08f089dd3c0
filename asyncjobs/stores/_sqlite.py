"""``SQLiteStore``: the default store, one SQLite file in WAL mode.

Every operation is one call into aiosqlite's connection thread that runs the
whole transaction there (``BEGIN IMMEDIATE`` … ``COMMIT``), so an operation costs
one thread round trip however many statements it takes. Write transactions
begin IMMEDIATE, wait on the busy timeout and are retried a bounded number of
times, so several processes can share the file without "database is locked"
reaching a user. The exceptions are the hot path's short writes (an enqueue, a
runner's claim and finish of at most ``INLINE_ROWS`` jobs) and an idle runner's
reads: with synchronous=NORMAL they run on the event loop thread when the file is
free, wait out another connection's short write there (trying again at every turn
of the loop, then in short pauses), and go
through the thread only when the file stays locked (``_sqlite_side``).

Pure reads (``get``, ``list``, the counts, the operations snapshot) go through a
second aiosqlite connection of their own, read-only, so that a read never waits
behind a write (``_sqlite_connections`` says why).

This module holds the store's constructor, its queries and its operator and
maintenance calls, with the SQL of deleting jobs (``delete``, ``purge``). The rest
lives in modules beside it: ``_sqlite_connections`` (the connections and the thread
calls above) and ``_sqlite_hot_path`` (enqueue, claim, finish, and the short writes
on the event loop thread), both of which ``SQLiteStore`` inherits; and the SQL it
runs, ``_sqlite_sql`` (enqueue, heartbeat), ``_sqlite_claim`` (claim),
``_sqlite_finish`` (finish, cancel, and the chain and batch releases), ``_sqlite_admin``
(operator and maintenance calls) and ``_sqlite_schema`` (WAL mode and migrations).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncjobs._errors import ConfigurationError
from asyncjobs.stores._claims import RateKeyed
from asyncjobs.stores._job_rows import JobRow
from asyncjobs.stores._opening import Opening
from asyncjobs.stores._ops_rows import OpsSnapshot, WorkerBeat
from asyncjobs.stores._protocol import (
    PREVIEWED,
    SEEN_KEY,
    SLOT_KEY,
    checked_preview,
    previewed,
)
from asyncjobs.stores._sqlite_admin import (
    ADMIN_BATCH,
    META_VALUE,
    _meta,
    _prune,
    _prune_buckets,
    _record_slot,
    _record_worker,
    _requeue_dead_batch,
    _retry,
    _snapshot,
)
from asyncjobs.stores._sqlite_connections import _STORES, _SYNCHRONOUS
from asyncjobs.stores._sqlite_finish import _batch_counts, _cancel, tally_deleted
from asyncjobs.stores._sqlite_hot_path import _HotPath
from asyncjobs.stores._sqlite_sql import (
    _PREVIEW_SELECT,
    _SELECT,
    COLUMNS,
    _read,
    _row,
    pending_keys,
    set_rate_keys,
)
from asyncjobs.stores._sqlite_walks import Walks
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGE_FOLLOWER, PURGEABLE

if TYPE_CHECKING:
    import aiosqlite

    from asyncjobs.stores._sqlite_side import ChangeWatch, Checkpointer, InlineWriter

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
"""How a URL begins (``sqlite://``, ``postgresql://``). ``open_store`` takes no name
with ``://`` for a path either (``sqlite_path``)."""

_URL_WITHOUT_SLASHES = re.compile(r"(sqlite|postgresql|postgres):(?!//)", re.IGNORECASE)
"""A store URL typed without its two slashes (``sqlite:jobs.db``, ``sqlite:/jobs.db``),
which ``open_store`` refuses too (``sqlite_path``). A ``Path`` made of a URL folds its
slashes into one: ``Path("sqlite:///jobs.db")`` is ``sqlite:/jobs.db``."""


def _in_memory(name: str) -> bool:
    """Whether ``name`` is how SQLite spells an in-memory database: ``:memory:``, or a
    ``file:`` URI naming one (``file::memory:``, ``file:x?mode=memory``)."""
    if name == ":memory:":
        return True
    return name.startswith("file:") and (":memory:" in name or "mode=memory" in name)


class SQLiteStore(_HotPath):
    """A job store in one SQLite file (WAL). Safe for several processes on one host."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        busy_timeout: float = 5.0,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be 'normal', 'full' or 'extra', got {synchronous!r}"
            )
        if _in_memory(os.fspath(path)):
            raise ConfigurationError(
                f"SQLite in-memory databases ({os.fspath(path)!r}) cannot hold jobs: each "
                "of the store's connections would see its own empty database, and nothing "
                "would outlive the process. Use a file; in tests a temporary one "
                "(tmp_path / 'jobs.db'), or the `jobs` fixture of asyncjobs' pytest plugin"
            )
        scheme = _URL_SCHEME.match(os.fspath(path))
        if scheme is not None:  # the URL itself is left out: it may hold a password
            raise ConfigurationError(
                f"SQLiteStore takes a file path, not a URL ({scheme[0]}...): as a path it "
                "names a folder called "
                f"{scheme[0].split('/')[0]!r} in the working directory. Pass the file's "
                "path, or open the URL with asyncjobs.stores.open_store(url)"
            )
        slashless = _URL_WITHOUT_SLASHES.match(os.fspath(path))
        if slashless is not None:  # not repeated either: it may hold a password
            scheme_name = slashless[1].lower()
            example = "sqlite:///jobs.db" if scheme_name == "sqlite" else f"{scheme_name}://..."
            raise ConfigurationError(
                f"SQLiteStore takes a file path, not a URL ({slashless[0]}... without the "
                "two slashes after the colon): as a path it names a file or folder in the "
                "working directory whose name begins with "
                f"{slashless[0]!r}. Pass the file's path (SQLiteStore('jobs.db')), or open "
                f"the URL with asyncjobs.stores.open_store({example!r})"
            )
        # Absolute now: every connection, the side ones opened later too, is on the
        # same file if the working directory changes, and a name that begins "file:"
        # is a file name, not a URI for SQLite to parse.
        self.path = Path(path).absolute()
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._raw: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None  # pure reads (_read_call)
        self._reader_raw: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._watch: ChangeWatch | None = None
        self._inline: InlineWriter | None = None  # synchronous=NORMAL only
        self._opening = Opening()  # first uses at once open it once
        self._open = False  # set up: migrated, side connections made
        self._give_up_at: float | None = None  # time.monotonic(); see set_deadline
        self._walks = Walks()  # how far the claims went past their window
        self._in_flight = 0  # calls waiting on a connection's thread (_forget_connections)
        _STORES.add(self)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def _same_jobs(self, other: SQLiteStore) -> bool:
        """Whether ``other`` is on the same file, whatever path names it (``..``, a
        symbolic or hard link): compared by device and inode once the files exist."""
        try:
            return os.path.samefile(self.path, other.path)
        except OSError:  # one is not created yet: the same file only by the same path
            return self.path.resolve() == other.path.resolve()

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobRow | None:
        rows = await self._read_call(
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
        preview: int | None = None,
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
        if preview is not None:
            preview = checked_preview(preview)
            sql = f"SELECT {_PREVIEW_SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant
            params[:0] = [preview + 1] * len(PREVIEWED)  # its substr()s' ?s come first
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        rows = await self._read_call(_fetchall, sql, tuple(params))
        if preview is None:
            return [_row(r) for r in rows]
        n = len(COLUMNS)
        return [previewed(_row(r[:n]), preview, r[n:]) for r in rows]

    async def retry(self, job_id: str, *, now: float) -> bool:
        return await self._transaction(_retry, job_id, now)

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        return await self._transaction(_cancel, job_ids, now)

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        if status is None and older_than is None:
            raise ValueError("purge() needs a status or older_than")
        total, below = 0, _NEWEST
        while below is not None:  # one short transaction a batch, newest jobs first
            deleted, below = await self._transaction(_delete_batch, status, older_than, below, now)
            total += deleted
        return total

    async def set_progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        *,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> None:
        await self._transaction(
            _rowcount,
            "UPDATE asyncjobs_jobs SET progress = ?, progress_message = ? "
            "WHERE id = ? AND status = 'running' "
            "AND (? IS NULL OR worker = ?) AND (? IS NULL OR attempts = ?)",
            (progress, message, job_id, worker, worker, attempt, attempt),
        )

    async def counts(self, *, now: float) -> dict[tuple[str, str, str], int]:
        rows = await self._read_call(
            _fetchall,
            "SELECT queue, task, CASE WHEN status IN ('scheduled', 'queued') THEN "
            "CASE WHEN run_at > ? THEN 'scheduled' ELSE 'queued' END ELSE status END AS s, "
            "count(*) FROM asyncjobs_jobs GROUP BY queue, task, s",
            (now,),
        )
        return {(q, t, s): n for q, t, s, n in rows}

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        return dict(await self._read_call(_batch_counts, batch_id))

    async def pending_keys(self, tasks: Collection[str], *, limit: int) -> builtins.list[JobRow]:
        return await self._read_call(pending_keys, tasks, limit)

    async def set_rate_keys(self, keys: Sequence[RateKeyed]) -> None:
        if keys:
            await self._transaction(set_rate_keys, keys)

    # -- operations (see asyncjobs/_stats.py) -----------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        return await self._read_call(_read, _snapshot, now, windows, sample, workers_since)

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        await self._transaction(_record_worker, beat, now)

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        return await self._transaction(_prune, finished_before, dead_before, workers_before, limit)

    async def prune_buckets(
        self, *, full_before: Mapping[str, float], limit: int, others_before: float | None = None
    ) -> int:
        if not full_before and others_before is None:
            return 0
        return await self._transaction(_prune_buckets, full_before, others_before, limit)

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        total, after = 0, _FIRST_BATCH
        while after is not None:  # one short transaction a batch
            requeued, after = await self._transaction(_requeue_dead_batch, queue, task, after, now)
            total += requeued
        return total

    async def delete(self, job_ids: Sequence[str], *, now: float) -> int:
        if not job_ids:
            return 0
        return await self._transaction(_delete_ids, job_ids, now)

    # meta, last_slot and seen_until write only when they must: meta stores its default
    # on first use, the others record a time when given one. Otherwise they read, on the
    # reading connection: no write lock, so none waits for other processes' writes nor
    # holds them up (a schedule's last slot is read on each of its due ticks), and a file
    # that turned read-only still serves them.

    async def meta(self, key: str, default: str) -> str:
        stored = await self._read_call(_fetchall, META_VALUE, (key,))  # no write if stored
        if stored:
            return str(stored[0][0])
        return await self._transaction(_meta, key, default)

    async def last_slot(self, schedule: str, slot: int | None = None) -> int | None:
        return await self._latest(SLOT_KEY + schedule, slot)

    async def seen_until(self, schedule: str, at: int | None = None) -> int | None:
        return await self._latest(SEEN_KEY + schedule, at)

    async def _latest(self, key: str, value: int | None) -> int | None:
        if value is not None:
            return await self._transaction(_record_slot, key, value)
        stored = await self._read_call(_fetchall, META_VALUE, (key,))
        return int(stored[0][0]) if stored else None


# -- the functions below run in the connection thread, inside a transaction ---------


def _fetchall(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _rowcount(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return db.execute(sql, params).rowcount


# A deletion (discard, purge) of the jobs matching a condition: _UNFINISHED + condition
# finds the unfinished ones (and whether they belong to a chain or batch), and
# _DELETE + condition + _DELETE_END deletes what the condition matched before the
# cancel in between changed any row: finished rows it matches (but not those that
# cancel just finished), and the unfinished ones found first (not those it released).
_UNFINISHED = (
    "SELECT id, chain_next IS NOT NULL OR batch_id IS NOT NULL FROM asyncjobs_jobs "
    "WHERE status IN ('waiting', 'scheduled', 'queued') AND "
)
_DELETE = "DELETE FROM asyncjobs_jobs WHERE status != 'running' AND (("
_DELETE_END = (
    ") AND status NOT IN ('waiting', 'scheduled', 'queued') "
    "AND id NOT IN (SELECT value FROM json_each(?)) OR id IN (SELECT value FROM json_each(?))) "
    "RETURNING chain_next, batch_id, status, finished_at"
)


def _delete(
    db: sqlite3.Connection,
    unfinished_sql: str,
    delete_sql: str,
    params: Sequence[Any],
    now: float,
    walk_sql: str | None = None,
    walk_params: Sequence[Any] = (),
) -> int:
    """Delete the jobs a condition matches, unless running. An unfinished member of a
    chain or batch is cancelled first, as ``cancel`` would, so what waits on it moves on
    (the rest of its chain is cancelled, its batch's on_complete still comes). A chain
    member retried by hand that waits for a deleted dead or cancelled one is cancelled
    too: nothing is left to release it. A purge's ``walk_sql`` (``_PURGE_FOLLOWERS``,
    its condition's ``walk_params``) then takes the members that ``PURGEABLE`` kept for
    the ones deleted."""
    unfinished = db.execute(unfinished_sql, params).fetchall()
    members = [job_id for job_id, member in unfinished if member]
    changed = _cancel(db, members, now, reason="discarded") if members else []
    matched = [job_id for job_id, _ in unfinished]
    deleted = db.execute(delete_sql, (*params, json.dumps(changed), json.dumps(matched)))
    rows = deleted.fetchall()
    after = [chain_next for chain_next, _, _, _ in rows if chain_next is not None]
    if walk_sql is not None and after:
        walk = (json.dumps(after), *walk_params, *walk_params)
        rows += db.execute(walk_sql, walk).fetchall()
    tally_deleted(db, [(batch_id, status, at) for _, batch_id, status, at in rows])
    followers = [chain_next for chain_next, _, _, _ in rows if chain_next is not None]
    if followers:
        waiting = db.execute(
            "SELECT id FROM asyncjobs_jobs WHERE status = 'waiting' "
            "AND id IN (SELECT value FROM json_each(?))",
            (json.dumps(followers),),
        ).fetchall()
        _cancel(db, [job_id for (job_id,) in waiting], now)
    return len(rows)


_FIRST_BATCH: int | None = 0  # the seq the first batch comes after
_NEWEST: int | None = 2**63 - 1  # no seq is above it: a purge's first batch
_PICK_NOT_RUNNING = "SELECT id, seq FROM asyncjobs_jobs WHERE status != 'running' AND "
# The run of chain members after the jobs a purge deleted (a JSON list of their
# chain_next) that PURGEABLE kept while the one before each was stored: cancelled before
# they ran, they go with it when the purge's condition ({matching}, whose parameters
# follow the list twice) takes them too. The walk stops at the first that is not one.
# CROSS JOIN: the walk drives a lookup by id per member (as _PRUNE_FOLLOWERS).
# It takes nothing the purge itself cancelled: the member waiting for a deleted one
# is cancelled after the walk (_delete), and the rest of an unfinished job it deletes
# finished now, which no purge condition matches (not dead, not finished before
# ``now``, and a purge of cancelled jobs matches no unfinished job).
_PURGE_FOLLOWERS = (
    "WITH RECURSIVE rest(id) AS (SELECT value FROM json_each(?) UNION ALL "  # noqa: S608 - constant
    "SELECT j.chain_next FROM rest CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id "
    f"WHERE j.chain_next IS NOT NULL AND {PURGE_FOLLOWER} AND {{matching}}) "
    "DELETE FROM asyncjobs_jobs WHERE seq IN (SELECT j.seq FROM rest "
    f"CROSS JOIN asyncjobs_jobs AS j ON j.id = rest.id WHERE {PURGE_FOLLOWER} "
    "AND {matching}) RETURNING chain_next, batch_id, status, finished_at"
)
_BY_ID = "id IN (SELECT value FROM json_each(?))"


def _delete_ids(db: sqlite3.Connection, job_ids: Sequence[str], now: float) -> int:
    ids = (json.dumps(list(job_ids)),)
    return _delete(db, _UNFINISHED + _BY_ID, _DELETE + _BY_ID + _DELETE_END, ids, now)


def _delete_batch(
    db: sqlite3.Connection, status: str | None, older_than: float | None, below: int, now: float
) -> tuple[int, int | None]:
    """Delete the newest ``ADMIN_BATCH`` jobs a purge matches (``PURGEABLE`` among those
    with ``status``, finished before ``older_than``) whose seq is at most ``below``;
    return how many, and the next batch's ``below`` (None: that was the last).

    Newest first, so that a purge deletes what its condition matched before it began,
    as PostgreSQL's one statement does: what a batch changes without deleting it (the
    on_complete that cancelling a batch's last member releases, a chain member
    cancelled after one it deletes) was inserted after the job that changed it, in the
    same insert, so its seq is higher, and no later batch looks at it. The run after a
    deleted member that ``_PURGE_FOLLOWERS`` takes with it is taken whole in this batch,
    whether an earlier batch passed over it (kept then) or not."""
    where, params = _status_filter(status, now)
    if older_than is not None:
        where.append("finished_at < ?")
        params.append(older_than)
    # Only fixed terms with ? placeholders are joined here; values go in params.
    matching = " AND ".join(where)
    walk = _PURGE_FOLLOWERS.format(matching=matching)
    pick = f"{_PICK_NOT_RUNNING}{matching} AND {PURGEABLE} AND seq <= ? ORDER BY seq DESC LIMIT ?"
    rows = db.execute(pick, (*params, below, ADMIN_BATCH)).fetchall()
    ids = (json.dumps([job_id for job_id, _ in rows]),)
    unfinished, delete = _UNFINISHED + _BY_ID, _DELETE + _BY_ID + _DELETE_END
    deleted = _delete(db, unfinished, delete, ids, now, walk, params) if rows else 0
    return deleted, rows[-1][1] - 1 if len(rows) == ADMIN_BATCH else None


def _status_filter(status: str | None, now: float) -> tuple[list[str], list[Any]]:
    """WHERE terms for a status as users see it (scheduled/queued follow run_at)."""
    if status is None:
        return [], []
    if status == "scheduled":
        return ["status IN ('scheduled', 'queued')", "run_at > ?"], [now]
    if status == "queued":
        return ["status IN ('scheduled', 'queued')", "run_at <= ?"], [now]
    if status == "dead":  # with the statuses this version does not know, as reads show them
        return [DEAD_AS_READ], []
    return ["status = ?"], [str(status)]
