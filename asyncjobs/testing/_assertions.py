"""Assertions about what code under test enqueued: ``assert_enqueued`` and friends.

Arguments are matched the way the task would receive them: with the task's
signature, ``assert_enqueued(jobs, send, user_id=42)`` matches a job enqueued as
``send.enqueue(42, address=...)``. Only the arguments you name are compared.
"""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Any
from unittest.mock import ANY

from asyncjobs._errors import AsyncJobsError, TaskNotRegistered
from asyncjobs._jobs import Jobs
from asyncjobs._models import JobInfo, JobStatus, info_from_row
from asyncjobs._tasks import Task
from asyncjobs.stores import JobRow, Store
from asyncjobs.stores._dependents import COUNTS_FLAG, RESULT_FLAG, wants

MAX_JOBS = 100_000

_NOTHING = object()
_AWAITED = object()  # an argument the job is given only when released (see _awaited)


async def enqueued(
    jobs: Jobs, task: Task[..., Any] | str | None = None, /, *args: Any, **kwargs: Any
) -> list[JobInfo]:
    """Jobs of ``task`` (any task if None) whose arguments match, oldest first.

    Jobs in every status count: a job that already ran was still enqueued.
    """
    name = _task_name(task)
    if task is None and (args or kwargs):
        raise TypeError("give a task to match arguments against")
    definition = task if isinstance(task, Task) else jobs.registry.get(name or "")
    if definition is not None:
        _check_could_match(definition, args, kwargs)
    # Rows, not just JobInfo: their options say what a chain or batch adds at release.
    # One more than it looks at: to tell "all of them" from "some".
    rows, now = await jobs._list_rows(None, None, name, MAX_JOBS + 1)  # opens the store
    if isinstance(task, Task):
        _check_same_store(jobs, task)  # (after the store opened: see _same_jobs)
    elif name is not None and definition is None and not rows:
        await _refuse_unknown_name(jobs, name)
    if len(rows) > MAX_JOBS:
        of = "" if name is None else f" of task {name!r}"
        raise AsyncJobsError(
            f"more than {MAX_JOBS:,} jobs{of} are stored, more than the assertions read: "
            "a match among the older ones would go unseen. Purge the jobs earlier tests "
            "left (`await jobs.purge(...)`), or use a fresh store per test"
        )
    rows.reverse()
    infos = [info_from_row(row, now) for row in rows]
    if task is None:
        return infos
    return [
        info
        for row, info in zip(rows, infos, strict=True)
        if _matches(definition, info, args, kwargs, _awaited(row, info))
    ]


async def assert_enqueued(
    jobs: Jobs, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any
) -> JobInfo:
    """Assert a job of ``task`` with these arguments was enqueued; return the newest match."""
    found = await enqueued(jobs, task, *args, **kwargs)
    if not found:
        raise AssertionError(
            f"expected a job {_call(_task_name(task), args, kwargs)}; "
            + await _what_was_enqueued(jobs, task)
        )
    return found[-1]


async def assert_not_enqueued(
    jobs: Jobs, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any
) -> None:
    """Assert no job of ``task`` matching these arguments was enqueued."""
    found = await enqueued(jobs, task, *args, **kwargs)
    if found:
        listed = ", ".join(_describe(info) for info in found)
        raise AssertionError(
            f"expected no job {_call(_task_name(task), args, kwargs)}, found {len(found)}: {listed}"
        )


def _task_name(task: Task[..., Any] | str | None) -> str | None:
    if task is None or isinstance(task, str):
        return task
    if isinstance(task, Task):
        return task.name
    raise TypeError(f"expected a task or a task name, got {task!r}")


def _check_could_match(
    definition: Task[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse expected arguments that enqueue would have refused (a misspelt keyword, one
    argument too many): no job can match them, so ``assert_not_enqueued`` would pass
    whatever was enqueued. Checked against the signature enqueue checks."""
    signature = definition.arguments.signature
    if signature is None:
        return
    signature = signature.replace(return_annotation=inspect.Signature.empty)  # args only
    try:
        signature.bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"{_call(definition.name, args, kwargs)} can never match a job of task "
            f"{definition.name!r}, whose function takes {signature}: {error}"
        ) from None


def _check_same_store(jobs: Jobs, task: Task[..., Any]) -> None:
    """A task of another ``Jobs`` enqueues into that one's store: looking in ``jobs``
    would find none of its jobs, and ``assert_not_enqueued`` would pass whatever ran."""
    if task.jobs is jobs or _same_jobs(task.jobs.store, jobs.store):
        return
    theirs, ours = repr(task.jobs.store), repr(jobs.store)
    if theirs == ours:  # a PostgresStore's repr shows neither the user nor the search_path
        ours += " (another schema or database behind the same address)"
    raise AsyncJobsError(
        f"task {task.name!r} belongs to another Jobs, on {theirs}: its jobs go "
        f"there, not to {ours}. To test your app's own Jobs, point it at the test "
        "store: `jobs = await asyncjobs_isolate(myapp.jobs)` in a fixture (or "
        "asyncjobs.testing.replace_store)"
    )


async def _refuse_unknown_name(jobs: Jobs, name: str) -> None:
    """A name that no task of ``jobs`` has and no stored job carries (a misspelt one) can
    match no job, so ``assert_not_enqueued`` would pass whatever was enqueued. A task of
    another process that this one enqueues by name (a web process with ``workers=False``
    that never imports the worker's tasks) is known once one of its jobs is stored."""
    stored = {info.task for info in await jobs.list(limit=MAX_JOBS)}
    close = difflib.get_close_matches(name, sorted(stored | set(jobs.registry)), n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise TaskNotRegistered(
        f"task {name!r} is not registered on this Jobs and no job of it is stored, so no "
        f"job can match it{hint}. A task of your app's own Jobs: test that Jobs, on the "
        "test store (`jobs = await asyncjobs_isolate(myapp.jobs)` in a fixture); one "
        "defined only in another process: look at the task of each job in "
        "`await enqueued(jobs)`"
    )


def _same_jobs(one: Store, other: Store) -> bool:
    """Whether two stores hold the same jobs: the same object, or two stores of ours of
    one kind that say so (the same SQLite file; the same PostgreSQL database and schema).
    Not their ``repr``: a PostgresStore's leaves the user and search_path out, so
    stores in two schemas passed for one, and a SQLite path spelt two ways for two."""
    if one is other:
        return True
    same = getattr(one, "_same_jobs", None)
    return type(one) is type(other) and same is not None and bool(same(other))


def _awaited(row: JobRow, info: JobInfo) -> tuple[list[Any], dict[str, Any]]:
    """Stand-ins for what the job is given only when released, which its stored
    arguments lack until then: the previous result first (a chain member with
    ``pass_result=True``), its batch's counts as ``batch=`` (an ``on_complete``).
    Only ``unittest.mock.ANY`` matches a stand-in: what the job will get is not known
    yet, and ANY is the one expected value that needs not know it. Once released, the
    job holds what it was given, and that matches as any argument does: a chain member's
    flag says so, an ``on_complete``'s counts are in its arguments: a ``batch`` whose
    ``id`` is the batch's, which is the ``on_complete``'s own id (not a placeholder the
    spec was given, which the counts replace), unless it waits again, retried, for
    counts it has not been given yet."""
    given = info.kwargs.get("batch")
    counts_awaited = wants(row.options, COUNTS_FLAG) and (
        row.status == JobStatus.WAITING
        or not (isinstance(given, dict) and given.get("id") == row.id)
    )
    return (
        [_AWAITED] if wants(row.options, RESULT_FLAG) else [],
        {"batch": _AWAITED} if counts_awaited else {},
    )


def _matches(
    definition: Task[..., Any] | None,
    info: JobInfo,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    awaited: tuple[list[Any], dict[str, Any]] = ([], {}),
) -> bool:
    expected_args, expected_kwargs = _as_json(list(args)), _as_json(kwargs)
    first, added = awaited
    have_args, have_kwargs = first + info.args, {**info.kwargs, **added}
    if definition is not None:
        want = _bind(definition, expected_args, expected_kwargs, partial=True)
        have = _bind(definition, have_args, have_kwargs, partial=False)
        if want is not None and have is not None:
            return all(_same(have.get(key, _NOTHING), value) for key, value in want.items())
    # No signature to go by (a task enqueued by name that only the worker defines):
    # positional arguments must be equal, named ones a subset; what the job awaits
    # (the previous result first, ``batch=``) is a stand-in there too.
    if expected_args and not (
        len(have_args) == len(expected_args)
        and all(_same(h, w) for h, w in zip(have_args, expected_args, strict=True))
    ):
        return False
    return all(
        _same(have_kwargs.get(key, _NOTHING), value) for key, value in expected_kwargs.items()
    )


def _same(have: Any, want: Any) -> bool:
    """Equal as JSON: unlike ``==``, true is not 1 and 1.0 is not 1."""
    if have is _AWAITED:
        return want is ANY
    if have is _NOTHING:
        return False
    try:
        return json.dumps(have, sort_keys=True) == json.dumps(want, sort_keys=True)
    except (TypeError, ValueError):  # not JSON, so never stored: only == can say
        return bool(have == want)


def _bind(
    definition: Task[..., Any], args: list[Any], kwargs: dict[str, Any], *, partial: bool
) -> dict[str, Any] | None:
    """Arguments by parameter name (``**kwargs`` spread out), or None if they do not bind."""
    try:
        signature = inspect.signature(definition.fn)
        bound = (
            signature.bind_partial(*args, **kwargs) if partial else signature.bind(*args, **kwargs)
        )
    except (TypeError, ValueError):
        return None
    if not partial:  # what the task receives, its defaults included
        bound.apply_defaults()
    named: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[key].kind is inspect.Parameter.VAR_POSITIONAL:
            named[key] = list(value)
        else:
            named[key] = value
    return named


def _as_json(value: Any) -> Any:
    """What the value looks like after the round trip through the store (tuples -> lists)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def _call(name: str | None, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _describe(info: JobInfo) -> str:
    return f"{_call(info.task, info.args, info.kwargs)} [{info.status}]"


async def _what_was_enqueued(jobs: Jobs, task: Task[..., Any] | str) -> str:
    same = await enqueued(jobs, task)
    if same:
        return f"{len(same)} job(s) of that task were: " + ", ".join(_describe(i) for i in same)
    others = await enqueued(jobs)
    if not others:
        return "no job was enqueued at all"
    return "none of that task; enqueued: " + ", ".join(_describe(i) for i in others[:20])
