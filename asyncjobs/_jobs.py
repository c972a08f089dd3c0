"""``Jobs``: the façade users hold. Settings, enqueue, operations, start/stop; it inherits
the task registry (``_registry.py``), queries (``_queries.py``), the worker lifecycle
(``_lifecycle.py``, with ``_shutdown.py``) and the building of new rows (``_new_jobs.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio

from asyncjobs._asgi import lifespan as _lifespan
from asyncjobs._batching import GroupCommit, InFlight
from asyncjobs._clock import Clock, SystemClock
from asyncjobs._codec import JSON
from asyncjobs._errors import AsyncJobsError, ConfigurationError, DataRefused
from asyncjobs._lifecycle import _Lifecycle
from asyncjobs._models import Job
from asyncjobs._new_jobs import _NewJobs
from asyncjobs._queries import _Queries, could_match
from asyncjobs._ratelimit import Limiter
from asyncjobs._registry import _Registry
from asyncjobs._runner import Runner
from asyncjobs._scheduler import Scheduler
from asyncjobs._settings import (
    SYNCHRONOUS_DEFAULT,
    Seconds,
    Settings,
    check_store,
    job_id_or_none,
    positive_int,
    store_url,
)
from asyncjobs._tasks import JobOptions, JobSpec, Task
from asyncjobs._transaction import bound_insert
from asyncjobs._transaction import transaction as _transaction
from asyncjobs._workflows import Batch, Chain, create_batch, create_chain
from asyncjobs.stores import Store, default_url, open_store
from asyncjobs.stores._job_rows import NewJob

if TYPE_CHECKING:
    from asyncjobs._dashboard.auth import DashboardAuth
    from asyncjobs._metrics import ASGIApp
    from asyncjobs._stats import Stats

logger = logging.getLogger("asyncjobs")

P = ParamSpec("P")
R = TypeVar("R")


class Jobs(_Registry, _Queries, _Lifecycle, _NewJobs):
    """Background jobs in this event loop, stored durably.

    ``Jobs()`` uses ``$ASYNCJOBS_URL`` or ``./asyncjobs.db``. The store opens on
    first use; ``async with jobs:`` (or ``start()``/``stop()``) runs workers.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
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
        synchronous: str = SYNCHRONOUS_DEFAULT,  # "normal"; with a SQLite store=, the store's
        backoff_base: Seconds = 1.0,
        max_backoff: Seconds = 3600,
        clock: Clock | None = None,
        store: Store | None = None,
    ) -> None:
        if isinstance(url, os.PathLike):  # a plain file path: Jobs(tmp_path / "jobs.db")
            url = os.fspath(url)
        if url is not None and not isinstance(url, str):  # Jobs(42), a path in bytes
            raise ConfigurationError(f"url must be text or a path, got {url!r}")
        if store is not None:
            store = check_store(store)
            url = store_url(url, store)
        elif url is None:
            url = default_url()
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
            store=store,
            backoff_base=backoff_base,
            max_backoff=max_backoff,
            clock=SystemClock() if clock is None else clock,
        )
        self.store: Store = (
            open_store(url, synchronous=self.settings.synchronous) if store is None else store
        )
        self.registry: dict[str, Task[..., Any]] = {}
        self.queue_limits: dict[str, int] = {}
        self.limiters: dict[str, Limiter] = {}
        self.runner = Runner(self)
        self.scheduler = Scheduler(self)
        # A batch the database refuses as data is written again one enqueue at a time:
        # only the enqueue it refuses fails, not those that shared its transaction.
        self._inserts: GroupCommit[NewJob, str] = GroupCommit(
            self._flush_inserts, apart=lambda error: isinstance(error, DataRefused)
        )
        self._keyed_inserts: InFlight[NewJob] = InFlight()  # on their own: see _insert
        self._result_events: dict[str, list[anyio.Event]] = {}
        self._host: asyncio.Task[None] | None = None
        self._stop_requested = anyio.Event()
        self._stop_now = anyio.Event()
        self._workers_ready = anyio.Event()  # set once the workers started (start())
        self._entries = 0  # lifetimes entered and not left (_Lifecycle._enter)
        self._joined = 0  # start() calls that joined the workers' start (_Lifecycle)
        self._left_by: asyncio.Task[None] | None = None  # workers whose start() left them
        self._stops = 0  # stop() calls so far: one during a start() cuts it short
        self._close_owed = False  # close() cancelled as the workers drained (_Shutdown)

    def __repr__(self) -> str:
        return f"<Jobs {self.store!r} tasks={len(self.registry)}>"

    @property
    def clock(self) -> Clock:
        return self.settings.clock

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

        Raises ``NotSerializable`` / ``PayloadTooLarge`` naming the argument, and
        ``TypeError`` for arguments the task (as defined here) cannot take; nothing is
        written then.
        """
        spec = self._spec(task, args, kwargs)
        new = self._new_job(spec, self.clock.now(), dispatch=True)
        (job_id,) = await self._insert([new])
        return Job(self, job_id)

    async def enqueue_many(self, specs: Sequence[JobSpec[Any]]) -> list[Job[Any]]:
        """Enqueue several jobs in one transaction: all are stored or none."""
        now = self.clock.now()
        checked = _specs(specs)
        # A keyed job takes the batch out of the group commit (see _insert), and only
        # the group commit starts jobs inserted running: then none is.
        dispatch = all(spec.options.idempotency_key is None for spec in checked)
        # Built highest priority first, so that the free slots (dispatch) go to the jobs
        # that would be claimed first; inserted in the order given.
        order = sorted(range(len(checked)), key=lambda i: -self._priority(checked[i]))
        built: dict[int, NewJob] = {}
        try:
            for i in order:
                built[i] = self._new_job(checked[i], now, dispatch=dispatch)
        except BaseException:
            # A spec was refused: free the slots reserved for the others.
            self.runner.unreserve(list(built.values()))
            raise
        if not built:
            return []
        new = [built[i] for i in range(len(checked))]
        return [Job(self, job_id) for job_id in await self._insert(new)]

    async def chain(self, *specs: JobSpec[Any], pass_result: bool = False) -> Chain:
        """Enqueue jobs to run one after another (one transaction): each starts when the
        one before succeeds; if one ends dead or cancelled, the rest are cancelled.
        ``pass_result=True``: each job gets the previous result as its first argument."""
        return await create_chain(self, specs, pass_result=pass_result)

    async def batch(
        self, specs: Sequence[JobSpec[Any]], *, on_complete: JobSpec[Any] | None = None
    ) -> Batch:
        """Enqueue jobs to run in parallel (one transaction); ``on_complete`` runs once
        after all finished, with ``batch=BatchCounts`` if it takes a ``batch`` argument."""
        return await create_batch(self, specs, on_complete=on_complete)

    def _runs_at_once(self, task: str, queue: str, o: JobOptions) -> bool:
        """Can a job skip the queue for a local slot? Not when the store must decide
        (ordered groups, idempotency keys, concurrency and rate limits), when this
        process does not run it, or inside a caller's transaction (no commit yet)."""
        definition = self.registry.get(task)  # what the runner runs it with
        return (
            self._host is not None
            and definition is not None
            and o.group is None
            and o.idempotency_key is None
            and definition.concurrency is None
            and definition.rate_limit is None
            and definition.limiter is None
            and queue not in self.queue_limits
            and (self.settings.queues is None or queue in self.settings.queues)
            and bound_insert(self) is None
        )

    async def _insert(self, new: list[NewJob]) -> list[str]:
        outer = bound_insert(self)  # inside `async with jobs.transaction(conn):`
        if outer is not None:
            ids = await outer(new, self.clock.now())
        elif any(j.idempotency_key is not None for j in new):
            # On its own, not in the group commit: on PostgreSQL the insert of a key
            # that another open transaction holds waits for that transaction, and the
            # wait must hold up this caller only (it may be the holder's own enqueue).
            # Keyed jobs never run at once, nor do the others of their enqueue_many,
            # so there is no local slot to give back.
            ids = await self._keyed_inserts.run(self.store.insert(new, now=self.clock.now()), new)
        else:
            try:
                ids = await self._inserts.submit_many(new)
            except BaseException:
                self.runner.unreserve(new)
                raise
        if self.runner.accepting and not all(j.worker for j in new):
            self.runner.wake()  # the workers, or a drain() running a job that enqueues
        return ids

    async def _flush_inserts(self, new: list[NewJob]) -> list[str]:
        # The clock, read by the store once it can write: the jobs inserted running
        # are leased from then, not from before a wait for the file's write lock.
        # Failed: each _insert unreserves.
        inserted = await self.store.insert(new, now=self.clock.now)
        if self.runner.dispatched(new, inserted):
            # Shutdown began during the insert, maybe past the workers' last write (the
            # insert outlasted shutdown_timeout): give the jobs back now, not never.
            await self.runner.flush_outbox()
        return inserted

    # -- operations (asyncjobs/_stats.py, _metrics.py, _dashboard/) -------------------

    async def retry_dead(self, *, queue: str | None = None, task: str | None = None) -> int:
        """Put every dead job (of that queue/task) back in the queue; return how many.
        A job whose stored status this version does not know reads as dead, and is one.
        Each is retried as ``retry()`` does: a chain goes on once its member succeeds."""
        if not could_match(queue=queue, task=task):
            return 0
        count = await self.store.retry_dead(queue=queue, task=task, now=self.clock.now())
        if count:
            logger.info(
                "%d dead job(s) retried by hand (queue %s, task %s)", count, queue or "any",
                task or "any", extra={"queue": queue, "task": task, "action": "retry_dead"},
            )  # fmt: skip
            self._wake_workers()
        return count

    async def discard(self, job_id: str) -> bool:
        """Delete one job that is not running (cancel a running one first)."""
        checked = job_id_or_none(job_id)
        if checked is None:
            return False
        deleted = await self.store.delete([checked], now=self.clock.now()) == 1
        if deleted:
            logger.info("job %s discarded", checked, extra={"job_id": checked, "action": "discard"})
            self._wake_workers()  # the next job of its group may run now
            self._wake_result_waiters()
        return deleted

    async def stats(self) -> Stats:
        """The store's numbers as a JSON-shaped dict (``asyncjobs stats --json`` prints
        it). ``totals``, each of ``queues`` and each of its ``tasks`` hold jobs by
        status, the oldest due job's wait, throughput and failure rate over the last one
        and five minutes, run and wait time percentiles, and how many are stuck;
        ``stuck_jobs`` lists those, ``workers`` the processes seen in the last hour,
        ``schedules`` this process's cron and periodic tasks; ``generated_at`` says when."""
        from asyncjobs._stats import collect

        return await collect(self)

    def metrics_app(self) -> ASGIApp:
        """An ASGI app serving Prometheus metrics read from the store (mount at /metrics)."""
        from asyncjobs._metrics import metrics_app

        return metrics_app(self)

    def dashboard(self, *, auth: DashboardAuth | None = None) -> ASGIApp:
        """The web dashboard as an ASGI app to mount; ``auth`` is required: a callable
        ``request -> bool`` (or awaitable bool) or a ``(username, password)`` tuple."""
        from asyncjobs._dashboard import dashboard_app

        return dashboard_app(self, auth=auth)

    # -- lifecycle -------------------------------------------------------------------

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[dict[str, Any]]:
        """ASGI lifespan: ``Starlette(lifespan=jobs.lifespan)``; the state holds ``jobs``.

        Entered more than once at a time (two apps sharing this ``Jobs``, with
        ``JobsMiddleware`` or ``async with jobs:`` too), the workers start at the first
        entry and stop, the store closing, at the last exit."""
        return _lifespan(self)

    def transaction(self, conn: Any) -> AbstractAsyncContextManager[None]:
        """Enqueue inside ``conn``'s open transaction: jobs exist iff the caller commits.

        ``conn`` is an aiosqlite connection to the store's own SQLite file (or an
        asyncpg connection to its PostgreSQL database).
        """
        return _transaction(self, conn)

    async def __aenter__(self) -> Jobs:
        """Start the workers; nested in another ``async with jobs:`` or a lifespan of
        this ``Jobs``, they are running already, and its exit leaves them running."""
        await self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._leave():
            await self.close()

    # -- testing hooks ---------------------------------------------------------------

    async def drain(self, *, max_jobs: int = 10_000) -> None:
        """Enqueue the cron/periodic slots due now, then run ready jobs until none is
        ready or running, ``max_jobs`` at most (see ``asyncjobs.testing.drain``)."""
        self._forget_stopped_workers()
        self._refuse_crashed_workers("drain()")  # kept for stop() to raise why
        if self._host is not None:
            raise AsyncJobsError("drain() is for a Jobs whose workers are not started")
        await self.scheduler.tick()
        await self.runner.drain(max_jobs=positive_int(max_jobs, "max_jobs"))


def _specs(specs: object) -> list[JobSpec[Any]]:
    """``enqueue_many``'s specs, checked: a task or a name in their place would be
    enqueued without its arguments, and a string as one job per letter."""
    if isinstance(specs, str | JobSpec) or not isinstance(specs, Iterable):
        raise TypeError(f"enqueue_many() takes a list of JobSpecs, not {specs!r}")
    checked = list(specs)
    for i, spec in enumerate(checked):
        if not isinstance(spec, JobSpec):
            raise TypeError(
                f"enqueue_many() item {i} must be a JobSpec (task.spec(...)), got {spec!r}"
            )
    return checked
