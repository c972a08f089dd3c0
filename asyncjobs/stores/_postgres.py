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

The code lives in modules beside this one: ``_postgres_connections`` (the connection
handling above, which ``PostgresStore`` inherits); the SQL it runs, ``_postgres_enqueue``,
``_postgres_claim``, ``_postgres_finish``, ``_postgres_release`` (chain and batch
releases, cancelling) and ``_postgres_sql`` (what they share); ``_postgres_admin`` (lease
recovery, operator and maintenance calls) and ``_postgres_schema`` (migrations).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
import secrets
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlsplit

from asyncjobs._errors import ConfigurationError, StoreError
from asyncjobs.stores import _postgres_admin as admin
from asyncjobs.stores import _postgres_claim as claims
from asyncjobs.stores import _postgres_enqueue as enqueue
from asyncjobs.stores import _postgres_finish as finishes
from asyncjobs.stores import _postgres_release as releases
from asyncjobs.stores import redacted
from asyncjobs.stores._postgres_connections import (
    NotSent,
    Place,
    _Connections,
    answered,
    backoff,
)
from asyncjobs.stores._postgres_enqueue import insert_jobs
from asyncjobs.stores._postgres_finish import Write
from asyncjobs.stores._postgres_limits import GroupWalk
from asyncjobs.stores._postgres_sql import (
    PREVIEW_SELECT,
    SELECT,
    job_row,
    notify,
    preview_row,
    retry_deadlocks,
)
from asyncjobs.stores._protocol import (
    SLOT_KEY,
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    OpsSnapshot,
    Outcome,
    RateKeyed,
    Recovered,
    WorkerBeat,
    checked_preview,
)
from asyncjobs.stores._statuses import DEAD_AS_READ, PURGE_FOLLOWER, PURGEABLE

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection, Pool

__all__ = ["PostgresStore", "insert_jobs"]


logger = logging.getLogger(__name__)

# At most this many unanswered claims are remembered per worker (``_unanswered_claims``),
# a bound on memory alone: a claim refused without trying (the reconnect backoff) is not
# one, so a store that is down adds one per backoff (5 s at most), and once a claim's
# lease has run out, lease recovery hands its rows out instead.
_UNANSWERED_MAX = 1000


M = TypeVar("M")


@contextmanager
def _unanswered(
    memory: dict[str, list[M]], worker: str, moment: M, tries: _Tries
) -> Iterator[list[M]]:
    """The operations of ``worker`` whose answer never came (``memory``), for this one
    to settle; it joins them (as ``moment``) if it fails too, unless none of its
    ``tries`` may have committed (``_Tries.unsettled``), and clears them if it succeeds."""
    earlier = memory.pop(worker, [])
    try:
        yield earlier
    except BaseException:
        # With those another operation of the worker added meanwhile (an insert of jobs
        # dispatched to it, its reply lost by the same network fault).
        mine = [moment] if tries.unsettled else []
        memory[worker] = [*earlier, *mine, *memory.get(worker, [])][-_UNANSWERED_MAX:]
        raise


class _Tries:
    """The tries of one operation: ``_run`` tries it again on a fresh connection when
    the first one's was lost, ``retry_deadlocks`` when PostgreSQL ended it to break a
    deadlock. A try must find what one before it may have committed, its reply lost;
    and an operation that failed may have committed only then too: if one of its tries
    was not refused by the server (``unsettled``). A try it refused rolled back, unless
    a part of it committed on its own first (``committed``)."""

    def __init__(self) -> None:
        self.unsettled = False
        self._partly = False

    @contextmanager
    def one(self) -> Iterator[bool]:
        """A try, in its ``with``; gives whether one before it may have committed (not
        after tries the server refused: a deadlock's, another claim's at once)."""
        self._partly = False
        try:
            yield self.unsettled
        except BaseException as error:
            if self._partly or not answered(error):
                self.unsettled = True
            raise
        self.unsettled = True  # (its answer may still be lost on its way out)

    def committed(self) -> None:
        """A statement of this try committed on its own: its refusal leaves that."""
        self._partly = True


def _claim_time(request: ClaimRequest, now: float) -> float:
    """The time a claim leases from: the claimer's clock read once a connection is
    held (``ClaimRequest.clock``), not the ``now`` from before a wait for the pool or
    a reconnect, which would write the lease short by that wait (already expired past
    ``request.lease``, for another worker's lease recovery to take). The claim's
    bookkeeping of unanswered tries keeps ``now``: it drops a try's entry sooner, never
    later, than its lease ends."""
    return request.clock() if request.clock is not None else now


class PostgresStore(_Connections):
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
        self._server_settings = (
            {} if "lock_timeout" in query else {"lock_timeout": f"{lock_timeout}ms"}
        )
        self.url = _without_settings(url, _URL_SETTINGS)
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_backoff = max_backoff
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the pool's
        self._opening = asyncio.Lock()
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

    def _claim_token(self) -> str:
        """A token for one claim (or one insert of jobs dispatched to a free slot): it
        marks the rows that write takes, so that, its answer lost, they are found by it
        alone (``claims.claim_again``, ``claims.release_claimed``), not by its worker and time,
        which a job dispatched or claimed at the same clock reading shares."""
        return f"{self._token_prefix}{next(self._token_count)}"

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float | Callable[[], float]) -> Inserted:
        began = now() if callable(now) else now  # no later than the insert's own time
        if not jobs:
            return Inserted(at=began)
        # One INSERT statement, atomic on its own: no BEGIN/COMMIT round trips.
        tries = _Tries()
        token = self._claim_token()  # stored on the jobs dispatched here alone

        async def insert(conn: Connection) -> Inserted:
            with tries.one() as again:
                return await insert_jobs(conn, jobs, now, again=again, claim_token=token)

        try:
            return await self._run("enqueue", insert, producer=True)
        except NotSent:
            raise
        except BaseException:
            # Jobs dispatched to a worker's free slot are inserted running, under this
            # insert's claim token: if it committed unanswered, that worker's next claim
            # hands them out (or its stop gives them back), as an unanswered claim's.
            # Not when no try may have committed (never sent, or refused by the server).
            if not tries.unsettled:
                raise
            for job in jobs:  # one worker, one lease end: one entry for them all
                if job.worker is not None and (ends := job.lease_end(began)) is not None:
                    self._unanswered.setdefault(job.worker, []).append((token, ends))
                    break
            raise

    async def insert_with(
        self, conn: Connection, jobs: Sequence[NewJob], *, now: float
    ) -> Inserted:
        """Insert through the caller's connection (and so its open transaction)."""
        await self.open()
        if self._schema is None:  # pragma: no cover - set by open()
            raise StoreError(f"PostgreSQL store {self!r} is closed")
        table = f'"{self._schema.replace(chr(34), chr(34) * 2)}".asyncjobs_jobs'
        with self._caller_errors(conn, "enqueue"):  # not the store's: no backoff
            return await insert_jobs(conn, jobs, now, table=table)

    # -- claim and finish ------------------------------------------------------------

    async def claim(self, request: ClaimRequest, *, now: float) -> list[JobRow]:
        if request.limit <= 0 or not request.tasks:
            return []
        self._slots = finishes.Slots.of(request)
        token = self._claim_token()
        tries = _Tries()
        with self._unanswered_claims(request, token, now, tries) as earlier:

            async def claim(conn: Connection) -> list[JobRow]:
                # A try ended by another claim (retry_deadlocks) may have handed out the
                # rows of unanswered claims under this token (a statement committed on
                # its own): the next finds them (again).
                with tries.one() as again:
                    if earlier:
                        tries.committed()
                    at = _claim_time(request, now)
                    return await claims.claim_after(
                        conn, request, at, token, earlier, again=again, walk=self._group_walk
                    )

            return await self._run(
                "claim", lambda conn: retry_deadlocks("claim", lambda: claim(conn))
            )

    def _unanswered_claims(
        self, request: ClaimRequest, token: str, now: float, tries: _Tries
    ) -> AbstractContextManager[list[tuple[str, float]]]:
        """The earlier claims of ``request.worker`` whose answer never came, as (claim
        token, lease end), for this claim (``token``) to hand their rows out
        (``claims.claim_again``). A claim that fails, its committed reply lost or late past
        ``command_timeout``, or on a connection lost on its retry too, joins them (not
        one the server refused, its every try: ``tries``); one that succeeds clears
        them. A claim whose lease ran out is dropped: recovery has its rows."""
        earlier = [m for m in self._unanswered.pop(request.worker, []) if m[1] > now]
        self._unanswered[request.worker] = earlier
        return _unanswered(self._unanswered, request.worker, (token, now + request.lease), tries)

    def _unanswered_writes(
        self, worker: str, now: float, tries: _Tries, token: str | None = None
    ) -> AbstractContextManager[list[Write]]:
        """The earlier writes of outcomes by ``worker`` whose answer never came (their
        time, and the claim token of a finish-and-claim): the runner sends those
        outcomes again, and what such a write applied is reported as applied
        (``finishes.finished_before``), not as no longer ours. A write that fails unanswered
        joins them (not one the server refused: ``tries``); one that succeeds clears
        them."""
        return _unanswered(self._unanswered_finishes, worker, Write(now, token), tries)

    async def finish(self, outcomes: Sequence[Outcome], *, now: float) -> list[str]:
        if not outcomes:
            return []
        tries = _Tries()
        with self._unanswered_writes(outcomes[0].worker, now, tries) as earlier:

            async def finish(conn: Connection) -> list[str]:
                with tries.one() as again:
                    written = [*earlier, Write(now, None)] if again else earlier
                    return await finishes.apply(
                        conn, outcomes, now, written, self._slots, committed=tries.committed
                    )

            # Not held back by a reconnect backoff: the runner tries a failed write again
            # only after a pause, and at shutdown this is the last chance before the
            # leases of the jobs it finishes run out (the server may be up: a late reply).
            return await self._run("finish", finish, now=True)

    async def finish_and_claim(
        self, outcomes: Sequence[Outcome], request: ClaimRequest, *, now: float
    ) -> tuple[list[str], list[JobRow]]:
        if request.limit <= 0 or not request.tasks:
            return await self.finish(outcomes, now=now), []
        self._slots = finishes.Slots.of(request)
        token = self._claim_token()
        tries = _Tries()
        writes: AbstractContextManager[list[Write]] = (
            self._unanswered_writes(request.worker, now, tries, token)
            if outcomes
            else nullcontext([])
        )
        with self._unanswered_claims(request, token, now, tries) as earlier, writes as written:

            async def both(conn: Connection) -> tuple[list[str], list[JobRow]]:
                # One transaction: one commit (one WAL flush) for the acks and the claim;
                # a try the server refused left nothing.
                with tries.one() as again:
                    earlier_writes = [*written, Write(now, token)] if again else written
                    at = _claim_time(request, now)
                    async with conn.transaction():
                        applied = await finishes.apply(
                            conn, outcomes, now, earlier_writes, self._slots
                        )
                        claimed = await claims.claim_after(
                            conn, request, at, token, earlier, again=again, walk=self._group_walk
                        )
                    return applied, claimed

            return await self._run(
                "claim", lambda conn: retry_deadlocks("claim", lambda: both(conn))
            )

    async def heartbeat(
        self, job_ids: Sequence[str], *, worker: str, lease_until: float | Callable[[], float]
    ) -> set[str]:
        if not job_ids:
            return set()

        async def extend(conn: Connection) -> list[Any]:
            return await conn.fetch(
                "UPDATE asyncjobs_jobs SET lease_until = $1 WHERE status = 'running' "
                "AND worker = $2 AND id = ANY($3::text[]) RETURNING id, cancel_requested_at",
                # Read with a connection in hand: after any wait for one (a busy pool).
                lease_until() if callable(lease_until) else lease_until,
                worker,
                list(job_ids),
            )

        # Its rows are the ones this process's finishes lock too, maybe in another order:
        # a beat that PostgreSQL ends to break a deadlock is tried again, not lost.
        rows = await self._run(
            "heartbeat", lambda conn: retry_deadlocks("heartbeat", lambda: extend(conn))
        )
        # A job asked to stop keeps its lease while it stops, but is no longer ours to run.
        return {r["id"] for r in rows if r["cancel_requested_at"] is None}

    async def recover(self, *, now: float) -> list[Recovered]:
        return await self._transaction("recover", lambda conn: admin.recover(conn, now))

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
        self._leave_ended_loop()
        if self._pool is None:
            return False
        listener = self._listener
        if listener is None or listener.is_closed():
            # (Re)connect (with the backoff) and report a change: nothing was heard so
            # far, so the caller looks once more now that it will be told.
            self._listener = None
            now = asyncio.get_running_loop().time()
            if self._listen_failures and now < self._listen_retry_at:
                return False
            if not await self._listen():
                # Its own backoff: a listener that cannot connect (the server at
                # max_connections, say) must not make the working pool look down.
                self._listen_failures += 1
                self._listen_retry_at = now + backoff(self._listen_failures, self.max_backoff)
                return False
            self._listen_failures = 0
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

    async def prune_buckets(self, *, full_before: Mapping[str, float], limit: int) -> int:
        if not full_before:
            return 0
        return await self._transaction(
            "prune_buckets", lambda conn: admin.prune_buckets(conn, full_before, limit)
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
# flatten (OFFSET 0, FOR UPDATE), as _PRUNE_FOLLOWERS does: joined plainly, it may read
# every cancelled job and match them against the walk. FOR UPDATE waits for a row
# another transaction holds and then checks it again (one retried meanwhile is left).
# It takes nothing the purge itself cancelled: the member waiting for a deleted one
# is cancelled after the walk (_delete), and the rest of an unfinished job it deletes
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


_LOCK_TIMEOUT_MAX = 2**31 - 1
"""The longest ``lock_timeout`` PostgreSQL takes, in milliseconds (a 32-bit integer)."""

_URL_SETTINGS = ("pool_min", "pool_max", "command_timeout")
"""Parameters of a store URL that set the store, taken out before asyncpg reads it."""


def _without_settings(url: str, names: Collection[str]) -> str:
    """``url`` without its parameters ``names``, otherwise as written. Rebuilt from its
    parsed parts, a URL whose password has a ``?`` typed unescaped (the rest reads as
    the query) lost its host, and ``redacted`` then found no password to hide."""
    rest, hash_mark, fragment = url.partition("#")
    base, _, query = rest.partition("?")
    pieces = query.split("&")
    kept = [p for p in pieces if unquote_plus(p.partition("=")[0]) not in names]
    if len(kept) == len(pieces):
        return url
    return base + ("?" + "&".join(kept) if kept else "") + hash_mark + fragment


def _unreadable(url: str) -> str:
    """Why the host and port of ``url`` cannot be read, in words that never quote its
    password: urllib's own error may (a password typed with ``/``, ``?`` or ``#``
    unescaped ends the host there, and what came before reads as the port), so the
    reason is that of the URL with its password hidden, if it has one."""
    shown = redacted(url)
    try:
        _ = urlsplit(shown).port  # the same check, on the URL as shown
    except ValueError as error:
        return f"cannot read the host and port of {shown!r}: {error}"
    return (
        f"cannot read the host and port of {shown!r}: its password must be "
        "percent-encoded (a /, ?, #, [ or ] typed as is breaks the URL)"
    )


def _misread_by_asyncpg(url: str) -> str | None:
    """Why asyncpg would misread ``url``, with its password hidden; None if it would not.

    asyncpg reads the URL only on connecting, and its errors quote what it could not
    read: an ``&`` typed unescaped in a password parameter left a piece with no ``=``
    ("bad query field: '...'"), and an ``@`` in the user info (which asyncpg ends at
    its first ``@``) read the password's tail as the host (looked up in the DNS) and
    port ("invalid literal for int() ...")."""
    parts = urlsplit(url)
    if parts.netloc.count("@") > 1:
        return (
            f"cannot read the user name and password of {redacted(url)!r}: they must be "
            "percent-encoded (an @ typed as is ends them early)"
        )
    try:
        parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        return (
            f"cannot read the parameters of {redacted(url)!r}: each must be name=value, "
            "percent-encoded (an &, ?, # or @ in a password typed as is breaks them)"
        )
    return None


def _location(url: str) -> tuple[object, ...]:
    """What in a store URL chooses where its jobs are, normalised: the host (lower case),
    the port (5432 when not given), the user, the database and the other parameters
    (``search_path`` among them), sorted; not the scheme's spelling nor a password."""
    parts = urlsplit(url)
    query = sorted((k, v) for k, v in parse_qsl(parts.query) if "password" not in k.lower())
    host = (parts.hostname or "").lower()
    return (host, parts.port or 5432, parts.username, parts.path.lstrip("/"), query)


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
