"""Tasks (``@jobs.task``), per-call options and ``JobSpec``: a job not yet enqueued."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Generic, ParamSpec, TypeVar

from asyncjobs._arguments import Arguments
from asyncjobs._codec import JSON
from asyncjobs._errors import ConfigurationError
from asyncjobs._ratelimit import RateLimit, parse_rate
from asyncjobs._settings import (
    Seconds,
    check_instant,
    check_name,
    check_text,
    positive_int,
    seconds,
)

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs
    from asyncjobs._models import Job

P = ParamSpec("P")
R = TypeVar("R")

PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"priority must be an int, got {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ConfigurationError(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {priority}"
        )
    return priority


MAX_RETRIES = 1000


def check_retries(retries: object) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ConfigurationError(
            f"retries must be a whole number from 0 to {MAX_RETRIES}, got {retries!r}"
        )
    return retries


def check_max_attempts(max_attempts: object) -> int:
    """A job's ``max_attempts`` as stored: its retries plus one."""
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_RETRIES + 1
    ):
        raise ConfigurationError(
            f"max_attempts must be a whole number from 1 to {MAX_RETRIES + 1} (retries + 1), "
            f"got {max_attempts!r}"
        )
    return max_attempts


def check_delay(delay: Seconds) -> float:
    return seconds(delay, "delay")


def check_timeout(timeout: Seconds | None) -> float | None:
    return None if timeout is None else seconds(timeout, "timeout", allow_zero=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    """Per-call options given with ``task.options(...)``; None means "not given"."""

    delay: float | None = None
    run_at: float | None = None
    priority: int | None = None
    queue: str | None = None
    idempotency_key: str | None = None
    retries: int | None = None
    timeout: float | None = None
    group: str | None = None

    def merge(self, other: JobOptions) -> JobOptions:
        """These options with those ``other`` gives (not None) in their place; a delay
        given drops an earlier run_at, and a run_at an earlier delay."""
        merged = {name: getattr(self, name) for name in _OPTION_NAMES}
        merged.update(
            (name, value) for name in _OPTION_NAMES if (value := getattr(other, name)) is not None
        )
        if other.delay is not None:
            merged["run_at"] = None
        elif other.run_at is not None:
            merged["delay"] = None
        return JobOptions(**merged)


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(JobOptions))


def make_options(
    *,
    delay: Seconds | None = None,
    run_at: datetime | None = None,
    priority: int | None = None,
    queue: str | None = None,
    idempotency_key: str | None = None,
    retries: int | None = None,
    timeout: Seconds | None = None,
    group: str | None = None,
) -> JobOptions:
    """Validate per-call options once, at the call site."""
    if delay is not None and run_at is not None:
        raise ConfigurationError("give either delay or run_at, not both")
    run_at_epoch: float | None = None
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise ConfigurationError(f"run_at must be a datetime, got {run_at!r}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ConfigurationError(
                f"run_at must be timezone-aware (e.g. datetime.now(UTC)), got naive {run_at!r}"
            )
        try:
            epoch = run_at.timestamp()
        except (OverflowError, ValueError, OSError) as error:
            raise ConfigurationError(f"run_at {run_at!r} is out of range: {error}") from None
        run_at_epoch = check_instant(epoch, f"run_at {run_at!r}")  # readable back
    if idempotency_key is not None:
        check_text(idempotency_key, "idempotency_key", max_length=500)
    return JobOptions(
        delay=None if delay is None else check_delay(delay),
        run_at=run_at_epoch,
        priority=None if priority is None else check_priority(priority),
        queue=None if queue is None else check_name(queue, "queue"),
        idempotency_key=idempotency_key,
        retries=None if retries is None else check_retries(retries),
        timeout=check_timeout(timeout),
        group=None if group is None else check_name(group, "group"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec(Generic[R]):
    """A job not yet enqueued: for ``enqueue``, ``enqueue_many``, ``chain`` and ``batch``."""

    task: str
    args: tuple[JSON, ...] = ()
    kwargs: Mapping[str, JSON] = field(default_factory=dict)
    options: JobOptions = field(default_factory=JobOptions)
    definition: Task[..., R] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.definition is None:  # made by name: checked as an enqueue by name is
            check_name(self.task, "task name")
            # Taken as given, not coerced: args=("a@example.com") (its comma missing)
            # would be 13 arguments of one letter, a dict its keys, pairs keywords.
            args: object = self.args
            if not isinstance(args, tuple | list):
                comma = " (a one-item tuple needs its comma: (x,))" if isinstance(args, str) else ""
                raise TypeError(
                    f"JobSpec args must be a tuple of the arguments, got {args!r}{comma}"
                )
            kwargs: object = self.kwargs
            if not isinstance(kwargs, Mapping) or not all(type(key) is str for key in kwargs):
                raise TypeError(f"JobSpec kwargs must be a dict of str keys, got {kwargs!r}")

    def with_options(
        self,
        *,
        delay: Seconds | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        timeout: float | timedelta | None = None,
        group: str | None = None,
    ) -> JobSpec[R]:
        """A copy of this job with these options, checked and layered as
        ``task.options`` does. For a job of a task this process does not define
        (``JobSpec(task="reports.send", args=(...))``), the way to give its queue, a
        delay, a priority or a key: by name it is stored in queue ``default``."""
        given = make_options(
            delay=delay,
            run_at=run_at,
            priority=priority,
            queue=queue,
            idempotency_key=idempotency_key,
            retries=retries,
            timeout=timeout,
            group=group,
        )
        return dataclasses.replace(self, options=self.options.merge(given))


def accepts_keyword(fn: Callable[..., object], name: str) -> bool:
    """Whether ``fn`` can be called with the keyword argument ``name``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )


class Task(Generic[P, R]):
    """An ``async def`` registered with ``@jobs.task``.

    Calling it runs the function inline; ``enqueue`` runs it in the background.
    """

    def __init__(
        self,
        jobs: Jobs,
        fn: Callable[P, Awaitable[R]],
        *,
        name: str,
        queue: str,
        retries: int,
        timeout: float | None,
        priority: int,
        rate_limit: str | RateLimit | None = None,
        limiter: str | None = None,
        concurrency: int | None = None,
        options: JobOptions | None = None,
    ) -> None:
        self.jobs = jobs
        self.fn = fn
        self.name = check_name(name, "task name")
        self.queue = check_name(queue, "queue")
        self.retries = check_retries(retries)
        self.timeout = timeout
        self.priority = check_priority(priority)
        self.rate_limit = None if rate_limit is None else parse_rate(rate_limit)
        self.limiter = limiter
        self.concurrency = None if concurrency is None else positive_int(concurrency, "concurrency")
        self._options = options or JobOptions()
        self._arguments: Arguments | None = None
        self.takes_batch = accepts_keyword(fn, "batch")
        """Whether, as a batch's ``on_complete``, it is given the counts as ``batch=``."""
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    @property
    def arguments(self) -> Arguments:
        """What its function accepts: read on first use, shared with its ``options()`` copies."""
        if self._arguments is None:
            self._arguments = Arguments.of(self.fn)
        return self._arguments

    async def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self.fn(*args, **kwargs)

    def options(
        self,
        *,
        delay: Seconds | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        retries: int | None = None,
        timeout: float | timedelta | None = None,
        group: str | None = None,
    ) -> Task[P, R]:
        """A copy of this task whose jobs get these options (the task itself is unchanged)."""
        given = make_options(
            delay=delay,
            run_at=run_at,
            priority=priority,
            queue=queue,
            idempotency_key=idempotency_key,
            retries=retries,
            timeout=timeout,
            group=group,
        )
        # A copy, not a new Task: its settings are checked and its function's
        # signature read already (``options()`` may be called per request).
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, _arguments=self.arguments)
        copy._options = self._options.merge(given)
        return copy

    def spec(self, /, *args: P.args, **kwargs: P.kwargs) -> JobSpec[R]:
        """A job of this task (with this copy's options) not yet enqueued, for
        ``jobs.enqueue``, ``enqueue_many``, ``chain`` and ``batch``, which check its
        arguments."""
        return JobSpec(
            task=self.name, args=tuple(args), kwargs=kwargs, options=self._options, definition=self
        )

    async def enqueue(self, /, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Store a job of this task and return its handle: ``jobs.enqueue(task, ...)``."""
        return await self.jobs.enqueue(self.spec(*args, **kwargs))
