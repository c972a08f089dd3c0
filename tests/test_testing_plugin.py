"""asyncjobs.testing for users: assertions, replace_store, and the pytest plugin (pytester)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest.mock import ANY

import anyio
import pytest
from conftest import in_schema

from asyncjobs import AsyncJobsError, Jobs, JobSpec, JobStatus, TaskNotRegistered
from asyncjobs._clock import SystemClock
from asyncjobs.stores import SQLiteStore
from asyncjobs.testing import (
    FakeClock,
    assert_enqueued,
    assert_not_enqueued,
    drain,
    enqueued,
    replace_store,
)

pytest_plugins = ["pytester"]

MakeJobs = Callable[..., Jobs]


async def test_assert_enqueued_matches_arguments_by_the_tasks_signature(jobs: Jobs) -> None:
    @jobs.task(name="send")
    async def send(user_id: int, address: str, *, tags: list[str] | None = None) -> None: ...

    await send.enqueue(42, address="a@example.com", tags=["welcome"])
    await send.enqueue(user_id=7, address="b@example.com")

    info = await assert_enqueued(jobs, send, user_id=42)
    assert info.args == [42]
    assert (await assert_enqueued(jobs, send, 7)).kwargs == {
        "user_id": 7,
        "address": "b@example.com",
    }
    await assert_enqueued(jobs, "send", address="b@example.com")
    await assert_enqueued(jobs, send, 42, "a@example.com", tags=("welcome",))
    await assert_not_enqueued(jobs, send, user_id=8)
    assert [i.args for i in await enqueued(jobs, send)] == [[42], []]  # oldest first
    assert len(await enqueued(jobs)) == 2


async def test_assert_enqueued_failure_lists_what_was_enqueued(jobs: Jobs) -> None:
    @jobs.task(name="send")
    async def send(user_id: int) -> None: ...

    @jobs.task(name="other")
    async def other() -> None: ...

    with pytest.raises(AssertionError, match="no job was enqueued at all"):
        await assert_enqueued(jobs, send, user_id=1)
    await other.enqueue()
    with pytest.raises(AssertionError, match=r"none of that task; enqueued: other\(\)"):
        await assert_enqueued(jobs, send, user_id=1)
    await send.enqueue(2)
    with pytest.raises(AssertionError, match=r"expected a job send\(user_id=1\); 1 job.*send\(2\)"):
        await assert_enqueued(jobs, send, user_id=1)
    with pytest.raises(AssertionError, match=r"expected no job send\(2\), found 1"):
        await assert_not_enqueued(jobs, send, 2)


async def test_assertions_refuse_to_look_at_only_some_of_the_jobs(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They read the newest MAX_JOBS jobs only: past that, ``assert_not_enqueued``
    passed whatever the older jobs were. They say so instead."""
    monkeypatch.setattr("asyncjobs.testing._assertions.MAX_JOBS", 2)

    @jobs.task(name="send")
    async def send(user_id: int) -> None: ...

    for user_id in (1, 2):
        await send.enqueue(user_id)
    await assert_not_enqueued(jobs, send, 3)  # all read: as before
    await send.enqueue(3)
    for check in (assert_not_enqueued, assert_enqueued, enqueued):
        with pytest.raises(AsyncJobsError, match=r"more than 2 jobs of task 'send' are stored"):
            await check(jobs, send, 1)
    with pytest.raises(AsyncJobsError, match=r"more than 2 jobs are stored"):
        await enqueued(jobs)


async def test_jobs_that_already_ran_still_count_as_enqueued(jobs: Jobs) -> None:
    @jobs.task(name="noop")
    async def noop(n: int) -> int:
        return n

    await noop.enqueue(1)
    await drain(jobs)
    assert (await assert_enqueued(jobs, noop, n=1)).status == JobStatus.SUCCEEDED


async def test_assertions_see_defaults_and_tell_true_from_1(jobs: Jobs) -> None:
    @jobs.task(name="send")
    async def send(
        user_id: int, address: str = "admin@example.com", urgent: object = 0
    ) -> None: ...

    await send.enqueue(1)  # the task receives address="admin@example.com"
    await send.enqueue(2, urgent=1)
    await assert_enqueued(jobs, send, 1, address="admin@example.com")
    with pytest.raises(AssertionError, match="expected no job"):
        await assert_not_enqueued(jobs, send, 1, address="admin@example.com")
    await assert_not_enqueued(jobs, send, 1, address="other@example.com")
    await assert_enqueued(jobs, send, 2, urgent=1)
    await assert_not_enqueued(jobs, send, urgent=True)  # JSON keeps true and 1 apart
    await assert_not_enqueued(jobs, send, urgent=1.0)
    with pytest.raises(AssertionError, match="expected a job"):
        await assert_enqueued(jobs, send, 2, urgent=True)


async def test_assertions_refuse_arguments_the_task_could_never_have_been_enqueued_with(
    jobs: Jobs,
) -> None:
    """A misspelt keyword (or one argument too many) matches no job ever: the check
    would pass whatever was enqueued, so it is refused, naming the task's signature."""

    @jobs.task(name="send")
    async def send(user_id: int, address: str = "a@example.com") -> None: ...

    await send.enqueue(42)
    for check in (assert_not_enqueued, assert_enqueued, enqueued):
        with pytest.raises(TypeError, match=r"send\(usr_id=42\) can never match .*user_id"):
            await check(jobs, send, usr_id=42)
    with pytest.raises(TypeError, match=r"send\(42, 'a', 3\) can never match"):
        await assert_not_enqueued(jobs, "send", 42, "a", 3)

    @jobs.task(name="notify")
    async def notify(user_id: int) -> None: ...

    with pytest.raises(TypeError, match="can never match"):  # also with none of its jobs stored
        await assert_not_enqueued(jobs, notify, usr_id=42)


async def test_assertions_refuse_a_task_name_no_task_has(jobs: Jobs) -> None:
    """A misspelt task name matched no job, so ``assert_not_enqueued(jobs, "sned_email")``
    passed whatever was enqueued. A name is refused unless a task of ``jobs`` has it or
    a job of it is stored (a task of another process, enqueued here by name)."""

    @jobs.task(name="send_email")
    async def send_email(user_id: int) -> None: ...

    await send_email.enqueue(1)
    for check in (assert_not_enqueued, assert_enqueued, enqueued):
        with pytest.raises(TaskNotRegistered, match=r"'sned_email'.*did you mean 'send_email'\?"):
            await check(jobs, "sned_email", 1)
    with pytest.raises(TaskNotRegistered, match=r"'resize_image'(?!.*did you mean)") as refused:
        await assert_not_enqueued(jobs, "resize_image")
    assert "asyncjobs_isolate(myapp.jobs)" in str(refused.value)  # the app's tasks, elsewhere

    await jobs.enqueue("resize_image", 7)  # defined by a worker process, not here
    await assert_enqueued(jobs, "resize_image", 7)
    await assert_not_enqueued(jobs, "resize_image", 8)
    with pytest.raises(TaskNotRegistered, match=r"did you mean 'resize_image'\?"):
        await assert_not_enqueued(jobs, "resize_imgae")


async def test_assertions_match_a_chain_member_and_a_callback_before_they_get_their_input(
    jobs: Jobs,
) -> None:
    """A chain member with pass_result=True gets the previous result as its first
    argument only when released, and a batch's on_complete its counts as ``batch=``:
    until then its stored arguments were bound one parameter off, so
    ``assert_not_enqueued(jobs, second, n=5)`` passed while ``second(n=5)`` waited."""

    @jobs.task(name="first")
    async def first() -> int:
        return 1

    @jobs.task(name="second")
    async def second(previous: int, n: int) -> int:
        return previous + n

    @jobs.task(name="done")
    async def done(batch: object, tag: str) -> None: ...

    await jobs.chain(first.spec(), second.spec(5), pass_result=True)  # type: ignore[call-arg]
    await jobs.batch([first.spec()], on_complete=done.spec(tag="x"))  # type: ignore[call-arg]
    for released in (False, True):
        await assert_enqueued(jobs, second, n=5)
        with pytest.raises(AssertionError, match="expected no job"):
            await assert_not_enqueued(jobs, second, n=5)
        await assert_not_enqueued(jobs, second, previous=5)
        await assert_enqueued(jobs, done, tag="x")
        if not released:
            await assert_not_enqueued(jobs, second, previous=1)  # not known yet
            await drain(jobs)
    await assert_enqueued(jobs, second, 1, 5)


async def test_assertions_match_the_input_a_chain_member_awaits_with_mock_any(
    jobs: Jobs,
) -> None:
    """``unittest.mock.ANY`` for the result a pass_result chain member is given when
    released (and for an on_complete's ``batch=``): no job matched before its release,
    since the value is not known yet, though ANY stands for any value."""

    @jobs.task(name="fetch")
    async def fetch(url: str) -> str:
        return "<html>"

    @jobs.task(name="parse")
    async def parse(html: str, url: str) -> None: ...

    @jobs.task(name="report")
    async def report(batch: object, tag: str) -> None: ...

    await jobs.chain(fetch.spec("u"), parse.spec(url="u"), pass_result=True)  # type: ignore[call-arg]
    await jobs.batch([fetch.spec("v")], on_complete=report.spec(tag="x"))  # type: ignore[call-arg]
    for released in (False, True):
        await assert_enqueued(jobs, parse, ANY, "u")
        await assert_enqueued(jobs, parse, ANY, url="u")
        await assert_enqueued(jobs, parse, html=ANY, url="u")
        await assert_not_enqueued(jobs, parse, ANY, "v")
        await assert_enqueued(jobs, report, batch=ANY, tag="x")
        await assert_not_enqueued(jobs, report, batch=ANY, tag="y")
        if not released:
            await assert_not_enqueued(jobs, parse, "<html>", "u")  # not known yet
            await drain(jobs)
    await assert_enqueued(jobs, parse, "<html>", "u")

    @jobs.task(name="notify")
    async def notify(**fields: int) -> None: ...

    await notify.enqueue(a=1)
    await assert_enqueued(jobs, notify, a=ANY)
    await assert_not_enqueued(jobs, notify, b=ANY)  # never given: ANY matches no argument


def all_succeeded(batch_id: str, total: int) -> dict[str, object]:
    """The ``batch=`` counts of a batch of ``total`` members that all succeeded."""
    return {"id": batch_id, "total": total, "succeeded": total, "dead": 0, "cancelled": 0}


async def test_assertions_match_the_counts_an_on_complete_was_given_once_released(
    jobs: Jobs,
) -> None:
    """Once its batch released it, an on_complete holds its counts as ``batch=``: they
    are known, and match as any argument does. They were still taken for not known
    yet, so ``assert_not_enqueued(jobs, report, batch=counts)`` passed for the job
    that ran with those very counts (and only ANY matched them)."""

    @jobs.task(name="member")
    async def member() -> None: ...

    @jobs.task(name="report")
    async def report(batch: object, tag: str) -> None: ...

    batch = await jobs.batch([member.spec()], on_complete=report.spec(tag="x"))  # type: ignore[call-arg]
    empty = await jobs.batch([], on_complete=report.spec(tag="empty"))  # type: ignore[call-arg]
    # A placeholder for a type checker: the counts replace it, once the batch releases it.
    held = await jobs.batch([member.spec()], on_complete=report.spec(batch=None, tag="held"))
    placeheld = await jobs.batch([member.spec()], on_complete=report.spec(batch=None, tag="p"))
    assert placeheld.on_complete is not None
    assert await placeheld.on_complete.cancel()  # never released: never given its counts
    await drain(jobs)
    await assert_enqueued(jobs, report, batch=all_succeeded(held.id, 1), tag="held")
    await assert_not_enqueued(jobs, report, batch=None)
    await assert_enqueued(jobs, report, batch=ANY, tag="p")
    counts = all_succeeded(batch.id, 1)
    none = all_succeeded(empty.id, 0)
    await assert_enqueued(jobs, report, batch=counts, tag="x")
    await assert_enqueued(jobs, report, none, "empty")
    await assert_enqueued(jobs, report, batch=ANY, tag="x")
    with pytest.raises(AssertionError, match="expected no job"):
        await assert_not_enqueued(jobs, report, batch=counts)
    await assert_not_enqueued(jobs, report, batch={**counts, "succeeded": 0, "dead": 1})


async def test_assertions_match_the_input_a_job_enqueued_by_name_awaits_with_mock_any(
    make_jobs: MakeJobs,
) -> None:
    """A process that chains (or batches) tasks by name, which only the worker defines:
    with no signature to bind, the stored arguments were compared without the result
    a pass_result member awaits (or an on_complete's ``batch=``), so ANY matched
    nothing, and ``assert_not_enqueued(jobs, "parse", ANY, url="u")`` passed for that
    very job. As with a signature, ANY stands for it until the job is released."""
    web = make_jobs(workers=False)
    worker = make_jobs()

    @worker.task(name="fetch")
    async def fetch(url: str) -> str:
        return "<html>"

    @worker.task(name="parse")
    async def parse(html: str, url: str) -> None: ...

    @worker.task(name="report")
    async def report(tag: str, batch: object = None) -> None: ...

    await web.chain(
        JobSpec(task="fetch", args=("u",)), JobSpec(task="parse", args=(), kwargs={"url": "u"}),
        pass_result=True,
    )  # fmt: skip
    on_complete: JobSpec[None] = JobSpec(task="report", kwargs={"tag": "x"})
    batch = await web.batch([JobSpec(task="fetch", args=("v",))], on_complete=on_complete)
    await assert_enqueued(web, "parse", ANY, url="u")
    with pytest.raises(AssertionError, match="expected no job"):
        await assert_not_enqueued(web, "parse", ANY, url="u")
    await assert_enqueued(web, "parse", url="u")  # only the arguments named are compared
    await assert_not_enqueued(web, "parse", "<html>", url="u")  # not known yet
    await assert_enqueued(web, "report", tag="x", batch=ANY)
    await assert_not_enqueued(web, "report", tag="y", batch=ANY)
    await drain(worker)
    await assert_enqueued(web, "parse", "<html>", url="u")
    await assert_enqueued(web, "report", tag="x", batch=all_succeeded(batch.id, 1))


async def test_assertions_refuse_a_task_of_a_jobs_on_another_store(
    jobs: Jobs, tmp_path: Path
) -> None:
    """The plugin's ``jobs`` next to the app's own: the app's task enqueues into the
    app's store, so ``assert_not_enqueued(jobs, ...)`` passed though the job was
    enqueued, and ``assert_enqueued`` said no job was enqueued at all."""
    app_jobs = Jobs("sqlite:///" + str(tmp_path / "app.db"), clock=FakeClock())
    same_store = Jobs(jobs.settings.url, clock=jobs.clock)
    try:

        @app_jobs.task(name="send")
        async def send(user_id: int) -> None: ...

        @same_store.task(name="greet")
        async def greet(user_id: int) -> None: ...

        await send.enqueue(1)
        for check in (assert_not_enqueued, assert_enqueued, enqueued):
            with pytest.raises(AsyncJobsError, match=r"another Jobs.*asyncjobs_isolate"):
                await check(jobs, send, 1)
        await greet.enqueue(2)  # another Jobs on the same store: its jobs are there
        await assert_enqueued(jobs, greet, 2)
    finally:
        await app_jobs.close()
        await same_store.close()


async def test_assertions_tell_stores_apart_by_where_their_jobs_are_not_by_repr(
    make_jobs: MakeJobs, backend_url: str, tmp_path: Path
) -> None:
    """Stores were compared by ``repr``: a PostgresStore's leaves the search_path out, so
    a task of a Jobs in another schema of the database passed for one of this store (and
    ``assert_not_enqueued`` passed whatever it enqueued); a SQLite file named by another
    path passed for another store, and every assertion on its tasks was refused."""
    here = make_jobs(backend_url)
    elsewhere: contextlib.AbstractAsyncContextManager[str]
    if backend_url.startswith("sqlite:///"):
        (tmp_path / "sub").mkdir()
        path = backend_url.removeprefix("sqlite:///")
        same_url = "sqlite:///" + str(Path(path).parent / "sub" / ".." / Path(path).name)
        elsewhere = contextlib.nullcontext("sqlite:///" + str(tmp_path / "other.db"))
    else:
        same_url = backend_url + "&application_name=another-spelling"
        elsewhere = in_schema(f"asyncjobs_test_{uuid.uuid4().hex[:16]}")
    async with elsewhere as other_url:
        same, other = make_jobs(same_url), make_jobs(other_url)

        @same.task(name="greet")
        async def greet(user_id: int) -> None: ...

        @other.task(name="send")
        async def send(user_id: int) -> None: ...

        await greet.enqueue(2)
        await send.enqueue(1)
        await assert_enqueued(here, greet, 2)
        await assert_not_enqueued(here, greet, 3)
        for check in (assert_not_enqueued, assert_enqueued, enqueued):
            with pytest.raises(AsyncJobsError, match=r"another Jobs"):
                await check(here, send, 1)
        await other.close()


async def test_drain_runs_a_job_that_a_running_job_enqueues_and_waits_for(jobs: Jobs) -> None:
    @jobs.task
    async def child() -> int:
        return 41

    @jobs.task
    async def parent() -> int:
        job = await child.enqueue()
        return await job.result(timeout=5) + 1

    job = await parent.enqueue()
    with anyio.fail_after(10):
        await drain(jobs)
    assert await job.result(timeout=0) == 42


async def test_drain_stops_with_an_error_when_jobs_enqueue_one_another_without_end(
    jobs: Jobs,
) -> None:
    """It ran for good (the test hung) on a task that enqueues itself."""

    @jobs.task(name="again")
    async def again(n: int) -> None:
        await again.enqueue(n + 1)

    @jobs.task(name="once")
    async def once() -> None: ...

    await again.enqueue(0)
    with anyio.fail_after(5), pytest.raises(AsyncJobsError, match=r"without end.*max_jobs"):
        await drain(jobs, max_jobs=50)
    left = await enqueued(jobs, again)
    assert 50 <= len(left) <= 70
    assert [info.status for info in left if info.status != "succeeded"] == ["queued"]
    await jobs.cancel(left[-1].id)
    job = await once.enqueue()
    await drain(jobs, max_jobs=1)  # what ends within the bound drains as before
    assert (await job.info()).status == "succeeded"


@pytest.mark.parametrize("retries", [3, 0])
async def test_drain_runs_max_jobs_before_it_stops_when_more_are_ready(
    jobs: Jobs, retries: int
) -> None:
    """With more jobs ready than max_jobs, it started one per free slot, found its bound
    passed before any had run, cancelled them all and raised "started 2 jobs" having
    run none. It runs max_jobs of them, then raises; the rest wait, attempts unspent
    (also jobs on their last attempt, which a claim gives back when they find no slot:
    past the bound they were claimed again at once, for good)."""
    ran: list[int] = []

    @jobs.task(name="one", retries=retries)
    async def one(n: int) -> None:
        ran.append(n)

    await jobs.enqueue_many([one.spec(n) for n in range(5)])
    with anyio.fail_after(5), pytest.raises(AsyncJobsError, match="started 2 jobs"):
        await drain(jobs, max_jobs=2)
    assert len(ran) == 2
    infos = await enqueued(jobs, one)
    assert sorted(str(info.status) for info in infos) == ["queued"] * 3 + ["succeeded"] * 2
    assert [info.attempts for info in infos if info.status == "queued"] == [0, 0, 0]
    await drain(jobs)
    assert sorted(ran) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("second", ["drain", "start"])
async def test_a_second_claim_loop_while_a_drain_runs_is_refused_not_left_hanging(
    jobs: Jobs, second: str
) -> None:
    """Two drains at once on one Jobs (a drain left running in a task, or one inside a
    job), or start() during a drain (its workers' claim loop on the drain's runner),
    shared the runner's wake-up event, each replacing the other's: both then waited for
    good once a job ended, and the test hung. The second is refused."""
    started, release = anyio.Event(), anyio.Event()

    @jobs.task(name="slow")
    async def slow() -> None:
        started.set()
        await release.wait()

    job = await slow.enqueue()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            await started.wait()
            if second == "drain":
                with pytest.raises(AsyncJobsError, match="already running"):
                    await drain(jobs)
            else:
                with pytest.raises(AsyncJobsError, match="drain"):
                    await jobs.start()
                assert not jobs.started
            release.set()
    assert (await job.info()).status == "succeeded"
    await drain(jobs)  # once the first has returned, a drain runs as before


async def test_a_run_at_from_the_fake_clocks_datetime_is_due_once_the_clock_gets_there(
    jobs: Jobs,
) -> None:
    """FakeClock() started at the real time to the nanosecond; its datetime() rounds to a
    microsecond, up about half the time, so ``run_at=clock.datetime() + 5 s`` fell a
    fraction of a microsecond after ``advance(5)``: the job stayed scheduled in about
    two tests of five, depending on when they ran."""
    for _ in range(100):  # each clock starts at another moment
        before = SystemClock().now()
        clock = FakeClock()
        assert clock.now() >= before  # what a real clock did just before is not ahead
        run_at = clock.datetime() + timedelta(seconds=5)
        clock.advance(5)
        assert run_at.timestamp() <= clock.now()
        assert clock.datetime() == run_at

    @jobs.task(name="at")
    async def at() -> None: ...

    fake = jobs.clock
    assert isinstance(fake, FakeClock)
    job = await at.options(run_at=fake.datetime() + timedelta(hours=1)).enqueue()
    fake.advance(3600)
    await drain(jobs)
    assert (await job.info()).status == "succeeded"


async def test_what_a_test_registers_on_a_replaced_store_is_gone_after_it(
    tmp_path: Path,
) -> None:
    app_jobs = Jobs("sqlite:///" + str(tmp_path / "app.db"))
    app_jobs.limiter("smtp", "10/s")

    @app_jobs.task(name="send_email")
    async def send_email(to: str) -> None: ...

    for n in range(2):  # two tests in a row, each registering its own helpers
        async with replace_store(app_jobs, f"sqlite:///{tmp_path}/t{n}.db") as jobs:

            @jobs.task(name="fake_webhook")
            async def fake_webhook() -> None: ...

            jobs.limiter("test-only", "1/s")
            assert sorted(jobs.registry) == ["fake_webhook", "send_email"]
        assert sorted(app_jobs.registry) == ["send_email"]
        assert sorted(app_jobs.limiters) == ["smtp"]


async def test_replace_store_runs_the_apps_own_tasks_on_a_test_store_and_restores_it(
    tmp_path: Path,
) -> None:
    app_jobs = Jobs("sqlite:///" + str(tmp_path / "app.db"))
    app_jobs.queue("email", concurrency=2)

    @app_jobs.task(name="greet", queue="email")
    async def greet(name: str) -> str:
        return f"hello {name}"

    @app_jobs.periodic(every=3600, name="hourly")
    async def hourly() -> None: ...

    original_store, original_clock = app_jobs.store, app_jobs.clock
    clock = FakeClock()
    try:
        async with replace_store(app_jobs, "sqlite:///" + str(tmp_path / "t.db"), clock=clock):
            assert app_jobs.store is not original_store
            assert app_jobs.clock is clock
            assert app_jobs.queue_limits == {"email": 2}
            assert [s.task for s in app_jobs.schedules()] == ["hourly"]
            job = await greet.enqueue("ada")  # the task object still enqueues via app_jobs
            await drain(app_jobs)
            assert await job.result(timeout=5) == "hello ada"
        assert app_jobs.store is original_store
        assert app_jobs.clock is original_clock
        assert await app_jobs.get(job.id) is None  # nothing reached the app's store
        assert not (tmp_path / "app.db").exists() or await app_jobs.list() == []
    finally:
        await app_jobs.close()


@pytest.mark.parametrize("synchronous", ["full", "extra"])
async def test_replace_store_carries_the_synchronous_of_a_sqlite_store_given(
    tmp_path: Path, synchronous: str
) -> None:
    """``settings.synchronous`` is a given SQLite store's own, and replace_store passes
    it to ``Jobs(url, ...)``: whatever the store took (its "extra" too), Jobs takes."""
    app_jobs = Jobs(store=SQLiteStore(tmp_path / "app.db", synchronous=synchronous))
    async with replace_store(app_jobs, "sqlite:///" + str(tmp_path / "t.db")):
        assert isinstance(app_jobs.store, SQLiteStore)
        assert app_jobs.store.synchronous == synchronous.upper()
    assert app_jobs.settings.synchronous == synchronous
    await app_jobs.close()


async def test_a_schedule_on_a_replaced_store_starts_afresh_in_each_test(tmp_path: Path) -> None:
    """What one test's drains did to a schedule does not leak into the next test (or the
    app): each test's first drain starts the schedule from its own clock's time."""
    app_jobs = Jobs("sqlite:///" + str(tmp_path / "app.db"))
    runs: list[float] = []

    @app_jobs.periodic(every=3600, name="hourly")
    async def hourly() -> None:
        runs.append(app_jobs.clock.now())

    start = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)
    try:
        for n, later in enumerate([0, 6 * 3600]):  # two tests in a row
            clock = FakeClock(start=start + timedelta(seconds=later))
            async with replace_store(app_jobs, f"sqlite:///{tmp_path}/t{n}.db", clock=clock):
                await drain(app_jobs)
                assert runs == [], "a first drain runs no slot from before it"
                clock.advance(3600)
                await drain(app_jobs)
                assert len(runs) == 1
            runs.clear()
        assert [s.cursor for s in app_jobs.scheduler._schedules.values()] == [None]
    finally:
        await app_jobs.close()


USER_APP = """
    from __future__ import annotations

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncjobs import Jobs, JobsMiddleware, Retry

    jobs = Jobs("sqlite:///app-jobs.db")  # the app's real store; tests never touch it
    sent: list[str] = []

    @jobs.task(retries=2)
    async def send_welcome(user_id: int, address: str) -> None:
        if address.endswith("@flaky.example"):
            raise Retry(delay=30)
        sent.append(address)

    async def signup(request: Request) -> JSONResponse:
        data = await request.json()
        job = await request.state.jobs.enqueue(send_welcome, data["id"], address=data["email"])
        return JSONResponse({"job": job.id}, status_code=202)

    app = Starlette(
        routes=[Route("/signup", signup, methods=["POST"])],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
"""

USER_CONFTEST = """
    import pytest

    import myapp

    @pytest.fixture
    async def jobs(asyncjobs_isolate):
        return await asyncjobs_isolate(myapp.jobs)
"""

USER_TESTS = """
    import httpx

    from asyncjobs.testing import assert_enqueued, drain

    import myapp

    async def test_signup_enqueues_a_welcome_email(jobs):
        transport = httpx.ASGITransport(app=myapp.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/signup", json={"id": 1, "email": "a@example.com"})
        assert response.status_code == 202
        info = await assert_enqueued(jobs, myapp.send_welcome, user_id=1)
        assert info.id == response.json()["job"]
        await drain(jobs)
        assert myapp.sent == ["a@example.com"]

    async def test_retries_follow_the_fake_clock(jobs, asyncjobs_clock):
        job = await myapp.send_welcome.enqueue(2, address="b@flaky.example")
        await drain(jobs)
        assert (await job.info()).status == "scheduled"
        asyncjobs_clock.advance(30)
        await drain(jobs)
        asyncjobs_clock.advance(30)
        await drain(jobs)
        assert (await job.info()).status == "dead"

    async def test_a_wrong_expectation_explains_itself(jobs):
        await myapp.send_welcome.enqueue(3, address="c@example.com")
        await assert_enqueued(jobs, myapp.send_welcome, address="wrong@example.com")
"""

USER_TESTS_FRESH_JOBS = """
    from asyncjobs.testing import drain

    async def test_fresh_jobs_fixture(jobs, asyncjobs_clock):
        @jobs.task
        async def add(a: int, b: int) -> int:
            return a + b

        job = await add.options(delay=60).enqueue(1, 2)
        await drain(jobs)
        assert (await job.info()).status == "scheduled"
        asyncjobs_clock.advance(60)
        await drain(jobs)
        assert await job.result(timeout=5) == 3
"""

INI = """
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    filterwarnings = error
"""


def test_plugin_lets_a_user_test_an_endpoint_that_enqueues(pytester: pytest.Pytester) -> None:
    pytester.makeini(textwrap.dedent(INI))
    pytester.makepyfile(
        myapp=textwrap.dedent(USER_APP),
        conftest=textwrap.dedent(USER_CONFTEST),
        test_myapp=textwrap.dedent(USER_TESTS),
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: expected a job myapp.send_welcome(address='wrong@example.com'); "
            "1 job(s) of that task were: myapp.send_welcome(3, address='c@example.com')*",
        ]
    )
    assert not (pytester.path / "app-jobs.db").exists(), "the app's real store was touched"


def test_plugin_jobs_fixture_in_strict_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = strict\nfilterwarnings = error\n")
    pytester.makepyfile(
        test_fresh=textwrap.dedent(USER_TESTS_FRESH_JOBS).replace(
            "async def test_", "import pytest\n\n@pytest.mark.asyncio\nasync def test_"
        )
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=1)


async def test_fake_clock_advanced_from_another_thread_wakes_its_waiters() -> None:
    """A sync test drives a TestClient, whose app (and the runner's waits) run in a
    loop of their own thread. ``advance`` from the test's thread raised half-way, the
    deadline dropped and its cancellation never delivered: the waiter stayed stuck
    (and the TestClient's shutdown hung). It wakes them in their loop instead."""
    clock = FakeClock()
    entered = anyio.Event()
    woken: list[str] = []

    async def waiter() -> None:
        with clock.move_on_after(10):
            entered.set()
            await clock.sleep(20)
        woken.append("deadline")

    async def sleeper() -> None:
        await clock.sleep(5)
        woken.append("sleep")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            tg.start_soon(waiter)
            await entered.wait()
            await anyio.to_thread.run_sync(clock.advance, 11)
    assert sorted(woken) == ["deadline", "sleep"]


def test_fake_clock_advanced_from_a_thread_wakes_the_waiters_of_every_loop() -> None:
    """Two loops (a TestClient's app and another) sleep on one FakeClock, and a sync
    test advances it: each sleeper is woken in its own loop (only the last waiter's
    loop was, the other's event set from a foreign thread and never seen)."""
    clock = FakeClock()
    woken: list[int] = []

    def sleep_in_a_loop_of_its_own(n: int) -> None:
        asyncio.run(clock.sleep(5))
        woken.append(n)

    threads = [threading.Thread(target=sleep_in_a_loop_of_its_own, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    for _ in range(500):  # until both sleep (5 s at most)
        if len(clock._sleepers) == 2:
            break
        threading.Event().wait(0.01)
    clock.advance(10)
    for thread in threads:
        thread.join(2)
    assert sorted(woken) == [1, 2]


def test_fake_clock_advance_returns_when_the_waiters_loop_stops_before_waking_them() -> None:
    """advance() from another thread hands the wake-ups to the waiter's loop. One that
    stops (a TestClient's portal, asyncio.run at exit) before it runs them drops
    them: advance() must not wait for them for ever."""
    clock = FakeClock()
    loop = asyncio.new_event_loop()
    last_turn = threading.Event()
    sleeping: list[asyncio.Future[None]] = []

    def run() -> None:
        async def main() -> None:
            sleeping.append(asyncio.ensure_future(clock.sleep(100)))
            await anyio.lowlevel.checkpoint()  # the sleeper is registered
            loop.call_soon(loop.stop)
            loop.call_soon(last_turn.set)
            loop.call_soon(threading.Event().wait, 0.5)  # a last turn that takes time

        sleeping.append(loop.create_task(main()))
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert last_turn.wait(5)
    advanced = threading.Event()

    def advance() -> None:
        clock.advance(101)
        advanced.set()

    threading.Thread(target=advance, daemon=True).start()
    thread.join(5)
    assert advanced.wait(3), "advance() still waited after the loop stopped"


async def test_fake_clock_an_earlier_deadline_wins_over_a_later_sleep_in_one_advance() -> None:
    """``with move_on_after(5): await sleep(10)``, then one ``advance(10)``: the deadline
    came first, so the sleep is cancelled, as in real time (the sleeper was woken
    first, and the code after it ran inside an expired scope)."""
    clock = FakeClock()
    out: list[object] = []

    async def body() -> None:
        with clock.move_on_after(5) as scope:
            await clock.sleep(10)
            out.append("ran past its deadline")
        out.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await anyio.wait_all_tasks_blocked()
        clock.advance(10)
    assert out == [True]


async def test_fake_clock_forgets_the_deadlines_of_waits_that_ended_early() -> None:
    """A ``move_on_after`` whose body raised and a ``sleep`` that was cancelled leave no
    entry behind: a long test's clock does not fill with waits nobody waits on."""
    clock = FakeClock()
    for _ in range(3):
        with pytest.raises(KeyError), clock.move_on_after(60):
            raise KeyError("the body failed")
        with anyio.move_on_after(0):  # cancels the sleep at its first step
            await clock.sleep(3600)
    assert (clock._scopes, clock._sleepers) == ([], [])
    with clock.move_on_after(60) as scope:  # one that ends as it should still works
        clock.advance(60)
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert (clock._scopes, clock._sleepers) == ([], [])


def test_fake_clock_used_by_two_loops_at_once_loses_no_deadline() -> None:
    """Two loops in two threads enter and leave ``move_on_after`` on one clock: every
    deadline stays known to the clock while its scope is open (a cleanup rebuilt the
    heap unlocked and dropped the other loop's, which then never fired)."""
    clock = FakeClock()
    stop = threading.Event()
    lost: list[int] = []

    async def churn() -> None:
        while not stop.is_set():
            with contextlib.ExitStack() as stack:
                for _ in range(50):
                    stack.enter_context(clock.move_on_after(1000))
                await anyio.lowlevel.checkpoint()

    async def hold() -> None:
        try:
            for i in range(5000):
                with clock.move_on_after(1000) as scope:
                    await anyio.lowlevel.checkpoint()
                    await anyio.lowlevel.checkpoint()
                    if not any(entry[2] is scope for entry in clock._scopes):
                        lost.append(i)
        finally:
            stop.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a race shows up quickly
    try:
        threads = [threading.Thread(target=asyncio.run, args=(main(),)) for main in (churn, hold)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert lost == []


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf"), timedelta.max])
def test_fake_clock_refuses_to_move_back_or_by_nan(step: float | timedelta) -> None:
    """A NaN step would leave ``now()`` NaN for good: no waiter would ever wake. An
    infinite one (or one past any date) left it where ``datetime()`` and every job's
    ``JobInfo`` raised OverflowError."""
    clock = FakeClock()
    before = clock.now()
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(step)
    assert clock.now() == before


async def test_fake_clock_refuses_to_wait_nan_seconds() -> None:
    """``sleep(nan)`` and ``move_on_after(nan)`` were taken: the NaN deadline counted as
    due at the next ``advance``, of any length (even 0), so the wait ended at once. The
    clock's heap of deadlines held an entry that compares with none. Both are refused
    now; a negative wait is no wait, an infinite one never ends, as in real time."""
    clock = FakeClock()
    with anyio.fail_after(5), pytest.raises(ValueError, match="nan"):  # it waited for good
        await clock.sleep(float("nan"))
    with pytest.raises(ValueError, match="nan"), clock.move_on_after(float("nan")):
        pass
    assert (clock._sleepers, clock._scopes) == ([], [])
    await clock.sleep(-1)  # returns at once, as asyncio.sleep(-1) does
    with clock.move_on_after(-1) as scope:
        await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    with clock.move_on_after(float("inf")) as scope:
        clock.advance(timedelta(days=365))
        await anyio.lowlevel.checkpoint()
    assert not scope.cancelled_caught


@pytest.mark.parametrize("start", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_fake_clock_refuses_a_start_that_is_no_time(start: float) -> None:
    with pytest.raises(ValueError, match="FakeClock"):
        FakeClock(start)


TRANSACTIONAL_APP = """
    from __future__ import annotations

    import aiosqlite
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncjobs import Jobs, JobsMiddleware

    DB = "app.db"  # the app's database, where its jobs live too (the outbox pattern)
    jobs = Jobs("sqlite:///" + DB)

    @jobs.task
    async def send_welcome(user_id: int) -> None: ...

    async def signup(request: Request) -> JSONResponse:
        email = (await request.json())["email"]
        async with aiosqlite.connect(DB, isolation_level=None) as db:
            await db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, e TEXT)")
            await db.execute("BEGIN IMMEDIATE")
            async with jobs.transaction(db):
                cursor = await db.execute(
                    "INSERT INTO users (e) VALUES (?) RETURNING id", (email,)
                )
                (user_id,) = await cursor.fetchone()
                await send_welcome.enqueue(user_id)
            await db.execute("ROLLBACK" if email.startswith("rollback") else "COMMIT")
        return JSONResponse({"user": user_id}, status_code=202)

    app = Starlette(
        routes=[Route("/signup", signup, methods=["POST"])],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
"""

TRANSACTIONAL_CONFTEST = """
    import pytest
    import pytest_asyncio

    import myapp

    @pytest.fixture
    def asyncjobs_url(tmp_path, monkeypatch):
        monkeypatch.setattr(myapp, "DB", str(tmp_path / "test-app.db"))
        return "sqlite:///" + myapp.DB  # the store on the file the endpoint writes to

    @pytest_asyncio.fixture
    async def jobs(asyncjobs_isolate):
        return await asyncjobs_isolate(myapp.jobs)
"""

TRANSACTIONAL_TESTS = """
    import httpx
    import pytest

    from asyncjobs.testing import assert_enqueued, assert_not_enqueued

    import myapp

    @pytest.mark.asyncio
    async def test_signup_stores_the_user_and_its_job_together(jobs):
        transport = httpx.ASGITransport(app=myapp.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            kept = await client.post("/signup", json={"email": "a@example.com"})
            dropped = await client.post("/signup", json={"email": "rollback@example.com"})
        await assert_enqueued(jobs, myapp.send_welcome, user_id=kept.json()["user"])
        await assert_not_enqueued(jobs, myapp.send_welcome, user_id=dropped.json()["user"])
"""


def test_plugin_tests_an_endpoint_that_enqueues_in_its_own_transaction(
    pytester: pytest.Pytester,
) -> None:
    """README: override ``asyncjobs_url`` so the store is on the app's database file;
    the fixture as the README writes it also works in pytest-asyncio's strict mode."""
    pytester.makeini("[pytest]\nasyncio_mode = strict\nfilterwarnings = error\n")
    pytester.makepyfile(
        myapp=textwrap.dedent(TRANSACTIONAL_APP),
        conftest=textwrap.dedent(TRANSACTIONAL_CONFTEST),
        test_myapp=textwrap.dedent(TRANSACTIONAL_TESTS),
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", "-p", "no:cacheprovider",
        "-o", "asyncio_default_fixture_loop_scope=function",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "app.db").exists(), "the app's real database was touched"
