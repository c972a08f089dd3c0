"""Edges of the enqueue API, on both backends: names in a JobSpec, a keyword named
``self``, ``on_complete`` given a ``batch=``, and one refused row in a shared commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from asyncjobs import ConfigurationError, Job, Jobs, JobSpec
from asyncjobs._errors import DataRefused
from asyncjobs.stores._job_rows import Inserted, NewJob
from asyncjobs.testing import drain


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


def register_echo(jobs: Jobs) -> Any:
    @jobs.task(name="echo")
    async def echo(*args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    return echo


@pytest.mark.parametrize("name", ["", " padded", "a\x00b", "x" * 201, "x\ud800"])
async def test_a_jobspec_by_name_is_checked_like_an_enqueue_by_name(jobs: Jobs, name: str) -> None:
    """A name no worker could define would stay queued for good (or, refused by the
    database, fail every enqueue that shared its commit)."""
    echo = register_echo(jobs)
    await echo.enqueue(0)
    with pytest.raises(ConfigurationError, match="task name"):
        await jobs.enqueue(name)
    with pytest.raises(ConfigurationError, match="task name"):
        await jobs.enqueue(JobSpec(task=name))
    with pytest.raises(ConfigurationError, match="task name"):
        await jobs.enqueue_many([echo.spec(1), JobSpec(task=name)])
    assert len(await jobs.list()) == 1


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ("a@example.com", {}),  # args=("a@example.com") without its comma
        ({"to": "a@example.com"}, {}),
        (iter(["a@example.com"]), {}),
        (None, {}),
        ((), [("to", "a@example.com")]),
        ((), {1: "a@example.com"}),
    ],
)
async def test_a_jobspec_made_by_hand_takes_arguments_as_given_or_is_refused(
    jobs: Jobs, args: Any, kwargs: Any
) -> None:
    """``JobSpec(task="send", args=("a@example.com"))`` (a string, its comma missing) was
    stored as 13 arguments of one letter each, a dict as its keys, pairs as keyword
    arguments: silent coercion, which strict JSON refuses; the job failed at every
    attempt where the task is not defined. Such arguments are refused, naming them."""
    with pytest.raises(TypeError, match="JobSpec"):
        await jobs.enqueue(JobSpec(task="send", args=args, kwargs=kwargs))
    assert await jobs.list() == []
    stored: Job[Any] = await jobs.enqueue(JobSpec(task="send", args=("a@example.com",)))
    assert (await stored.info()).args == ["a@example.com"]


async def test_a_keyword_argument_named_self_reaches_the_task(jobs: Jobs) -> None:
    echo = register_echo(jobs)
    handles = [
        await jobs.enqueue("echo", self=0),
        await jobs.enqueue(echo, self=1),
        await echo.enqueue(self=2),
        await jobs.enqueue(echo.spec(self=3)),
    ]
    await drain(jobs)
    for n, handle in enumerate(handles):
        assert await handle.result(timeout=5) == [[], {"self": n}]


async def test_on_complete_gets_the_counts_in_place_of_a_batch_it_was_given(
    jobs: Jobs,
) -> None:
    """README: the counts replace any ``batch=`` the spec was given (a task whose
    ``batch`` is a required keyword needs a placeholder for a type checker)."""
    echo = register_echo(jobs)
    got: list[Any] = []

    @jobs.task(name="done")
    async def done(*, batch: Any) -> None:
        got.append(batch)

    made = await jobs.batch([echo.spec(1)], on_complete=done.spec(batch="placeholder"))
    await drain(jobs)
    assert got == [{"id": made.id, "total": 1, "succeeded": 1, "dead": 0, "cancelled": 0}]


async def test_a_row_the_database_refuses_fails_its_own_enqueue_alone(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enqueues that share a group commit with one the database refuses as data are
    written all the same: the batch is tried again an enqueue at a time."""
    echo = register_echo(jobs)
    await echo.enqueue(0)  # the store is open
    insert = jobs.store.insert

    async def refusing(new: Sequence[NewJob], *, now: float) -> Inserted:
        if any('"poison"' in job.payload for job in new):
            raise DataRefused("the database refused a value (a fault injected by the test)")
        return await insert(new, now=now)

    monkeypatch.setattr(jobs.store, "insert", refusing)
    results = await asyncio.gather(
        *[echo.enqueue(n) for n in range(1, 6)],
        echo.enqueue("poison"),
        *[echo.enqueue(n) for n in range(6, 11)],
        return_exceptions=True,
    )
    refused = results.pop(5)
    assert isinstance(refused, DataRefused)
    assert all(not isinstance(r, BaseException) for r in results), results
    await drain(jobs)
    got = [await h.result(timeout=5) for h in results]  # type: ignore[union-attr]
    assert got == [[[n], {}] for n in range(1, 11)]
