"""Running one claimed job: the context a task sees (``current_job()``), the attempt,
its ``Outcome`` (retry with backoff, dead, cancelled...) and the log line of its
transition.

``_Execution`` holds these steps of ``Runner``, which inherits them; the runner
decides when a job starts (``_start_ready``) and what happens to its slot and its
outcome afterwards (``_complete``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import traceback
from collections.abc import Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from asyncjobs._backoff import backoff_delay
from asyncjobs._codec import decode_payload, encode
from asyncjobs._errors import NotSerializable, Retry
from asyncjobs._runner_state import _RunnerState
from asyncjobs._settings import storable
from asyncjobs.stores._dependents import COUNTS_FLAG
from asyncjobs.stores._protocol import JobRow, Outcome, OutcomeKind

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")

_current: ContextVar[JobContext] = ContextVar("asyncjobs_current_job")


@dataclass(slots=True, kw_only=True)
class JobContext:
    """What a running task knows about its own job (``asyncjobs.current_job()``)."""

    id: str
    task: str
    queue: str
    attempt: int
    max_attempts: int
    idempotency_key: str | None
    _jobs: Jobs = field(repr=False)
    _worker: str = field(repr=False)

    async def set_progress(self, progress: float, message: str | None = None) -> None:
        """Record progress (0.0 to 1.0) and an optional message, shown in ``JobInfo``.

        Only while this attempt is the job's: one whose lease was lost (the job runs
        again meanwhile) writes nothing over the progress of the attempt running now."""
        value = float(progress)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"progress must be between 0.0 and 1.0, got {progress!r}")
        text = None if message is None else storable(str(message))
        # + 0.0 makes -0.0 (in range: it equals 0.0) plain 0.0, as SQLite stores it;
        # PostgreSQL would keep the sign, and the dashboard would show "-0%".
        await self._jobs.store.set_progress(
            self.id, value + 0.0, text, worker=self._worker, attempt=self.attempt
        )


def current_job() -> JobContext:
    """The job the calling task is running; raises ``LookupError`` outside a job."""
    try:
        return _current.get()
    except LookupError:
        raise LookupError("current_job() is only available inside a running job") from None


@dataclass(slots=True)
class _Running:
    row: JobRow
    task: asyncio.Task[None] | None = None  # the job's own task, once created
    started: bool = False  # its code may be running: cancel the task to stop it
    cancelled_by_user: bool = False
    # Stopped because its lease could not be renewed (``_Leases``), not by a cancel:
    # its outcome is a failed attempt, as lease recovery would record it.
    lease_lost: bool = False
    overran: bool = False  # so stopped, it still ran as its lease ended (reported once)
    # So stopped, then cancelled by the user: it ends cancelled, as asked (_Leases).
    cancel_asked: bool = False
    # So stopped, its outcome is that failed attempt (_stopped_while_running): what it
    # raised as it stopped ("" if nothing). The outbox entry keeps it (_Finished).
    lease_lost_raised: str | None = None


class _Execution(_RunnerState):
    """``Runner``'s steps for one job: run an attempt, build its outcome, log it."""

    def called_by_a_job(self) -> bool:
        """Is the calling code one of this runner's running jobs (or a task it started)?"""
        context = _current.get(None)
        if context is None or context._jobs is not self.jobs:
            return False
        running = self.running.get(context.id)  # None: a task the job left behind
        return running is not None and running.row.attempts == context.attempt

    # -- running one job -------------------------------------------------------------

    async def _execute(self, running: _Running) -> None:
        row = running.row
        running.started = True
        outcome: Outcome | None = None
        started = self.clock.now()
        try:
            if running.cancelled_by_user:  # before its task first ran
                outcome = self._stopped_before_it_ran(row, running)
            else:
                outcome = await self._attempt(row, running)
        except Exception:  # a bug of ours, not the task's: record it, never lose the job
            logger.exception("running job %s failed inside asyncjobs", row.id)
            outcome = self._failure(row, _traceback())
        except anyio.get_cancelled_exc_class():
            # Shutdown cut it off: give the job back without spending the attempt.
            outcome = Outcome(
                job_id=row.id, worker=self.worker_id, attempt=row.attempts, kind=OutcomeKind.RELEASE
            )
            raise
        except BaseException:
            # KeyboardInterrupt or SystemExit raised by the job: asyncio lets them out
            # of the event loop, and so does this. The attempt is recorded all the
            # same, a failure that shows what was raised: written as the workers stop
            # (the loop's end cancels them), or by the next claim if the process goes
            # on. Unrecorded, the job stayed running, unexplained, until its lease
            # expired (and a process that went on had its slot free meanwhile).
            outcome = self._failure(row, _traceback())
            raise
        finally:
            self._complete(running, outcome, started)

    async def _attempt(self, row: JobRow, running: _Running) -> Outcome:
        task = self.jobs.registry.get(row.task)
        if task is None:  # unregistered between claim and run: give it back
            return self._outcome(row, OutcomeKind.RELEASE)
        try:
            args, kwargs = decode_payload(row.payload)
            options: dict[str, Any] = json.loads(row.options) if row.options else {}
            if not isinstance(options, dict):
                raise ValueError("options are not a JSON object")
            timeout = _stored_timeout(options, task.timeout)
            if options.get(COUNTS_FLAG) and not task.takes_batch:
                kwargs.pop("batch", None)  # enqueued by a process that did not know
        except (ValueError, RecursionError) as error:  # the latter: nested too deep
            return self._outcome(
                row, OutcomeKind.DEAD, error=f"the stored payload cannot be decoded: {error}"
            )
        token = _current.set(
            JobContext(
                id=row.id,
                task=row.task,
                queue=row.queue,
                attempt=row.attempts,
                max_attempts=row.max_attempts,
                idempotency_key=row.idempotency_key,
                _jobs=self.jobs,
                _worker=self.worker_id,
            )
        )
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "job %s (%s) started, attempt %d/%d",
                row.id, row.task, row.attempts, row.max_attempts,
                extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
            )  # fmt: skip
        try:
            timed_out = False
            try:
                if timeout is None:  # the common case: no cancel scope at all
                    result = await task.fn(*args, **kwargs)
                else:
                    result, timed_out = await self._within(task.fn(*args, **kwargs), timeout)
            except asyncio.CancelledError:
                this = asyncio.current_task()
                if this is not None and not this.cancelling() and not running.cancelled_by_user:
                    # Nobody cancelled this task: the job's own code raised it (it awaited
                    # something cancelled elsewhere). A failure, not shutdown.
                    return self._failure(row, _traceback())
                # Ours alone (cancel_local), not shutdown's too: the job ends cancelled.
                if not running.cancelled_by_user or this is None or this.uncancel() > 0:
                    raise
            if running.cancelled_by_user:
                return self._stopped_while_running(row, running)
            if timed_out:
                return self._failure(
                    row, f"TimeoutError: the job ran longer than its {timeout}s timeout"
                )
            if result is None:  # the common case, without the encoder
                return self._outcome(row, OutcomeKind.SUCCEEDED, result="null")
            # A result that cannot be stored sends the job dead at once, as Celery and
            # arq do: its code ran to the end, and each retry would repeat its side
            # effects only to return the same. Fixed, ``jobs.retry()`` runs it again.
            try:
                encoded = encode(result, what=f"the result of task {row.task!r}")
            except NotSerializable as error:
                return self._outcome(row, OutcomeKind.DEAD, error=f"NotSerializable: {error}")
            if len(encoded) > MAX_RESULT_BYTES:  # ensure_ascii: characters == bytes
                return self._outcome(
                    row, OutcomeKind.DEAD,
                    error=f"PayloadTooLarge: the result of task {row.task!r} encodes to "
                    f"{len(encoded)} bytes, over the {MAX_RESULT_BYTES} a result may take: "
                    "store large data elsewhere and return a key",
                )  # fmt: skip
            return self._outcome(row, OutcomeKind.SUCCEEDED, result=encoded)
        except Retry as signal:
            return self._cut_off(row, running) or self._failure(
                row, f"Retry: {signal}", delay=signal.delay
            )
        except anyio.get_cancelled_exc_class():
            raise
        except BaseExceptionGroup as group:  # from a task group inside the job
            retries, rest = group.split(Retry)
            if retries is not None and rest is None:  # only Retry signals: the longest wait
                signals = [e for e in _leaves(retries) if isinstance(e, Retry)]
                delays = [s.delay for s in signals if s.delay is not None]
                reason = f"Retry: {signals[0]}"
                return self._cut_off(row, running) or self._failure(
                    row, reason, delay=max(delays) if delays else None
                )
            # With a KeyboardInterrupt or SystemExit in it too: asyncio lets only a bare
            # one out of the event loop, and the process goes on. A failure all the same.
            return self._cut_off(row, running) or self._failure(row, _traceback())
        except (KeyboardInterrupt, SystemExit):
            raise  # the process is going down (_execute records the failure)
        except BaseException:  # GeneratorExit, a library's own: a failure like any other
            return self._cut_off(row, running) or self._failure(row, _traceback())
        finally:
            _current.reset(token)

    async def _within(self, call: Awaitable[Any], timeout: float) -> tuple[Any, bool]:
        """Await the job's ``call`` for ``timeout`` seconds of the clock at most; return its
        result, or None, and whether the timeout cut it off.

        Past the timeout the job is cancelled once, as ``asyncio.timeout()`` does (and a
        cancel, or shutdown, here), not at every await from then on as a cancel scope
        would: its cleanup (``finally``, an ``async with`` exit) can still await, to close
        a connection or roll back."""
        this = asyncio.current_task()
        if this is None:  # pragma: no cover - a job always runs in a task of its own
            raise RuntimeError("a job runs in an asyncio task")
        fired = False

        async def alarm() -> None:
            nonlocal fired
            await self.clock.sleep(timeout)
            fired = True
            this.cancel()  # at once: in the job's next step, even one already scheduled

        alarm_task = asyncio.get_running_loop().create_task(alarm())
        try:
            return await call, False
        except asyncio.CancelledError:
            if not fired:
                raise
            fired = False  # its cancellation taken back here
            if this.uncancel() > 0:  # cancelled by someone else too
                raise
            return None, True
        finally:
            alarm_task.cancel()
            if fired:  # the job caught the timeout's cancellation, then returned or raised
                this.uncancel()  # else it would pass for shutdown's (_cut_off)

    def _cut_off(self, row: JobRow, running: _Running) -> Outcome | None:
        """A release, when the job raised as shutdown cancelled it (its cleanup failed:
        the connection it was using was gone; or it asked for a retry): that is still
        shutdown's doing, and spends no attempt. Cancelled, when it raised as a cancel
        stopped it: what the user asked for, on its last attempt too (not dead), with
        what it raised (stopped as its lease was lost: a failed attempt that says so).
        None when neither is cancelling it."""
        if running.cancelled_by_user:
            return self._stopped_while_running(
                row, running, raised="; it raised as it stopped:\n" + _traceback()
            )
        this = asyncio.current_task()
        if self._accepting or this is None or not this.cancelling():
            return None
        logger.warning(
            "job %s (%s) raised while shutdown cut it off; given back all the same:\n%s",
            row.id, row.task, _traceback(),
            extra={"job_id": row.id, "task": row.task, "attempt": row.attempts},
        )  # fmt: skip
        return self._outcome(row, OutcomeKind.RELEASE)

    def _stopped_before_it_ran(self, row: JobRow, running: _Running) -> Outcome:
        """Stopped before its code ran: cancelled; or, its lease lost, given back
        unspent (a job claimed ahead is too)."""
        if running.lease_lost:
            return self._outcome(row, OutcomeKind.RELEASE)
        return self._outcome(row, OutcomeKind.CANCELLED, error="cancelled before it ran")

    def _stopped_while_running(self, row: JobRow, running: _Running, raised: str = "") -> Outcome:
        """Stopped as it ran: cancelled, as asked; or, its lease lost, a failed attempt
        due again at once (dead if it was the last), as lease recovery records it. The
        store applies it only while the attempt is still this worker's: then nobody took
        the job over, and it must not end cancelled, which nobody asked for. Once
        shutdown began, given back instead, attempt unspent, as shutdown's cancellation
        a moment later would have: which of the two stopped the job is a matter of
        timing, and nothing in its code failed."""
        if running.lease_lost and not running.cancel_asked:
            if not self._accepting:
                return self._outcome(row, OutcomeKind.RELEASE)
            running.lease_lost_raised = raised
            return self._failure(row, LEASE_LOST + raised, delay=0.0)
        return self._outcome(row, OutcomeKind.CANCELLED, error=CANCELLED_WHILE_RUNNING + raised)

    def _outcome(
        self,
        row: JobRow,
        kind: OutcomeKind,
        *,
        result: str | None = None,
        error: str | None = None,
        run_at: float | None = None,
    ) -> Outcome:
        return Outcome(
            job_id=row.id,
            worker=self.worker_id,
            attempt=row.attempts,
            kind=kind,
            result=result,
            error=None if error is None else storable(bounded(error)),  # a task may raise anything
            run_at=run_at,
            max_attempts=row.max_attempts,
        )

    def _failure(self, row: JobRow, error: str, *, delay: float | None = None) -> Outcome:
        """A failed attempt: retry after backoff, or dead when out of attempts."""
        if row.attempts >= row.max_attempts:
            return self._outcome(row, OutcomeKind.DEAD, error=error)
        if delay is None:
            delay = backoff_delay(
                row.attempts, base=self.settings.backoff_base, maximum=self.settings.max_backoff
            )
        return self._outcome(row, OutcomeKind.RETRY, error=error, run_at=self.clock.now() + delay)

    def _log(self, row: JobRow, outcome: Outcome, applied: bool, duration: float) -> None:
        if not logger.isEnabledFor(logging.INFO):  # the hot path: nothing will be emitted
            if applied and outcome.kind in _INFO_OUTCOMES:
                return
            if not logger.isEnabledFor(logging.WARNING):
                return
        extra = {
            "job_id": row.id,
            "task": row.task,
            "attempt": row.attempts,
            "duration": round(duration, 6),
            "outcome": str(outcome.kind),
        }
        if not applied:
            logger.warning(
                "job %s (%s) finished as %s but was no longer ours (lease expired or cancelled)",
                row.id, row.task, outcome.kind, extra=extra,
            )  # fmt: skip
        elif outcome.kind is OutcomeKind.SUCCEEDED:
            logger.info("job %s (%s) succeeded in %.3fs", row.id, row.task, duration, extra=extra)
        elif outcome.kind is OutcomeKind.RETRY:
            logger.warning(
                "job %s (%s) failed attempt %d/%d, retrying: %s",
                row.id, row.task, row.attempts, row.max_attempts, _last_line(outcome.error),
                extra=extra,
            )  # fmt: skip
        elif outcome.kind is OutcomeKind.DEAD:
            logger.error(
                "job %s (%s) is dead after %d attempts: %s",
                row.id, row.task, row.attempts, _last_line(outcome.error), extra=extra,
            )  # fmt: skip
        elif outcome.kind is OutcomeKind.RELEASE:
            if row.task not in self.jobs.registry:  # unregistered between claim and run
                why = "by a worker without its task"
            elif not self._accepting:
                why = "by shutdown"
            elif row.attempts >= row.max_attempts:  # claimed on its last attempt, and no
                why = "for want of a free slot here"  # slot was free (see the runner)
            else:  # claimed ahead, or not started yet, as its lease ran out (_Leases)
                why = "before it started, its lease not renewed (heartbeats failing)"
            logger.info(
                "job %s (%s) released %s: it runs again, no attempt spent",
                row.id, row.task, why, extra=extra,
            )  # fmt: skip
        else:
            logger.info("job %s (%s) %s", row.id, row.task, outcome.kind, extra=extra)


CANCELLED_WHILE_RUNNING = "cancelled while running"

LEASE_LOST = (
    "lease lost: this worker could not renew the job's lease (its heartbeats failed), "
    "so it stopped the attempt before the lease ran out and another worker could take it"
)

MAX_ERROR_CHARS = 64 * 1024
"""The most of an error (a traceback) a job keeps: a task may raise an exception whose
text is megabytes, which would be written again at every attempt and shown whole."""


def bounded(error: str) -> str:
    """``error`` cut to ``MAX_ERROR_CHARS``: its start and its end, where a traceback
    names the exception, with a note of what was cut between them."""
    if len(error) <= MAX_ERROR_CHARS:
        return error
    head = MAX_ERROR_CHARS // 4
    tail = MAX_ERROR_CHARS - head
    cut = len(error) - head - tail
    return f"{error[:head]}\n[... {cut:,} characters cut ...]\n{error[-tail:]}"


def _stored_timeout(options: dict[str, Any], default: float | None) -> float | None:
    """The timeout a job's stored options give it, else ``default`` (its task's). One
    that is no number of seconds > 0 (a row written by hand) is refused as corrupt:
    run with, it gave no timeout at all (its alarm failing unseen) or one long past."""
    if "timeout" not in options:
        return default
    value = options["timeout"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the options' timeout {value!r} is not a number of seconds")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the options' timeout {value!r} is not a finite number of seconds > 0")
    return float(value)


def _traceback() -> str:
    """The traceback of the exception being handled, as ``traceback.format_exc()`` gives
    it. Should formatting it fail (on Python 3.11, an exception whose ``__notes__``
    raises), the exception's type and text, after why: the attempt is recorded all the
    same. Unrecorded, the job stayed running, unexplained, until its lease expired."""
    error = sys.exception()
    try:
        return traceback.format_exc()
    except Exception as failure:
        return f"(the traceback could not be formatted: {_describe(failure)})\n{_describe(error)}"


def _describe(error: BaseException | None) -> str:
    """``module.Type: text`` of ``error``, even when its ``str()`` raises."""
    kind = type(error)
    try:
        text = str(error)
    except Exception:
        text = "<exception str() failed>"
    return f"{kind.__module__}.{kind.__qualname__}: {text}"


MAX_RESULT_BYTES = 64 * 1024 * 1024
"""A larger result is a failed attempt: far below what either database refuses (SQLite
1e9 bytes, PostgreSQL 1 GB), so a result never holds up the write of the others."""

_INFO_OUTCOMES = frozenset({OutcomeKind.SUCCEEDED, OutcomeKind.CANCELLED, OutcomeKind.RELEASE})


_LOGGED_LINE = 1_000
"""Characters of a failure's last line that its log record carries: the message of an
exception can be a whole response body (the stored error keeps more)."""


def _last_line(text: str | None) -> str:
    """The traceback's last line that names an exception (an exception group's
    traceback ends with its box drawing, not with what was raised), cut to
    ``_LOGGED_LINE`` characters."""
    for line in reversed((text or "").splitlines()):
        shown = line.strip(" |")
        if shown and not shown.startswith("+-"):
            if len(shown) > _LOGGED_LINE:
                cut = len(shown) - _LOGGED_LINE
                return f"{shown[:_LOGGED_LINE]} [... {cut:,} characters cut]"
            return shown
    return ""


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found
