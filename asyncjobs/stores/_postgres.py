"""``PostgresStore``: the store for many hosts, on asyncpg.

Claims take rows with ``FOR UPDATE SKIP LOCKED``, so any number of workers on
any number of hosts claim disjoint jobs without waiting on each other. Inserts
``NOTIFY`` the schema's channel (a statement trigger, so an insert made through
the application's own connection wakes workers too); one dedicated connection
``LISTEN``s: another process's insert wakes the runner at once (``on_change``), and
``changed()`` reports what it heard. Polling stays the fallback.
That connection opens on the first ``changed()`` (a runner's, as its workers start),
so a process that only enqueues holds no extra connection and is not interrupted by
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

This module holds the store's constructor, its queries and its operator and
maintenance calls, with deleting jobs (``delete``, ``purge``: ``_delete`` runs the
statements that ``_postgres_release`` holds). The rest lives in modules beside it:
``_postgres_connections`` (the connection handling above) and ``_postgres_hot_path``
(enqueue, claim, finish, heartbeat, and the bookkeeping of operations whose answer
never came), both of which ``PostgresStore`` inherits; ``_postgres_url`` (reading the
store URL); and the SQL it runs, ``_postgres_enqueue``, ``_postgres_claim``,
``_postgres_finish``, ``_postgres_release`` (chain and batch releases, cancelling),
``_postgres_sql`` (what they share), ``_postgres_admin`` (lease recovery, operator and
maintenance calls) and ``_postgres_schema`` (migrations).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
import secrets
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from asyncjobs._errors import ConfigurationError, StoreError
from asyncjobs.stores import _postgres_admin as admin
from asyncjobs.stores import _postgres_claim as claims
from asyncjobs.stores import _postgres_enqueue as enqueue
from asyncjobs.stores import _postgres_finish as finishes
from asyncjobs.stores import _postgres_release as releases
from asyncjobs.stores import redacted
from asyncjobs.stores._opening import Opening
from asyncjobs.stores._postgres_connections import Place
from asyncjobs.stores._postgres_hot_path import _HotPath
from asyncjobs.stores._postgres_limits import GroupWalk
from asyncjobs.stores._postgres_release import (
    _DELETE,
    _DELETE_END,
    _PURGE_FOLLOWERS,
    _UNFINISHED,
)
from asyncjobs.stores._postgres_sql import PREVIEW_SELECT, SELECT, job_row, notify, preview_row
from asyncjobs.stores._postgres_url import (
    _LOCK_TIMEOUT_MAX,
    _URL_SETTINGS,
    _location,
    _misread_by_asyncpg,
    _unreadable,
    _without_settings,
)
from asyncjobs.stores._protocol import (
    SEEN_KEY,
    SLOT_KEY,
    JobRow,
    OpsSnapshot,
    RateKeyed,
    WorkerBeat,
    checked_preview,
)
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGEABLE

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_finish import Write
    from asyncjobs.stores._postgres_sql import Connection, Pool

__all__ = ["PostgresStore"]


logger = logging.getLogger(__name__)


class PostgresStore(_HotPath):
    """A job store in PostgreSQL, shared by any number of processes and hosts."""

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
        max_backoff: float = 5.0,
    ) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port  # an IPv6 host must be in brackets, a port a number
        except ValueError:
            raise ConfigurationError(_unreadable(url)) from None
        misread = _misread_by_asyncpg(url)
        if misread is not None:
            raise ConfigurationError(misread)
        if port == 0:
            raise ConfigurationError(f"the port of {redacted(url)!r} must be 1-65535")
        query = dict(parse_qsl(parts.query))
        try:
            pool_min = int(query.pop("pool_min", pool_min))
            pool_max = int(query.pop("pool_max", pool_max))
        except ValueError as error:
            raise ConfigurationError(
                f"pool_min/pool_max in {redacted(url)!r} must be integers"
            ) from error
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ConfigurationError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}"
            )
        try:
            command_timeout = float(query.pop("command_timeout", command_timeout))
        except ValueError as error:
            raise ConfigurationError(
                f"command_timeout in {redacted(url)!r} must be a number of seconds"
            ) from error
        if not 0 < command_timeout < float("inf"):
            raise ConfigurationError(f"command_timeout must be positive, got {command_timeout}")
        # A statement waiting on a lock (the insert of an idempotency key that another
        # open transaction holds) is ended by the server (lock_timeout) before
        # command_timeout would take the wait for a silent network: the server's answer
        # fails that call alone, not as "unreachable", with no connection dropped and no
        # reconnect backoff refusing every other call. A lock_timeout in the URL wins.
        # (At least 1 ms, since 0 is none; at most what the server holds, about 24.8 days.)
        lock_timeout = max(1, round(min(command_timeout * 900, _LOCK_TIMEOUT_MAX)))
        settings = {} if "lock_timeout" in query else {"lock_timeout": f"{lock_timeout}ms"}
        # No JIT (unless the URL sets jit): a statement costed past jit_above_cost (the
        # tally prune over 50,000 tallies never analysed) was compiled at each run, 12-30
        # ms under the prune's locks for a statement that took 5 ms without. Set at
        # connect, it covers every statement of the pool and enqueue connections at no
        # round trip (the LISTEN connection runs none); callers' connections keep theirs.
        self._server_settings = settings if "jit" in query else {**settings, "jit": "off"}
        self.url = _without_settings(url, _URL_SETTINGS)
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_backoff = max_backoff
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the pool's
        self._opening = Opening()
        self._listener: Connection | None = None
        self._producer: Connection | None = None
        self._producing = False
        self._channel: str | None = None
        self._schema: str | None = None
        self._database: Place | None = None  # where the pool is (``check_caller``)
        # Where each caller's connection seen by ``check_caller`` is, while it lives.
        self._callers: weakref.WeakKeyDictionary[Any, Place] = weakref.WeakKeyDictionary()
        self._notified = False
        self._wake: Callable[[], None] | None = None  # on_change: the runner's wake
        # The server pids of this store's own connections (the newest OWN_PIDS): their
        # inserts' NOTIFY wakes no runner here, which its enqueue woke already.
        self._own_pids: dict[int, None] = {}
        self._failures = 0
        self._retry_at = 0.0
        self._listen_failures = 0  # the LISTEN connection's own: polling covers for it
        self._listen_retry_at = 0.0
        self._give_up_at: float | None = None  # the loop's time; see set_deadline
        # The timeouts of the waits under way (for a reply, a connection), with when
        # each would end on its own (command_timeout): set_deadline cuts them short.
        self._waiting: dict[asyncio.Timeout, float | None] = {}
        # By worker: the claim token and lease end of each of its claims whose answer
        # never came, while that lease lasts (``_unanswered_claims``).
        self._unanswered: dict[str, list[tuple[str, float]]] = {}
        # Claim tokens: this store's random prefix and a count, unique to each write
        # that takes rows for a worker (``_claim_token``).
        self._token_prefix = secrets.token_hex(8) + ":"
        self._token_count = itertools.count()
        # By worker: its writes of outcomes whose answer never came (their time, and
        # the claim token of a finish-and-claim).
        self._unanswered_finishes: dict[str, list[Write]] = {}
        # The concurrency limits the last claim told of: a finish that frees a slot of
        # one wakes the other processes (``finishes.wake_others``).
        self._slots = finishes.NO_SLOTS
        # How far the claims went through the groups past a full window.
        self._group_walk = GroupWalk()

    def __repr__(self) -> str:
        parts = urlsplit(redacted(self.url))  # a password typed unescaped is no host
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"PostgresStore('postgresql://{host}{port}{parts.path}')"

    def _same_jobs(self, other: PostgresStore) -> bool:
        """Whether ``other`` holds the same jobs: once both have been opened, the same
        server (its start time), database and schema, as each found them on opening
        (``check_caller``); before, the same URL once normalised (``_location``), which
        may tell apart two spellings of one place, never take two places for one."""
        mine, theirs = (self._database, self._schema), (other._database, other._schema)
        if None not in (*mine, *theirs):
            return mine == theirs
        return _location(self.url) == _location(other.url)

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
        preview: int | None = None,
    ) -> list[JobRow]:
        if preview is not None:
            preview = checked_preview(preview)
        params: list[Any] = [] if preview is None else [preview + 1]  # PREVIEW_SELECT's $1
        where = _status_filter(status, now, params)
        if queue is not None:
            params.append(queue)
            where.append(f"queue = ${len(params)}")
        if task is not None:
            params.append(task)
            where.append(f"task = ${len(params)}")
        if before_seq is not None:
            params.append(before_seq)
            where.append(f"seq < ${len(params)}")
        sql = f"SELECT {SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant columns
        if preview is not None:
            sql = f"SELECT {PREVIEW_SELECT} FROM asyncjobs_jobs"  # noqa: S608 - constant
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(limit)
        sql += f" ORDER BY seq DESC LIMIT ${len(params)}"
        records = await self._run("list", lambda conn: conn.fetch(sql, *params))
        if preview is None:
            return [job_row(r) for r in records]
        return [preview_row(r, preview) for r in records]

    async def retry(self, job_id: str, *, now: float) -> bool:
        async def retry(conn: Connection) -> bool:
            done = await admin.retry(conn, job_id, now)
            if done:
                await notify(conn)
            return done

        return await self._transaction("retry", retry)

    async def cancel(self, job_ids: Sequence[str], *, now: float) -> builtins.list[str]:
        return await self._transaction("cancel", lambda conn: releases.cancel(conn, job_ids, now))

    async def purge(
        self, *, status: str | None = None, older_than: float | None = None, now: float
    ) -> int:
        params: list[Any] = []
        where = _status_filter(status, now, params)
        if older_than is not None:
            params.append(older_than)
            where.append(f"finished_at < ${len(params)}")
        if not where:
            raise ValueError("purge() needs a status or older_than")
        # Only fixed terms with $n placeholders are joined here; values go in params.
        walk = _PURGE_FOLLOWERS.format(matching=" AND ".join(where), after=len(params) + 1)
        where.append(PURGEABLE)
        matching = " AND ".join(where)
        end = _DELETE_END.format(changed=len(params) + 1, matched=len(params) + 2)
        return await self._transaction(
            "purge",
            lambda conn: _delete(
                conn, _UNFINISHED + matching, _DELETE + matching + end, params, now, walk
            ),
        )

    async def set_progress(
        self,
        job_id: str,
        progress: float,
        message: str | None,
        *,
        worker: str | None = None,
        attempt: int | None = None,
    ) -> None:
        await self._run(
            "set_progress",
            lambda conn: conn.execute(
                "UPDATE asyncjobs_jobs SET progress = $1, progress_message = $2 "
                "WHERE id = $3 AND status = 'running' "
                "AND ($4::text IS NULL OR worker = $4) AND ($5::int IS NULL OR attempts = $5)",
                progress,
                message,
                job_id,
                worker,
                attempt,
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
        return await self._run("batch_counts", lambda conn: releases.batch_counts(conn, batch_id))

    async def pending_keys(self, tasks: Collection[str], *, limit: int) -> builtins.list[JobRow]:
        return await self._run(
            "pending_keys", lambda conn: enqueue.pending_keys(conn, tasks, limit)
        )

    async def set_rate_keys(self, keys: Sequence[RateKeyed]) -> None:
        if keys:
            await self._run("set_rate_keys", lambda conn: enqueue.set_rate_keys(conn, keys))

    # -- operations (see asyncjobs/_stats.py) -----------------------------------------

    async def snapshot(
        self, *, now: float, windows: Sequence[float], sample: int, workers_since: float
    ) -> OpsSnapshot:
        async def read(conn: Connection) -> OpsSnapshot:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await admin.snapshot(conn, now, windows, sample, workers_since)

        return await self._run("snapshot", read)

    async def record_worker(self, beat: WorkerBeat, *, now: float) -> None:
        if beat.stopped:
            await self._release_unanswered(beat.id, now)
        await self._run(
            "record_worker", lambda conn: admin.record_worker(conn, beat, now), now=beat.stopped
        )

    async def _release_unanswered(self, worker: str, now: float) -> None:
        """A worker stopped: the jobs its claims took unseen (``_unanswered_claims``)
        go back now, attempt unspent, instead of waiting out their leases."""
        earlier = [m for m in self._unanswered.pop(worker, []) if m[1] > now]
        if not earlier:
            return

        async def release(conn: Connection) -> None:
            async with conn.transaction():
                await claims.release_claimed(conn, worker, earlier, now)

        try:
            # Once, now: not held back by the reconnect backoff that the failed claim
            # itself may have started (its reply came late).
            await self._run("release", release, now=True)
        except BaseException as error:
            # Kept (cut short too): if the same Jobs starts again, its first claim hands
            # them out.
            self._unanswered[worker] = earlier + self._unanswered.get(worker, [])
            if not isinstance(error, StoreError):
                raise
            logger.warning(
                "giving back the jobs of %d claim(s) whose answer was lost failed; they "
                "run again once their leases expire", len(earlier), exc_info=True,
            )  # fmt: skip

    async def prune(
        self, *, finished_before: float, dead_before: float, workers_before: float, limit: int
    ) -> int:
        return await self._transaction(
            "prune",
            lambda conn: admin.prune(conn, finished_before, dead_before, workers_before, limit),
        )

    async def prune_buckets(
        self, *, full_before: Mapping[str, float], limit: int, others_before: float | None = None
    ) -> int:
        if not full_before and others_before is None:
            return 0
        return await self._transaction(
            "prune_buckets",
            lambda conn: admin.prune_buckets(conn, full_before, others_before, limit),
        )

    async def retry_dead(self, *, queue: str | None, task: str | None, now: float) -> int:
        async def retry_dead(conn: Connection) -> int:
            count = await admin.retry_dead(conn, queue, task, now)
            await notify(conn)
            return count

        return await self._transaction("retry_dead", retry_dead)

    async def delete(self, job_ids: Sequence[str], *, now: float) -> int:
        if not job_ids:
            return 0
        matching = "id = ANY($1::text[])"
        end = _DELETE_END.format(changed=2, matched=3)
        return await self._transaction(
            "delete",
            lambda conn: _delete(
                conn, _UNFINISHED + matching, _DELETE + matching + end, [list(job_ids)], now
            ),
        )

    async def meta(self, key: str, default: str) -> str:
        return await self._run("meta", lambda conn: admin.meta(conn, key, default))

    async def last_slot(self, schedule: str, slot: int | None = None) -> int | None:
        key = SLOT_KEY + schedule
        return await self._run("last_slot", lambda conn: admin.last_slot(conn, key, slot))

    async def seen_until(self, schedule: str, at: int | None = None) -> int | None:
        key = SEEN_KEY + schedule
        return await self._run("seen_until", lambda conn: admin.last_slot(conn, key, at))


async def _delete(
    conn: Connection,
    unfinished_sql: str,
    delete_sql: str,
    params: list[Any],
    now: float,
    walk_sql: str | None = None,
) -> int:
    """Delete the jobs a condition matches, unless running (inside a transaction). An
    unfinished member of a chain or batch is cancelled first, as ``cancel`` would, so
    what waits on it moves on (the rest of its chain is cancelled, its batch's
    on_complete still comes). A chain member retried by hand that waits for a deleted
    dead or cancelled one is cancelled too: nothing is left to release it. A purge's
    ``walk_sql`` (``_PURGE_FOLLOWERS``) then takes the members that ``PURGEABLE`` kept
    for the ones deleted."""
    unfinished = await conn.fetch(unfinished_sql, *params)
    members = [r["id"] for r in unfinished if r["member"]]
    changed = (
        await releases.cancel(conn, members, now, reason="discarded", stop_running=False)
        if members
        else []
    )
    matched = [r["id"] for r in unfinished]
    deleted = await conn.fetch(delete_sql, *params, changed, matched)
    after = [r["chain_next"] for r in deleted if r["chain_next"] is not None]
    if walk_sql is not None and after:
        deleted += await conn.fetch(walk_sql, *params, after)
    followers = [r["chain_next"] for r in deleted if r["chain_next"] is not None]
    if followers:
        waiting = await conn.fetch(
            "SELECT id FROM asyncjobs_jobs WHERE status = 'waiting' AND id = ANY($1::text[]) "
            "FOR UPDATE",
            followers,
        )
        await releases.cancel(conn, [r["id"] for r in waiting], now)
    # Last: the tallies' lock order (see _postgres_release). The followers cancelled above
    # are chain members, which belong to no batch.
    await releases.tally_deleted(conn, deleted)
    if any(r["grouped"] for r in unfinished):  # the next job of its group may run now
        await notify(conn)
    return len(deleted)


def _status_filter(status: str | None, now: float, params: list[Any]) -> list[str]:
    """WHERE terms for a status as users see it (scheduled/queued follow run_at)."""
    if status is None:
        return []
    if status in ("scheduled", "queued"):
        params.append(now)
        op = ">" if status == "scheduled" else "<="
        return ["status IN ('scheduled', 'queued')", f"run_at {op} ${len(params)}"]
    if status == "dead":  # with the statuses this version does not know, as reads show them
        return [DEAD_AS_READ]
    params.append(str(status))
    return [f"status = ${len(params)}"]
