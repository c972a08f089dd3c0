"""What a ``Jobs`` runs, as the app's code defines it: its tasks (``@jobs.task``),
queue concurrency limits (``jobs.queue``), shared rate limiters (``jobs.limiter``) and
cron/periodic schedules (``@jobs.cron``, ``@jobs.periodic``; ``_scheduler.py`` enqueues
their slots).

``_Registry`` holds these methods of ``Jobs``, which inherits them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

from asyncjobs._cron import Cron, Every, zone
from asyncjobs._errors import ConfigurationError
from asyncjobs._new_jobs import DEFAULT_RETRIES
from asyncjobs._ratelimit import Limiter, RateLimit, parse_rate
from asyncjobs._scheduler import ScheduleInfo
from asyncjobs._settings import Seconds, check_name, positive_int
from asyncjobs._tasks import Task, check_timeout

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs
    from asyncjobs._scheduler import Scheduler

P = ParamSpec("P")
R = TypeVar("R")


class _Registry:
    """``Jobs``' definitions of tasks, queue limits, rate limiters and schedules."""

    if TYPE_CHECKING:
        registry: dict[str, Task[..., Any]]
        queue_limits: dict[str, int]
        limiters: dict[str, Limiter]
        scheduler: Scheduler

    # -- registry --------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: str | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
        rate_limit: str | RateLimit | None = None,
        limiter: str | None = None,
        concurrency: int | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, Awaitable[R]] | str | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
        rate_limit: str | RateLimit | None = None,
        limiter: str | None = None,
        concurrency: int | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
        """Register an ``async def`` as a task (``@jobs.task`` or ``@jobs.task(...)``;
        the name may come first: ``@jobs.task("send_email", queue="email")``)."""
        if isinstance(fn, str):
            if name is not None:
                raise ConfigurationError(
                    f"jobs.task() was given two names, {fn!r} and name={name!r}; give one"
                )
            fn, name = None, fn
        rate = None if rate_limit is None else parse_rate(rate_limit)  # fail at the decorator

        def register(fn: Callable[P, Awaitable[R]]) -> Task[P, R]:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"{getattr(fn, '__qualname__', fn)!r} is not an async def; tasks must be "
                    "coroutine functions"
                )
            task_name = name or _default_name(fn)
            if task_name in self.registry:
                raise ConfigurationError(
                    f"a task named {task_name!r} is already registered; "
                    "pass name=... to one of them"
                )
            if limiter is not None and limiter not in self.limiters:
                raise ConfigurationError(
                    f"task {task_name!r} uses limiter {limiter!r}, which is not defined; call "
                    f"jobs.limiter({limiter!r}, '10/s') before defining the task"
                )
            task = Task(
                cast("Jobs", self),  # Jobs inherits this method
                fn,
                name=task_name,
                queue=queue,
                retries=retries,
                timeout=check_timeout(timeout),
                priority=priority,
                rate_limit=rate,
                limiter=limiter,
                concurrency=concurrency,
            )
            self.registry[task_name] = task
            return task

        return register if fn is None else register(fn)

    def queue(self, name: str, *, concurrency: int) -> None:
        """Bound how many jobs of queue ``name`` run at once across every process."""
        self.queue_limits[check_name(name, "queue")] = positive_int(concurrency, "concurrency")

    # -- schedules (asyncjobs/_scheduler.py) -----------------------------------------

    def cron(
        self,
        expr: str,
        *,
        timezone: str | tzinfo = "UTC",
        catch_up: bool = True,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
    ) -> Callable[[Callable[[], Awaitable[R]]], Task[[], R]]:
        """Register an ``async def`` taking no arguments to run at each slot of the cron
        expression ``expr`` in ``timezone`` (DST-correct), once per slot across all
        processes. ``catch_up``: after downtime, run the most recent missed slot once."""
        return self.scheduler.decorator(
            Cron(expr, zone(timezone)),
            catch_up=catch_up,
            task_options={"name": name, "queue": queue, "retries": retries,
                          "timeout": timeout, "priority": priority},
        )  # fmt: skip

    def periodic(
        self,
        *,
        every: Seconds,
        catch_up: bool = True,
        name: str | None = None,
        queue: str = "default",
        retries: int = DEFAULT_RETRIES,
        timeout: Seconds | None = None,
        priority: int = 0,
    ) -> Callable[[Callable[[], Awaitable[R]]], Task[[], R]]:
        """Like ``cron`` but every ``every`` (whole seconds or a timedelta), at multiples
        of it since the Unix epoch (every 5 minutes: :00, :05, ...)."""
        return self.scheduler.decorator(
            Every.parse(every),
            catch_up=catch_up,
            task_options={"name": name, "queue": queue, "retries": retries,
                          "timeout": timeout, "priority": priority},
        )  # fmt: skip

    def schedules(self) -> list[ScheduleInfo]:
        """Every cron/periodic schedule registered here, with its next run time."""
        return self.scheduler.infos()

    def limiter(
        self, name: str, rate: str | RateLimit, *, key: Callable[..., Any] | None = None
    ) -> None:
        """Define a rate limit shared by every task with ``limiter=name``, across processes.

        ``rate`` is ``"10/s"``-style text or a ``RateLimit``. With ``key``, a function
        of the job's arguments (``key(*args, **kwargs)``, run at enqueue), each key
        gets its own bucket of that rate (per customer, per domain); None or ``""``
        draws from the shared bucket. A key is text (or an int) of at most 1,000 bytes
        as UTF-8; a job whose key is not is refused at enqueue.
        """
        name = check_name(name, "limiter name")
        if key is not None and not callable(key):
            raise ConfigurationError(f"limiter key must be a function, got {key!r}")
        self.limiters[name] = Limiter(name=name, limit=parse_rate(rate), key=key)


def _default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``, with the module's importable name when ``fn`` is defined in
    the script Python was started with: a worker imports that script by its name
    (``--app myapp:jobs``), and a job queued as ``__main__.send`` would never run."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ConfigurationError(f"{fn!r} has no module and qualified name; pass name=...")
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        path = getattr(main, "__file__", None)
        if spec is not None and spec.name != "__main__":  # python -m package.module
            module = spec.name
        elif isinstance(path, str):  # python myapp.py
            module = Path(path).stem
    return f"{module}.{qualname}"
