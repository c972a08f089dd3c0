"""The outbox: the outcomes of jobs that ended, until the store has them.

A job that ends leaves its outcome in ``_outbox``; the next claim writes it in the same
transaction (``Store.finish_and_claim``), or, with no claim coming, ``flush_outbox``
alone. Result waiters are told, and the transition logged, once it is written
(``_acknowledged``). A failed write puts the outcomes back for the next one, their
leases renewed by heartbeats meanwhile (``_take_outbox``); one refused as data is
written apart (``_write_apart``). Shutdown writes what is left (``wait_idle``,
``flush_last``).

``_Outbox`` holds these methods of ``Runner``, which inherits them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import anyio

from asyncjobs._clock import within
from asyncjobs._errors import DataRefused, StoreError
from asyncjobs._runner_state import _RunnerState
from asyncjobs.stores._protocol import Applied, JobRow, Outcome, OutcomeKind

logger = logging.getLogger("asyncjobs")


# Seconds shutdown goes on trying to write the last outcomes (the last jobs' results,
# the jobs cut off and given back) while the store fails or is held by another process,
# their leases renewed meanwhile. Past that, those jobs run again once their leases
# expire, as after a crash: a job that succeeded runs twice, and one cut off on its last
# attempt ends dead.
FINAL_WRITE_TIME = 5.0

PAST_DEADLINE_TIME = 5.0
"""Seconds past the store's deadline (``set_store_deadline``) that a shielded write of
the runner (a claim landing, outcomes written) is still waited for: past a deadline the
store tries each wait once more with next to no wait (SQLite a quarter of a second,
PostgreSQL a second), and one that does not end it (a stuck connection) is given up on
then, as a failed write, so that it does not hold ``stop()`` for good."""


class _Finished(NamedTuple):
    """A job that ended, its outcome, and how long it ran."""

    row: JobRow
    outcome: Outcome
    duration: float
    # Set when the outcome is the failed attempt of a job stopped as its lease could not
    # be renewed (``_stopped_while_running``): what the job raised as it stopped ("" if
    # nothing). A cancel asked before the write makes it a cancel (``cancel_asked``).
    lease_lost: str | None = None


# Outcomes that carry data of their own (a result, an error) the database may refuse.
_REFUSABLE = frozenset({OutcomeKind.SUCCEEDED, OutcomeKind.RETRY, OutcomeKind.DEAD})


class _Outbox(_RunnerState):
    """``Runner``'s writes of finished jobs' outcomes."""

    async def flush_outbox(self) -> int:
        """Write finished jobs' outcomes now (shutdown, or no claim coming); a failed
        write is logged and left for the next one. Returns how many were written."""
        try:
            return await self._write_outbox()
        except Exception:
            # Not "no longer ours", as an outcome the store refused would be logged.
            logger.exception(
                "recording the outcome of %d job(s) failed; the next write tries again, "
                "and if none comes they will run again once their leases expire",
                len(self._outbox),
            )  # fmt: skip
            return 0

    def set_store_deadline(self, seconds: float | None) -> None:
        """Set the store's deadline (``Store.set_deadline``; ``None`` lifts it), and
        bound the shielded writes under way and to come to ``PAST_DEADLINE_TIME`` past it,
        in real time as the store's waits are: cancellation does not reach them
        (shutdown lets a claim land and writes the last outcomes), so a store that did
        not end its wait at its deadline held ``stop()`` for good."""
        self.jobs.store.set_deadline(seconds)
        give_up_at = None
        if seconds is not None:
            give_up_at = anyio.current_time() + seconds + PAST_DEADLINE_TIME
        self._writes_give_up_at = give_up_at
        for scope in self._shielded_writes:
            scope.deadline = math.inf if give_up_at is None else give_up_at

    @contextmanager
    def _by_store_deadline(self) -> Iterator[None]:
        """A store write inside a shield, given up on past the store's deadline (with
        ``StoreError``: ``set_store_deadline``), also one set while it waits."""
        give_up_at = self._writes_give_up_at
        scope = anyio.CancelScope(deadline=math.inf if give_up_at is None else give_up_at)
        self._shielded_writes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._shielded_writes.discard(scope)
        if scope.cancelled_caught:
            raise StoreError(
                "the store did not end its wait at its deadline (a stuck connection?): "
                f"given up on {PAST_DEADLINE_TIME:g}s past it"
            )

    def unwritten(self) -> list[tuple[JobRow, Outcome]]:
        """The finished jobs whose outcomes are not written yet, with those outcomes."""
        return [(entry.row, entry.outcome) for entry in self._outbox]

    async def wait_idle(self) -> None:
        """Shutdown: wait until no job runs, writing each outcome as its job ends (no
        claim comes to write it; left for the end, a job that finished early would stay
        running in the store while others run on, and its lease could expire)."""
        await self.flush_outbox()  # jobs claimed ahead, given back when shutdown began
        while self.running or self._stopping or self._reserved:
            freed = self._slot_freed  # before the write: a job may end during it
            if self._outbox and await self.flush_outbox():
                continue
            if self._outbox:  # the write failed (logged): again after a pause
                with within(self.clock, self.settings.poll_interval):
                    await freed.wait()
            else:
                await freed.wait()

    async def flush_last(self) -> None:
        """Shutdown's last write, after ``cancel_running``: the outcomes left, tried
        again until written or ``FINAL_WRITE_TIME`` has passed (the store's waits are
        bounded to it too). Heartbeats go on renewing their leases meanwhile."""
        self.set_store_deadline(FINAL_WRITE_TIME)
        with within(self.clock, FINAL_WRITE_TIME):
            await self.flush_outbox()
            while self._outbox:
                freed = self._slot_freed  # a job that ignored its cancellation ends
                with within(self.clock, self.settings.poll_interval):
                    await freed.wait()
                await self.flush_outbox()
        for row, outcome, *_ in self._outbox:
            logger.error(
                "shutdown: could not record the outcome (%s) of job %s (%s) within %ss; "
                "it will run again once its lease expires", outcome.kind, row.id, row.task,
                FINAL_WRITE_TIME, extra={"job_id": row.id, "task": row.task,
                                         "attempt": row.attempts},
            )  # fmt: skip

    async def _write_outbox(self) -> int:
        if not self._outbox:
            return 0
        with self._take_outbox() as outbox, anyio.CancelScope(shield=True):
            try:
                with self._by_store_deadline():
                    applied = await self.jobs.store.finish(
                        [finished.outcome for finished in outbox], now=self.clock.now()
                    )
            except BaseException as error:
                written = await self._put_back(outbox, error)
                if written:
                    return written
                raise
        self._acknowledged(outbox, applied)
        return len(outbox)

    async def _put_back(self, outbox: list[_Finished], error: BaseException) -> int:
        """After a failed write of ``outbox``: keep it for the next write (heartbeats
        renew its leases meanwhile; a crash leaves them to expire), or, refused as
        data, write it apart at once. Returns how many outcomes that wrote."""
        self._outbox[:0] = outbox
        if outbox and isinstance(error, DataRefused):
            return await self._write_apart()
        return 0

    async def _write_apart(self) -> int:
        """After a write refused as data (``DataRefused``): write the outcomes one at a
        time, so that one the database refuses for good (a result over its size limit)
        holds back neither the others nor this worker, whose claims carry the outbox.
        (After a failure of the store itself, down, locked or timing out, pieces would
        fail the same way: the callers do not come here.)

        An outcome refused as data on its own is recorded as a failed attempt instead:
        the job is retried, or dead when out of attempts, and shows why. Should the
        store fail meanwhile, the outcomes left stay for the next write, their leases
        renewed. Returns how many outcomes were written (the callers shield it)."""
        store, written = self.jobs.store, 0
        with self._take_outbox() as outbox:
            try:
                while outbox:
                    row, outcome, duration, _ = outbox[0]
                    try:
                        applied = await store.finish([outcome], now=self.clock.now())
                    except DataRefused as refused:
                        if outcome.kind not in _REFUSABLE:
                            raise  # nothing of its own to refuse: the store fails
                        outcome = self._failure(row, f"the store refused its outcome: {refused}")
                        applied = await store.finish([outcome], now=self.clock.now())
                        if row.id in applied:
                            logger.error(
                                "the store refused the outcome of job %s (%s); recorded as "
                                "a failed attempt instead: %s", row.id, row.task, refused,
                                extra={"job_id": row.id, "task": row.task,
                                       "attempt": row.attempts},
                            )  # fmt: skip
                    outbox.pop(0)
                    self._acknowledged([_Finished(row, outcome, duration)], applied)
                    written += 1
            except Exception:  # the caller raises its own failure, the same store's
                logger.debug("writing outcomes one at a time failed too", exc_info=True)
            finally:
                self._outbox[:0] = outbox
        return written

    @contextmanager
    def _take_outbox(self) -> Iterator[list[_Finished]]:
        """The outbox, taken to be written. Until each outcome is written (or put back
        after a failure), heartbeats still renew its job's lease: else a slow write
        could outlast it and the job run again."""
        outbox, self._outbox = self._outbox, []
        self._writing.append(outbox)
        try:
            yield outbox
        finally:
            self._writing = [taken for taken in self._writing if taken is not outbox]

    def _acknowledged(self, outbox: list[_Finished], applied: Sequence[str]) -> None:
        ids = set(applied)
        cancelled = applied.cancelled if isinstance(applied, Applied) else frozenset()
        for row, outcome, duration, _ in outbox:
            if row.id in cancelled:  # asked to stop while it ran: not retried, cancelled
                outcome = outcome._replace(kind=OutcomeKind.CANCELLED)
            self._log(row, outcome, row.id in ids, duration)
            self.jobs._notify_finished(row.id)
