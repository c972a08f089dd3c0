"""Enqueue: arguments, options, validation, idempotency, enqueue_many."""

from __future__ import annotations

import functools
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest.mock import AsyncMock

import anyio
import pytest

from asyncjobs import (
    ConfigurationError,
    Jobs,
    JobSpec,
    JobStatus,
    NotSerializable,
    PayloadTooLarge,
)
from asyncjobs.testing import FakeClock, drain


def count_rows(db_url: str) -> int:
    path = db_url.removeprefix("sqlite:///")
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            return int(db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


async def test_enqueue_stores_a_queued_job_with_its_arguments(jobs: Jobs) -> None:
    @jobs.task(queue="email", retries=5)
    async def send(user_id: int, address: str) -> None: ...

    job = await jobs.enqueue(send, 42, address="a@example.com")
    info = await job.info()
    status: str = info.status  # a StrEnum compares equal to the plain string
    assert status == "queued"
    assert info.status is JobStatus.QUEUED
    assert info.queue == "email"
    assert info.args == [42]
    assert info.kwargs == {"address": "a@example.com"}
    assert info.max_attempts == 6
    assert info.attempts == 0
    assert isinstance(job.id, str)
    assert info.enqueued_at.tzinfo is not None


async def test_task_enqueue_is_the_same_as_jobs_enqueue(jobs: Jobs) -> None:
    @jobs.task
    async def add(a: int, b: int) -> int:
        return a + b

    job = await add.enqueue(1, b=2)
    assert (await job.info()).task == add.name
    await drain(jobs)
    assert await job.result(timeout=5) == 3


async def test_calling_a_task_runs_it_inline(jobs: Jobs) -> None:
    @jobs.task
    async def double(x: int) -> int:
        return 2 * x

    assert await double(21) == 42
    assert await jobs.list() == []


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((b"raw",), {}, "argument 0"),
        ((1, {1: "x"}), {}, "argument 1"),
        ((), {"when": datetime(2030, 1, 1, tzinfo=UTC)}, "keyword argument 'when'"),
        ((float("nan"),), {}, "argument 0"),
        (((1, 2),), {}, "argument 0"),
        ((), {"s": {1, 2}}, "keyword argument 's'"),
        (([float("inf")],), {}, "argument 0"),
    ],
)
async def test_unencodable_argument_is_refused_naming_it_and_nothing_is_written(
    jobs: Jobs, db_url: str, args: tuple[object, ...], kwargs: dict[str, object], named: str
) -> None:
    @jobs.task(name="t")
    async def t(*args: object, **kwargs: object) -> None: ...

    await jobs.enqueue(t, 1)  # the store exists
    with pytest.raises(NotSerializable, match=named):
        await jobs.enqueue(t, *args, **kwargs)
    assert count_rows(db_url) == 1


async def test_payload_over_the_limit_is_refused(make_jobs: object, db_url: str) -> None:
    jobs = Jobs(db_url, max_payload_bytes=100, clock=FakeClock())
    try:

        @jobs.task
        async def t(text: str) -> None: ...

        with pytest.raises(PayloadTooLarge, match="over the limit of 100 bytes"):
            await jobs.enqueue(t, "x" * 200)
        await jobs.enqueue(t, "x" * 10)
        assert count_rows(db_url) == 1
    finally:
        await jobs.close()


async def test_unicode_big_ints_and_nesting_round_trip(jobs: Jobs) -> None:
    @jobs.task
    async def echo(value: object) -> object:
        return value

    value = {"s": "héllo \U0001f600 \ud800", "n": 2**200, "l": [[[{"a": None}]]], "f": -0.5}
    job = await echo.enqueue(value)
    assert (await job.info()).args == [value]
    await drain(jobs)
    assert await job.result(timeout=5) == value


async def test_delay_makes_a_job_scheduled_until_due(jobs: Jobs, clock: FakeClock) -> None:
    ran: list[int] = []

    @jobs.task
    async def remind(n: int) -> None:
        ran.append(n)

    job = await jobs.enqueue(remind.options(delay=60), 1)
    assert (await job.info()).status == "scheduled"
    await drain(jobs)
    assert ran == []
    clock.advance(59)
    await drain(jobs)
    assert ran == []
    clock.advance(1)
    assert (await job.info()).status == "queued"
    await drain(jobs)
    assert ran == [1]


async def test_run_at_needs_an_aware_datetime(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.task
    async def t() -> None: ...

    with pytest.raises(ConfigurationError, match="timezone-aware"):
        t.options(run_at=datetime(2030, 1, 1))
    when = datetime.fromtimestamp(clock.now(), UTC) + timedelta(hours=1)
    job = await jobs.enqueue(t.options(run_at=when))
    assert (await job.info()).run_at == when


@pytest.mark.parametrize(
    "options",
    [
        {"delay": -1},
        {"priority": 2**40},
        {"priority": "high"},
        {"retries": -1},
        {"timeout": 0},
        {"queue": ""},
        {"queue": "bad\nname"},
        {"idempotency_key": ""},
        {"delay": float("nan")},
    ],
)
async def test_absurd_options_are_refused(jobs: Jobs, options: dict[str, object]) -> None:
    @jobs.task
    async def t() -> None: ...

    with pytest.raises(ConfigurationError):
        t.options(**options)  # type: ignore[arg-type]


async def test_options_returns_a_copy(jobs: Jobs) -> None:
    @jobs.task(queue="a")
    async def t() -> None: ...

    other = t.options(queue="b", priority=3)
    job1 = await t.enqueue()
    job2 = await other.enqueue()
    assert (await job1.info()).queue == "a"
    info2 = await job2.info()
    assert (info2.queue, info2.priority) == ("b", 3)


async def test_options_layer_and_a_later_delay_or_run_at_replaces_the_other(
    jobs: Jobs, clock: FakeClock
) -> None:
    @jobs.task(queue="a")
    async def t() -> None: ...

    at = clock.now() + 3600
    base = t.options(queue="b", priority=3, delay=60)
    later = base.options(run_at=datetime.fromtimestamp(at, UTC))  # the delay is dropped
    sooner = later.options(delay=5, priority=7)  # and now the run_at
    for task, run_at, priority in ((base, clock.now() + 60, 3), (later, at, 3),
                                   (sooner, clock.now() + 5, 7)):  # fmt: skip
        info = await (await task.enqueue()).info()
        assert (info.queue, info.priority) == ("b", priority)
        assert info.run_at.timestamp() == pytest.approx(run_at, abs=1e-3)
    assert (await (await t.enqueue()).info()).queue == "a"  # the task itself is unchanged


async def test_idempotency_key_returns_the_existing_job(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.task
    async def verify(user_id: int) -> None: ...

    first = await jobs.enqueue(verify.options(idempotency_key="verify:42"), 42)
    second = await jobs.enqueue(verify.options(idempotency_key="verify:42"), 42)
    assert first.id == second.id
    await drain(jobs)
    third = await jobs.enqueue(verify.options(idempotency_key="verify:42"), 42)
    assert third.id == first.id
    assert len(await jobs.list()) == 1


async def test_concurrent_enqueues_with_one_key_make_one_job(jobs: Jobs) -> None:
    import anyio

    @jobs.task
    async def t() -> None: ...

    ids: list[str] = []

    async def one() -> None:
        ids.append((await jobs.enqueue(t.options(idempotency_key="k"))).id)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert len(set(ids)) == 1
    assert len(await jobs.list()) == 1


async def test_enqueue_many_is_one_transaction(jobs: Jobs, db_url: str) -> None:
    @jobs.task
    async def t(x: object) -> None: ...

    made = await jobs.enqueue_many([t.spec(i) for i in range(5)])
    assert len(made) == 5
    with pytest.raises(NotSerializable, match="argument 0"):
        await jobs.enqueue_many([t.spec(1), t.spec(b"bad")])
    assert count_rows(db_url) == 5


async def test_enqueue_many_refuses_what_is_not_a_list_of_specs_and_writes_nothing(
    jobs: Jobs, db_url: str
) -> None:
    """A task name given for the list was enqueued as one job per letter, and a task
    given in place of its spec as a job without its arguments."""

    @jobs.task(name="t")
    async def t(*args: object) -> None: ...

    await jobs.enqueue(t, 0)  # the store exists
    with pytest.raises(TypeError, match="list of JobSpecs"):
        await jobs.enqueue_many("t")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of JobSpecs"):
        await jobs.enqueue_many(t.spec(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"item 1 must be a JobSpec \(task.spec"):
        await jobs.enqueue_many([t.spec(1), t])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="item 0 must be a JobSpec"):
        await jobs.enqueue_many(["t"])  # type: ignore[list-item]
    assert count_rows(db_url) == 1
    made = await jobs.enqueue_many(t.spec(n) for n in range(2))  # type: ignore[arg-type]
    assert [(await job.info()).args for job in made] == [[0], [1]]


async def test_enqueue_by_name_of_a_task_this_process_lacks(jobs: Jobs, make_jobs: object) -> None:
    job = await jobs.enqueue("elsewhere.task", 1, x=2)
    info = await job.info()
    assert (info.task, info.args, info.kwargs) == ("elsewhere.task", [1], {"x": 2})
    assert info.queue == "default"
    await drain(jobs)  # not claimed: this process does not know the task
    assert (await job.info()).status == "queued"


async def test_a_job_by_name_takes_options_and_runs_on_a_worker_of_its_queue(
    jobs: Jobs, make_jobs: Callable[..., Jobs], clock: FakeClock
) -> None:
    """An enqueue-only process that does not import the task gives its job the queue a
    worker serving only that queue takes (by name alone it lands in ``default``)."""
    worker = make_jobs(queues=["email"])  # on the same fake clock
    worker.queue("email", concurrency=1)

    @worker.task(name="send", queue="email")
    async def send(address: str) -> str:
        return address

    plain = await jobs.enqueue("send", "a@example.com")
    spec: JobSpec[str] = JobSpec(task="send", args=("b@example.com",))
    spec = spec.with_options(queue="email", delay=60)
    later = spec.with_options(priority=5)  # layered: the delay and the queue stay
    assert (spec.options.priority, later.options.queue, later.options.delay) == (None, "email", 60)
    given = await jobs.enqueue(later)
    info = await given.info()
    assert (info.queue, info.status, info.priority) == ("email", JobStatus.SCHEDULED, 5)
    clock.advance(60)
    await drain(worker)
    assert (await given.info()).status == JobStatus.SUCCEEDED
    assert await given.result() == "b@example.com"
    assert ((await plain.info()).queue, (await plain.info()).status) == ("default", "queued")
    with pytest.raises(ConfigurationError, match="queue"):
        JobSpec(task="send").with_options(queue="")
    with pytest.raises(ConfigurationError, match="either delay or run_at"):
        JobSpec(task="send").with_options(delay=1, run_at=datetime(2030, 1, 1, tzinfo=UTC))


MYAPP = """
from asyncjobs import Jobs

jobs = Jobs("sqlite:///unused.db", workers=False)

@jobs.task
async def send_report(day: str) -> None: ...

if __name__ == "__main__":
    print(*jobs.registry)
"""


@pytest.mark.parametrize("run", [["myapp.py"], ["-m", "myapp"]], ids=["script", "module"])
def test_a_task_in_the_script_python_runs_is_named_as_a_worker_importing_it_names_it(
    tmp_path: Path, run: list[str]
) -> None:
    """A job queued by ``python myapp.py`` must run on ``asyncjobs --app myapp:jobs``."""
    (tmp_path / "myapp.py").write_text(MYAPP)
    as_main = subprocess.run(
        [sys.executable, *run], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    imported = subprocess.run(
        [sys.executable, "-c", "import myapp; print(*myapp.jobs.registry)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert as_main.stdout.split() == imported.stdout.split() == ["myapp.send_report"]


def test_a_callable_without_a_qualified_name_needs_a_name(jobs: Jobs) -> None:
    async def send(to: str, subject: str) -> None: ...

    with pytest.raises(ConfigurationError, match="name="):
        jobs.task(functools.partial(send, subject="hi"))
    assert jobs.task(name="greet")(functools.partial(send, subject="hi")).name == "greet"


def test_a_task_must_be_a_coroutine_function(jobs: Jobs) -> None:
    def send(to: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"'.*send' is not an async def"):
        jobs.task(send)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not an async def"):
        jobs.task(name="lambda")(lambda: None)  # type: ignore[arg-type,return-value]

    async def greet(to: str, greeting: str) -> str:
        return f"{greeting}, {to}"

    # A partial of an async def, and an AsyncMock, are coroutine functions too.
    assert jobs.task(name="hello")(functools.partial(greet, greeting="hello")).name == "hello"
    assert jobs.task(name="mocked")(AsyncMock()).name == "mocked"


async def test_a_tasks_name_may_be_given_first_as_design_writes_it(jobs: Jobs) -> None:
    """DESIGN.md: ``@jobs.task(name=None, *, queue=..., ...)``."""

    @jobs.task("send_email", queue="email")
    async def send(address: str) -> str:
        return address

    assert (send.name, jobs.registry["send_email"]) == ("send_email", send)
    job = await jobs.enqueue("send_email", "a@example.com")
    await drain(jobs)
    assert await job.result(timeout=5) == "a@example.com"
    with pytest.raises(ConfigurationError, match="two names"):
        jobs.task("one", name="other")


async def test_many_concurrent_producers_share_commits(jobs: Jobs) -> None:
    import anyio

    @jobs.task
    async def t(i: int) -> None: ...

    flushes: list[int] = []
    original = jobs.store.insert

    async def counting_insert(new, *, now):  # type: ignore[no-untyped-def]
        flushes.append(len(new))
        return await original(new, now=now)

    jobs.store.insert = counting_insert  # type: ignore[method-assign]

    async def producer(base: int) -> None:
        for i in range(10):
            await t.enqueue(base + i)

    async with anyio.create_task_group() as tg:
        for p in range(50):
            tg.start_soon(producer, p * 100)
    assert sum(flushes) == 500
    assert len(flushes) < 250  # group commit: far fewer transactions than enqueues
    assert len(await jobs.list(limit=1000)) == 500


async def test_a_producer_enqueuing_in_a_loop_lets_other_tasks_run(jobs: Jobs) -> None:
    """A lone enqueue may be written on the event loop itself (no thread round trip);
    it still lets the loop run, so a tight enqueue loop starves no other task."""

    @jobs.task(name="t")
    async def t(i: int) -> None:
        return None

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await t.enqueue(0)  # opens the store (through its thread)
        before = ticks
        for i in range(20):
            await t.enqueue(i)
        assert ticks - before >= 20
        tg.cancel_scope.cancel()
