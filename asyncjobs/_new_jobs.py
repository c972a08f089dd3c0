"""What ``Jobs`` inserts for a job: the ``JobSpec`` that an ``enqueue`` call names,
and the ``NewJob`` row built from it (payload, run time, attempts, queue, priority,
rate-limit key), inserted running in a free local slot when it can run at once.

``_NewJobs`` holds these methods of ``Jobs``, which inherits them; ``Jobs`` decides
whether a job can skip the queue (``_runs_at_once``) and inserts the rows (``_insert``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from asyncjobs._codec import encode_payload
from asyncjobs._models import new_job_id
from asyncjobs._settings import check_name
from asyncjobs._tasks import JobOptions, JobSpec, Task
from asyncjobs.stores._dependents import COUNTS_FLAG, RESULT_FLAG
from asyncjobs.stores._job_rows import CheckedJob, NewJob

if TYPE_CHECKING:
    from asyncjobs._ratelimit import Limiter
    from asyncjobs._runner import Runner
    from asyncjobs._settings import Settings

DEFAULT_RETRIES = 3

_RESULT = object()  # stands for the result a chain member is given before its arguments


def check_arguments(
    definition: Task[..., Any], spec: JobSpec[Any], *, pass_result: bool, batch_counts: bool
) -> None:
    """Refuse (``TypeError``) arguments ``definition``'s function cannot be called with,
    counting those a chain or batch adds when it releases the job."""
    args, kwargs, note = spec.args, spec.kwargs, ""
    if pass_result:
        args = (_RESULT, *args)
        note = (
            " (with pass_result=True, a chain member after the first is given the result "
            "of the one before as its first argument)"
        )
    if batch_counts:
        kwargs = {**kwargs, "batch": None}
        note = " (as a batch's on_complete it is given the batch's counts as batch=...)"
    definition.arguments.check(spec.task, args, kwargs, note=note)


class _NewJobs:
    """``Jobs``' steps from an ``enqueue`` call's arguments to the row to insert."""

    if TYPE_CHECKING:
        registry: dict[str, Task[..., Any]]
        limiters: dict[str, Limiter]
        settings: Settings
        runner: Runner

        def _runs_at_once(self, task: str, queue: str, o: JobOptions) -> bool: ...

    def _spec(
        self,
        task: Task[..., Any] | JobSpec[Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> JobSpec[Any]:
        if isinstance(task, JobSpec):
            if args or kwargs:
                raise TypeError("pass arguments to task.spec(...), not to enqueue(spec, ...)")
            return task
        if isinstance(task, Task):
            return task.spec(*args, **kwargs)
        if isinstance(task, str):
            return JobSpec(task=check_name(task, "task name"), args=args, kwargs=kwargs,
                           definition=self.registry.get(task))  # fmt: skip
        raise TypeError(f"enqueue() takes a task, a JobSpec or a task name, not {task!r}")

    def _new_job(
        self,
        spec: JobSpec[Any],
        now: float,
        *,
        status: str | None = None,
        chain_next: str | None = None,
        batch_id: str | None = None,
        job_id: str | None = None,
        dispatch: bool = False,
        pass_result: bool = False,
        batch_counts: bool = False,
    ) -> NewJob:
        """The row to insert for ``spec``. ``dispatch``: if this process can run it at
        once, insert it running in a free local slot (``Runner.reserve``).
        ``pass_result``: a chain member given the result before it as its first argument;
        ``batch_counts``: an ``on_complete`` given its batch's counts as ``batch=``.

        Raises ``TypeError`` when the task, as defined here, cannot take the arguments
        (a task enqueued by name that this process does not define is not checked)."""
        definition = spec.definition or self.registry.get(spec.task)
        if definition is not None:
            arguments = definition.arguments
            # The common case in two comparisons: positional arguments only, none added.
            if (
                spec.kwargs
                or pass_result
                or batch_counts
                or not arguments.fewest <= len(spec.args) <= arguments.most
            ):
                check_arguments(
                    definition, spec, pass_result=pass_result, batch_counts=batch_counts
                )
        o = spec.options
        payload = encode_payload(
            spec.args, spec.kwargs, max_bytes=self.settings.max_payload_bytes, task=spec.task
        )
        run_at = o.run_at if o.run_at is not None else now + (o.delay or 0.0)
        retries = o.retries if o.retries is not None else (
            definition.retries if definition else DEFAULT_RETRIES
        )  # fmt: skip
        explicit: dict[str, Any] = {}
        if o.retries is not None:
            explicit["retries"] = o.retries
        if o.timeout is not None:
            explicit["timeout"] = o.timeout
        if pass_result:
            explicit[RESULT_FLAG] = True
        if batch_counts:
            explicit[COUNTS_FLAG] = True
        if status is None:
            status = "scheduled" if run_at > now else "queued"
        job_id = job_id or new_job_id(now)
        queue = o.queue or (definition.queue if definition else "default")
        rate_key = self._rate_key(definition, spec)
        worker: str | None = None
        lease: float | None = None
        if (
            dispatch
            and status == "queued"
            and self._runs_at_once(spec.task, queue, o)
            and self.runner.reserve(job_id)
        ):
            status, worker = "running", self.runner.worker_id
            lease = self.settings.visibility_timeout
        # Checked: what it is built from was (options, definition, arguments), so the
        # store does not check it again (``check_new_jobs``).
        return CheckedJob(
            id=job_id,
            task=spec.task,
            queue=queue,
            payload=payload,
            status=status,
            priority=self._priority(spec, definition),
            run_at=run_at,
            max_attempts=retries + 1,
            options=json.dumps(explicit) if explicit else None,
            idempotency_key=o.idempotency_key,
            group_key=o.group,
            chain_next=chain_next,
            batch_id=batch_id,
            rate_key=rate_key,
            worker=worker,
            lease=lease,
            # Its limiter (if any) and that limiter's key are unknown here: a worker
            # that defines the task computes the key (``Runner.assign_keys``).
            key_pending=definition is None,
        )

    def _priority(self, spec: JobSpec[Any], definition: Task[..., Any] | None = None) -> int:
        """The job's priority: its own option, else its task's (as the worker defines
        it), else 0."""
        if spec.options.priority is not None:
            return spec.options.priority
        definition = definition or spec.definition or self.registry.get(spec.task)
        return definition.priority if definition else 0

    def _rate_key(self, definition: Task[..., Any] | None, spec: JobSpec[Any]) -> str | None:
        limiter = self.limiters.get(definition.limiter or "") if definition else None
        return None if limiter is None else limiter.key_for(spec.args, dict(spec.kwargs))
