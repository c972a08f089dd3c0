"""``Jobs``' queries and admin calls on stored jobs (``get``, ``list``, ``retry``,
``cancel``, ``purge``), and waiting for a job's result (``Job.result()``), woken
by the runner when the job finishes in this process.

``_Queries`` holds these methods of ``Jobs``, which inherits them.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

import anyio

from asyncjobs._errors import AsyncJobsError, ConfigurationError, JobFailed, StoreError
from asyncjobs._models import FINISHED, JobInfo, JobStatus, info_from_row
from asyncjobs._settings import Seconds, is_name, job_id_or_none, positive_int, seconds

if TYPE_CHECKING:
    from asyncjobs._clock import Clock
    from asyncjobs._runner import Runner
    from asyncjobs._settings import Settings
    from asyncjobs.stores import JobRow, Store

logger = logging.getLogger("asyncjobs")

# Seconds a result waiter first waits before it reads the job again, doubling up to the
# poll interval: the job may finish in another process, which cannot wake it.
_FIRST_POLL = 0.005


async def list_rows(store: Store, *, preview: int | None, **filters: Any) -> list[JobRow]:
    """``store.list(**filters)``, reading previews where asked and the store can: a
    ``Store`` of your own written before ``preview=`` existed reads values whole, as it
    always did, rather than fail the dashboard's list and the CLI's."""
    if preview is not None and _takes_preview(type(store)):
        return await store.list(preview=preview, **filters)
    return await store.list(**filters)


@functools.cache
def _takes_preview(kind: type) -> bool:
    try:
        parameters = inspect.signature(kind.list).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return False
    return "preview" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def could_match(*, queue: object, task: object) -> bool:
    """Whether a queue and task filter (None: any) could match a job: False for a name
    no job can have (and a store could choke on, such as a lone surrogate); a filter
    that is not a string at all is a ConfigurationError."""
    for name, value in (("queue", queue), ("task", task)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{name} must be a string, got {value!r}")
        if value is not None and not is_name(value):
            return False
    return True


class _Queries:
    """``Jobs``' reads and admin writes of stored jobs, and result waiting."""

    if TYPE_CHECKING:
        store: Store
        runner: Runner
        _host: asyncio.Task[None] | None
        _result_events: dict[str, list[anyio.Event]]
        settings: Settings

        @property
        def clock(self) -> Clock: ...

    def _wake_workers(self) -> None:
        """After an admin write that may let a job run (one queued again, a group's or a
        concurrency slot's job gone): this process's workers, if they run, claim now
        rather than at their next poll (their own writes wake no one else here)."""
        if self._host is not None:
            self.runner.wake()

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobInfo | None:
        """The job as stored now, or None when no job has that id (never stored, or
        discarded, purged or pruned since)."""
        checked = job_id_or_none(job_id)
        row = None if checked is None else await self.store.get(checked)
        return None if row is None else info_from_row(row, self.clock.now())

    async def list(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs newest first, optionally filtered."""
        rows, now = await self._list_rows(status, queue, task, limit)
        return [info_from_row(row, now) for row in rows]

    async def _list_rows(
        self,
        status: str | None,
        queue: str | None,
        task: str | None,
        limit: int,
        *,
        preview: int | None = None,
    ) -> tuple[builtins.list[JobRow], float]:
        """``list``'s rows, and the time they were read at; ``preview`` as ``Store.list``
        takes it (the CLI's ``list`` reads only the start of big values)."""
        if status is not None:
            status = JobStatus(status).value
        limit = min(positive_int(limit, "limit"), 2**62)  # any bigger limit means "all"
        now = self.clock.now()
        if not could_match(queue=queue, task=task):
            return [], now
        rows = await list_rows(
            self.store, preview=preview, status=status, queue=queue, task=task, limit=limit,
            now=now,
        )  # fmt: skip
        return rows, now

    async def retry(self, job_id: str) -> bool:
        """Put a dead or cancelled job back in the queue with one more attempt; False if
        there is no such job, or it is neither.

        The members after a chain member that were cancelled before they ran, when it
        ended, wait again: the chain goes on once it succeeds. A chain member that never
        ran (cancelled when its chain broke) waits again for the member before it, and
        runs once that one succeeds: at once, with its result if it takes it, if it
        already has. If that member is no longer stored (pruned
        or purged) there is nothing to wait for, and it runs on its own; unless it takes
        the previous result (``pass_result=True``), which it never got and no longer
        can: then this raises ``RetryRefused`` (run without it, its arguments would be
        shifted by one). Retry the chain from its first job, or enqueue the task anew."""
        checked = job_id_or_none(job_id)
        if checked is None:
            return False
        done = await self.store.retry(checked, now=self.clock.now())
        if done:
            logger.info(
                "job %s retried by hand", checked, extra={"job_id": checked, "action": "retry"}
            )
            self._wake_workers()
        return done

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; True if this call cancelled it.

        A job not yet running is cancelled at once. A running one is asked to stop (in
        this process at once, in another at its worker's next heartbeat) and stays
        ``running``, holding its slot, until it has; then it ends ``cancelled``."""
        checked = job_id_or_none(job_id)
        if checked is None:
            return False
        cancelled = await self.store.cancel([checked], now=self.clock.now())
        for cid in cancelled:
            # A running job ends cancelled when it stops; its worker logs that too.
            logger.info("job %s cancelled", cid, extra={"job_id": cid, "action": "cancel"})
            self.runner.cancel_local(cid)
            self.runner.cancel_asked(cid)  # one stopped for its lease ends cancelled too
            self._notify_finished(cid)  # its waiters here read it again (or wait on)
        if cancelled:
            self._wake_workers()  # the next job of its group may run now
        return bool(cancelled)

    async def purge(self, *, status: str | None = None, older_than: Seconds | None = None) -> int:
        """Delete jobs with ``status`` and/or finished more than ``older_than`` ago.

        ``older_than`` with the status of jobs that have not finished (waiting,
        scheduled, queued) is refused: it would match none of them, and purge 0 as
        though there were none. A chain's members after the first are kept until they
        finish: deleted before they ran, they would leave the chain reading as
        succeeded. Cancel the chain first to purge them. The members a dead or cancelled
        one cancelled before they ran are kept while it is stored, as retention keeps
        them (retrying it runs them), and go with it when this purge takes it too."""
        if status is None and older_than is None:
            raise ValueError("purge() needs a status or older_than")
        if status is not None:
            status = JobStatus(status).value
            if status == "running":
                raise ValueError("running jobs cannot be purged; cancel them first")
            if older_than is not None and not JobStatus(status).finished:
                raise ValueError(
                    f"older_than counts from when a job finished; {status} jobs have not "
                    "finished: purge them by status alone"
                )
        now = self.clock.now()
        before = None if older_than is None else now - seconds(older_than, "older_than")
        count = await self.store.purge(status=status, older_than=before, now=now)
        if count:
            age = None if before is None else now - before
            logger.info(
                "%d job(s) purged (status %s%s)", count, status or "any",
                "" if age is None else f", finished over {age:g}s ago",
                extra={"action": "purge", "status": status, "older_than": age, "count": count},
            )  # fmt: skip
            self._wake_workers()  # the next job of a group whose job went may run now
            self._wake_result_waiters()
        return count

    # -- results ---------------------------------------------------------------------

    def _wake_result_waiters(self) -> None:
        """After a deletion (``discard``, ``purge``, which also cancel what waits on
        what they delete; which jobs, the store does not say): every waiter here reads
        its job again now, not at its next poll. Those whose job goes on wait again."""
        for job_id in builtins.list(self._result_events):
            self._notify_finished(job_id)

    def _notify_finished(self, job_id: str) -> None:
        for event in self._result_events.pop(job_id, ()):
            event.set()

    async def _wait_result(self, job_id: str, timeout: float | None) -> Any:
        """Wait (real time) for a job to finish: woken at once when it finishes here,
        polling with backoff when another process runs it. A ``timeout`` of 0 (or
        less) reads the job once: its result if it has finished, else TimeoutError."""
        delay = _FIRST_POLL
        once = timeout is not None and timeout <= 0
        event: anyio.Event | None = None  # this waiter's, in _result_events until set
        try:
            with anyio.fail_after(None if once else timeout):
                while True:
                    if event is None or event.is_set():  # before the read: no race
                        event = anyio.Event()
                        self._result_events.setdefault(job_id, []).append(event)
                    try:
                        info = await self.get(job_id)
                    except StoreError:
                        # The store is briefly unreachable (a PostgreSQL restart): keep
                        # waiting until our own timeout rather than failing the waiter.
                        logger.debug("reading job %s failed; retrying", job_id, exc_info=True)
                    else:
                        if info is None:
                            raise AsyncJobsError(f"job {job_id} does not exist (or was purged)")
                        if info.status == JobStatus.SUCCEEDED:
                            return info.result
                        if info.status in FINISHED:
                            raise JobFailed(job_id, info.status, info.error)
                    if once:
                        raise TimeoutError
                    with anyio.move_on_after(delay):
                        await event.wait()
                    delay = min(delay * 2, self.settings.poll_interval)
        finally:  # a waiter that gives up leaves nothing behind
            waiters = self._result_events.get(job_id, [])
            if event in waiters:
                waiters.remove(event)
                if not waiters:
                    del self._result_events[job_id]
