"""``Jobs``: the façade users hold. Task registry, enqueue, queries, start/stop."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

import anyio

from asyncjobs._batching import GroupCommit
from asyncjobs._clock import Clock, SystemClock
from asyncjobs._codec import JSON, encode_payload
from asyncjobs._errors import AsyncJobsError, ConfigurationError, JobFailed, TaskNotRegistered
from asyncjobs._models import FINISHED, Job, JobInfo, JobStatus, info_from_row
from asyncjobs._runner import Runner
from asyncjobs._settings import Seconds, Settings, check_name, positive_int, seconds
from asyncjobs._tasks import JobSpec, Task, check_timeout
from asyncjobs.stores import Store, default_url, open_store
from asyncjobs.stores._protocol import NewJob

logger = logging.getLogger("asyncjobs")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_RETRIES = 3


class Jobs:
    """Background jobs in this event loop, stored durably.

    ``Jobs()`` uses ``$ASYNCJOBS_URL`` or ``./asyncjobs.db``. The store opens on
    first use; ``async with jobs:`` (or ``start()``/``stop()``) runs workers.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        concurrency: int = 10,
        workers: bool = True,
        queues: Sequence[str] | None = None,
        visibility_timeout: Seconds = 60,
        shutdown_timeout: Seconds = 10,
        poll_interval: Seconds = 1.0,
        retention: Seconds = timedelta(days=7),
        dead_retention: Seconds | None = None,
        max_payload_bytes: int = 256 * 1024,
        synchronous: str = "normal",
        backoff_base: Seconds = 1.0,
        max_backoff: Seconds = 3600,
        clock: Clock | None = None,
        store: Store | None = None,
    ) -> None:
        url = url if url is not None else default_url()
        self.settings = Settings.build(
            url=url,
            concurrency=concurrency,
            workers=workers,
            queues=queues,
            visibility_timeout=visibility_timeout,
            shutdown_timeout=shutdown_timeout,
            poll_interval=poll_interval,
            retention=retention,
            dead_retention=dead_retention,
            max_payload_bytes=max_payload_bytes,
            synchronous=synchronous,
            backoff_base=backoff_base,
            max_backoff=max_backoff,
            clock=clock or SystemClock(),
        )
        self.store: Store = store or open_store(url, synchronous=self.settings.synchronous)
        self.registry: dict[str, Task[..., Any]] = {}
        self.queue_limits: dict[str, int] = {}
        self.runner = Runner(self)
        self._inserts: GroupCommit[NewJob, str] = GroupCommit(self._flush_inserts)
        self._result_events: dict[str, anyio.Event] = {}
        self._host: asyncio.Task[None] | None = None
        self._stop_requested = anyio.Event()

    def __repr__(self) -> str:
        return f"<Jobs {self.store!r} tasks={len(self.registry)}>"

    @property
    def clock(self) -> Clock:
        return self.settings.clock

    # -- registry --------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
        rate_limit: Any = None,
        limiter: str | None = None,
        concurrency: int | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, Awaitable[R]] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
        rate_limit: Any = None,
        limiter: str | None = None,
        concurrency: int | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
        """Register an ``async def`` as a task (``@jobs.task`` or ``@jobs.task(...)``)."""

        def register(fn: Callable[P, Awaitable[R]]) -> Task[P, R]:
            if not asyncio.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"{getattr(fn, '__qualname__', fn)!r} is not an async def; tasks must be "
                    "coroutine functions"
                )
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            if task_name in self.registry:
                raise ConfigurationError(
                    f"a task named {task_name!r} is already registered; "
                    "pass name=... to one of them"
                )
            task = Task(
                self,
                fn,
                name=task_name,
                queue=queue,
                retries=retries,
                timeout=check_timeout(timeout),
                priority=priority,
                rate_limit=rate_limit,
                limiter=limiter,
                concurrency=concurrency,
            )
            self.registry[task_name] = task
            return task

        return register if fn is None else register(fn)

    def queue(self, name: str, *, concurrency: int) -> None:
        """Bound how many jobs of queue ``name`` run at once across every process."""
        self.queue_limits[check_name(name, "queue")] = positive_int(concurrency, "concurrency")

    # -- enqueue ---------------------------------------------------------------------

    @overload
    async def enqueue(self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Job[R]: ...

    @overload
    async def enqueue(self, task: JobSpec[R], /) -> Job[R]: ...

    @overload
    async def enqueue(self, task: str, /, *args: JSON, **kwargs: JSON) -> Job[Any]: ...

    async def enqueue(
        self, task: Task[..., Any] | JobSpec[Any] | str, /, *args: Any, **kwargs: Any
    ) -> Job[Any]:
        """Store a job durably and return its handle; workers pick it up at once.

        Raises ``NotSerializable`` / ``PayloadTooLarge`` naming the argument; nothing
        is written then.
        """
        spec = self._spec(task, args, kwargs)
        new = self._new_job(spec, self.clock.now())
        (job_id,) = await self._insert([new])
        return Job(self, job_id)

    async def enqueue_many(self, specs: Sequence[JobSpec[Any]]) -> list[Job[Any]]:
        """Enqueue several jobs in one transaction: all are stored or none."""
        now = self.clock.now()
        new = [self._new_job(self._spec(spec, (), {}), now) for spec in specs]
        if not new:
            return []
        return [Job(self, job_id) for job_id in await self._insert(new)]

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
    ) -> NewJob:
        definition = spec.definition or self.registry.get(spec.task)
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
        if status is None:
            status = "scheduled" if run_at > now else "queued"
        default_priority = definition.priority if definition else 0
        return NewJob(
            id=job_id or uuid.uuid4().hex,
            task=spec.task,
            queue=o.queue or (definition.queue if definition else "default"),
            payload=payload,
            status=status,
            priority=o.priority if o.priority is not None else default_priority,
            run_at=run_at,
            max_attempts=retries + 1,
            options=json.dumps(explicit) if explicit else None,
            idempotency_key=o.idempotency_key,
            group_key=o.group,
            chain_next=chain_next,
            batch_id=batch_id,
        )

    async def _insert(self, new: list[NewJob]) -> list[str]:
        ids = await self._inserts.submit_many(new)
        if self._host is not None:
            self.runner.wake()
        return ids

    async def _flush_inserts(self, new: list[NewJob]) -> list[str]:
        return await self.store.insert(new, now=self.clock.now())

    # -- queries and admin -----------------------------------------------------------

    async def get(self, job_id: str) -> JobInfo | None:
        row = await self.store.get(str(job_id))
        return None if row is None else info_from_row(row, self.clock.now())

    async def list(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs newest first, optionally filtered."""
        if status is not None:
            status = JobStatus(status).value
        now = self.clock.now()
        rows = await self.store.list(
            status=status, queue=queue, task=task, limit=positive_int(limit, "limit"), now=now
        )
        return [info_from_row(row, now) for row in rows]

    async def retry(self, job_id: str) -> bool:
        """Put a dead or cancelled job back in the queue with one more attempt."""
        done = await self.store.retry(str(job_id), now=self.clock.now())
        if done and self._host is not None:
            self.runner.wake()
        return done

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished (a running one is stopped)."""
        cancelled = await self.store.cancel([str(job_id)], now=self.clock.now())
        for cid in cancelled:
            self.runner.cancel_local(cid)
        return bool(cancelled)

    async def purge(self, *, status: str | None = None, older_than: Seconds | None = None) -> int:
        """Delete jobs with ``status`` and/or finished more than ``older_than`` ago."""
        if status is None and older_than is None:
            raise ValueError("purge() needs a status or older_than")
        if status is not None:
            status = JobStatus(status).value
            if status == "running":
                raise ValueError("running jobs cannot be purged; cancel them first")
        now = self.clock.now()
        before = None if older_than is None else now - seconds(older_than, "older_than")
        return await self.store.purge(status=status, older_than=before, now=now)

    # -- results ---------------------------------------------------------------------

    def _notify_finished(self, job_id: str) -> None:
        event = self._result_events.pop(job_id, None)
        if event is not None:
            event.set()

    async def _wait_result(self, job_id: str, timeout: float | None) -> Any:
        """Wait (real time) for a job to finish: woken at once when it finishes here,
        polling with backoff when another process runs it."""
        delay = 0.005
        with anyio.fail_after(timeout):
            while True:
                event = self._result_events.setdefault(job_id, anyio.Event())
                info = await self.get(job_id)
                if info is None:
                    raise AsyncJobsError(f"job {job_id} does not exist (or was purged)")
                if info.status == JobStatus.SUCCEEDED:
                    return info.result
                if info.status in FINISHED:
                    raise JobFailed(job_id, info.status, info.error)
                with anyio.move_on_after(delay):
                    await event.wait()
                delay = min(delay * 2, self.settings.poll_interval)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._host is not None

    async def start(self) -> None:
        """Open the store and, unless ``workers=False``, start the workers."""
        await self.store.open()
        if self._host is not None or not self.settings.workers:
            return
        if not self.registry:
            logger.warning("starting workers with no task registered; nothing will run")
        self._stop_requested = anyio.Event()
        ready = anyio.Event()
        self._host = asyncio.get_running_loop().create_task(self._main(ready), name="asyncjobs")
        waiter = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait({self._host, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._host in done:
            waiter.cancel()
            host, self._host = self._host, None
            host.result()  # raises why it stopped
            raise AsyncJobsError("the workers stopped while starting")

    async def _main(self, ready: anyio.Event) -> None:
        """Own every long-lived task of this ``Jobs``: loops and running jobs."""
        runner = self.runner
        await runner.recover()
        async with anyio.create_task_group() as loops:
            async with anyio.create_task_group() as jobs_tg:
                claim_scope = anyio.CancelScope()

                async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                    with claim_scope:
                        await runner.serve(jobs_tg, task_status=task_status)

                await loops.start(runner.heartbeat_loop)
                await loops.start(runner.maintenance_loop)
                await loops.start(serve)
                logger.info(
                    "asyncjobs workers started (%s, concurrency %d, worker %s)",
                    self.store, self.settings.concurrency, runner.worker_id,
                )  # fmt: skip
                ready.set()
                await self._stop_requested.wait()
                claim_scope.cancel()
                with self.clock.move_on_after(self.settings.shutdown_timeout):
                    await runner.wait_idle()
                if runner.running:
                    logger.warning(
                        "shutdown: cancelling %d job(s) still running after %ss; "
                        "they will run again",
                        len(runner.running), self.settings.shutdown_timeout,
                    )  # fmt: skip
                jobs_tg.cancel_scope.cancel()
            loops.cancel_scope.cancel()
        logger.info("asyncjobs workers stopped")

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within ``shutdown_timeout``, then
        cancel the rest and give them back without spending an attempt."""
        host = self._host
        if host is None:
            return
        self._stop_requested.set()
        try:
            await asyncio.shield(host)
        finally:
            if host.done():
                self._host = None

    async def close(self) -> None:
        """Stop the workers if they run, then close the store."""
        await self.stop()
        await self.store.close()

    async def __aenter__(self) -> Jobs:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- testing hooks ---------------------------------------------------------------

    async def drain(self) -> None:
        """Run ready jobs until none is ready or running (see ``asyncjobs.testing.drain``)."""
        if self._host is not None:
            raise AsyncJobsError("drain() is for a Jobs whose workers are not started")
        await self.runner.drain()

    def require_task(self, name: str) -> Task[..., Any]:
        try:
            return self.registry[name]
        except KeyError:
            raise TaskNotRegistered(
                f"task {name!r} is not registered in this process; import the module that "
                "defines it"
            ) from None
