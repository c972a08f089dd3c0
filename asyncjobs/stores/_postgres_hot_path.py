"""``PostgresStore``'s hot path: enqueue (through the store's connections, or the
caller's own inside its transaction), claim, finish and finish-and-claim, heartbeat,
lease recovery, and an idle runner's reads (when a job is next due, whether another
process wrote: the LISTEN connection's notifications).

A claim or a write of outcomes whose answer never came (a lost reply, a timeout) may
have committed: each is remembered by its worker (``_unanswered``, ``_Tries``), and the
worker's next claim or write finds what it did (``_postgres_claim.claim_again``,
``_postgres_finish.finished_before``).

``_HotPath`` holds these methods of ``PostgresStore``, which inherits them. The SQL they
run lives in ``_postgres_enqueue``, ``_postgres_claim`` and ``_postgres_finish``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

from asyncjobs._errors import StoreError
from asyncjobs.stores import _postgres_admin as admin
from asyncjobs.stores import _postgres_claim as claims
from asyncjobs.stores import _postgres_finish as finishes
from asyncjobs.stores._job_rows import check_new_jobs
from asyncjobs.stores._postgres_connections import _Connections
from asyncjobs.stores._postgres_enqueue import insert_jobs
from asyncjobs.stores._postgres_errors import NotSent, answered, backoff
from asyncjobs.stores._postgres_finish import Write
from asyncjobs.stores._postgres_sql import retry_deadlocks
from asyncjobs.stores._protocol import (
    ClaimRequest,
    Inserted,
    JobRow,
    NewJob,
    Outcome,
    Recovered,
)

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_limits import GroupWalk
    from asyncjobs.stores._postgres_sql import Connection

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


class _HotPath(_Connections):
    """``PostgresStore``'s enqueue, claim and finish, and what it remembers of those
    whose answer never came."""

    if TYPE_CHECKING:
        _unanswered: dict[str, list[tuple[str, float]]]
        _token_prefix: str
        _token_count: itertools.count[int]
        _unanswered_finishes: dict[str, list[Write]]
        _slots: finishes.Slots
        _group_walk: GroupWalk

    def _claim_token(self) -> str:
        """A token for one claim (or one insert of jobs dispatched to a free slot): it
        marks the rows that write takes, so that, its answer lost, they are found by it
        alone (``claims.claim_again``, ``claims.release_claimed``), not by its worker and time,
        which a job dispatched or claimed at the same clock reading shares."""
        return f"{self._token_prefix}{next(self._token_count)}"

    # -- enqueue ---------------------------------------------------------------------

    async def insert(self, jobs: Sequence[NewJob], *, now: float | Callable[[], float]) -> Inserted:
        check_new_jobs(jobs)
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
        check_new_jobs(jobs)
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
