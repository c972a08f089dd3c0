"""Flow control: token-bucket rate limits, concurrency limits, ordered groups.

Most tests use drain() and the FakeClock. Those marked ``slow`` run real workers on
the real clock (some in two processes sharing one file) with small numbers; each
takes a few seconds.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from subprocess import PIPE
from typing import Any, NamedTuple

import anyio
import anyio.abc
import pytest

from asyncjobs import ConfigurationError, Job, Jobs, JobSpec, JobStatus, RateLimit, Retry, Task
from asyncjobs._tasks import JobOptions
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]


async def statuses(jobs: Jobs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in await jobs.list(limit=1000):
        counts[info.status] = counts.get(info.status, 0) + 1
    return counts


class Gauge:
    """Counts jobs running at once inside task code; yields so that jobs overlap."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.order: list[int] = []

    async def run(self, n: int) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.order.append(n)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        self.active -= 1


# -- rate limits (FakeClock) -----------------------------------------------------------


async def test_rate_limit_runs_a_burst_then_one_job_per_token(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.task(rate_limit="10/s")
    async def ping(n: int) -> None: ...

    for n in range(15):
        await ping.enqueue(n)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 10, "queued": 5}
    clock.advance(0.3)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 13, "queued": 2}
    clock.advance(10)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 15}


async def test_a_job_without_a_token_stays_queued_and_spends_no_attempt(jobs: Jobs) -> None:
    @jobs.task(rate_limit=RateLimit(rate=1, per=60))
    async def slow() -> None: ...

    first, second = await slow.enqueue(), await slow.enqueue()
    await drain(jobs)
    assert (await first.info()).status == JobStatus.SUCCEEDED
    held = await second.info()
    assert held.status == JobStatus.QUEUED
    assert held.attempts == 0
    assert held.started_at is None


async def test_rate_limit_burst_can_be_smaller_than_the_rate(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.task(rate_limit=RateLimit(rate=100, per=60, burst=3))
    async def ping() -> None: ...

    for _ in range(10):
        await ping.enqueue()
    await drain(jobs)
    assert (await statuses(jobs))["succeeded"] == 3
    clock.advance(0.6)  # one token every 0.6 s
    await drain(jobs)
    assert (await statuses(jobs))["succeeded"] == 4


async def test_a_named_limiter_is_shared_by_the_tasks_that_use_it(jobs: Jobs) -> None:
    jobs.limiter("resend", "4/s")

    @jobs.task(limiter="resend")
    async def welcome(n: int) -> None: ...

    @jobs.task(limiter="resend")
    async def receipt(n: int) -> None: ...

    for n in range(3):
        await welcome.enqueue(n)
        await receipt.enqueue(n)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 4, "queued": 2}


async def test_a_task_with_its_own_rate_and_a_limiter_needs_a_token_from_both(
    jobs: Jobs,
) -> None:
    jobs.limiter("provider", "10/s")

    @jobs.task(limiter="provider", rate_limit="2/s")
    async def strict(n: int) -> None: ...

    @jobs.task(limiter="provider")
    async def loose(n: int) -> None: ...

    for n in range(5):
        await strict.enqueue(n)
    for n in range(10):
        await loose.enqueue(n)
    await drain(jobs)
    done = [i.task for i in await jobs.list(status="succeeded", limit=100)]
    assert done.count(strict.name) == 2  # its own bucket
    assert len(done) == 10  # the shared bucket


async def test_a_keyed_limiter_gives_each_key_its_own_bucket(jobs: Jobs, clock: FakeClock) -> None:
    jobs.limiter("per_domain", "2/s", key=lambda address: address.split("@")[1])

    @jobs.task(limiter="per_domain")
    async def send(address: str) -> str:
        return address

    for n in range(5):
        await send.enqueue(f"u{n}@busy.example")
    for n in range(3):
        await send.enqueue(f"u{n}@quiet.example")
    await drain(jobs)
    done = sorted(str(i.result) for i in await jobs.list(status="succeeded"))
    assert done == ["u0@busy.example", "u0@quiet.example", "u1@busy.example", "u1@quiet.example"]
    clock.advance(0.5)  # one more token per domain
    await drain(jobs)
    assert (await statuses(jobs)) == {"succeeded": 6, "queued": 2}


async def test_a_limiter_whose_key_was_dropped_puts_the_keyed_backlog_in_its_shared_bucket(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock
) -> None:
    """A deploy turned a per-domain limiter into one for all (the provider counts every
    send): the jobs queued under the old definition kept drawing from their domains'
    buckets, so the backlog ran a bucketful per domain at once, past the limit now set."""
    old = make_jobs(backend_url)
    old.limiter("resend", "1/m", key=lambda address: address.split("@")[1])

    @old.task(name="send", limiter="resend")
    async def send(address: str) -> None: ...

    for n in range(3):
        for domain in ("a", "b", "c", "d"):
            await send.enqueue(f"{n}@{domain}.example")
    await old.close()

    new = make_jobs(backend_url)
    new.limiter("resend", "1/m")
    ran: list[str] = []

    @new.task(name="send", limiter="resend")
    async def send_now(address: str) -> None:
        ran.append(address)

    await drain(new)
    assert ran == ["0@a.example"]
    clock.advance(60)  # one more token, for the oldest job of any domain
    await drain(new)
    assert ran == ["0@a.example", "0@b.example"]


async def test_a_limiter_key_function_that_fails_fails_the_enqueue(jobs: Jobs) -> None:
    jobs.limiter("per_customer", "5/s", key=lambda customer: customer["id"])

    @jobs.task(limiter="per_customer")
    async def bill(customer: dict[str, int]) -> None: ...

    with pytest.raises(KeyError):
        await bill.enqueue({"no_id": 1})
    assert await jobs.list() == []


async def test_a_rate_limited_task_does_not_hold_up_other_tasks_or_queues(jobs: Jobs) -> None:
    @jobs.task(queue="slow", rate_limit="1/m", priority=10)
    async def throttled(n: int) -> None: ...

    @jobs.task(queue="fast")
    async def quick(n: int) -> None: ...

    for n in range(50):
        await throttled.enqueue(n)
    for n in range(5):
        await quick.enqueue(n)
    await drain(jobs)
    done = [i.task for i in await jobs.list(status="succeeded")]
    assert done.count(quick.name) == 5
    assert done.count(throttled.name) == 1


async def test_a_limiter_must_be_defined_before_a_task_uses_it(jobs: Jobs) -> None:
    with pytest.raises(ConfigurationError, match=r"jobs\.limiter\('missing'"):

        @jobs.task(limiter="missing")
        async def orphan() -> None: ...


@pytest.mark.parametrize("bad", ["10 per second", "0/s", 10])
async def test_a_bad_rate_limit_is_refused_when_the_task_is_defined(
    jobs: Jobs, bad: object
) -> None:
    with pytest.raises(ConfigurationError, match="rate limit"):
        jobs.task(rate_limit=bad)  # type: ignore[call-overload]

    with pytest.raises(ConfigurationError, match="rate limit"):
        jobs.limiter("x", bad)  # type: ignore[arg-type]


# -- concurrency limits (drain) --------------------------------------------------------


async def test_task_concurrency_bounds_running_jobs(jobs: Jobs) -> None:
    gauge = Gauge()

    @jobs.task(concurrency=2)
    async def work(n: int) -> None:
        await gauge.run(n)

    for n in range(8):
        await work.enqueue(n)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 8}
    assert gauge.peak == 2


async def test_a_job_cancelled_from_another_process_holds_its_slot_until_it_stops(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    worker = make_jobs(visibility_timeout=60, shutdown_timeout=0)
    dashboard = make_jobs()  # another process on the same store, e.g. the web app's
    started: list[int] = []
    ended: list[str] = []

    @worker.task(concurrency=1)
    async def one_at_a_time(n: int) -> None:
        started.append(n)
        try:
            await anyio.Event().wait()  # until cancelled
        finally:
            ended.append(f"{n} stopped")

    first, second = await one_at_a_time.enqueue(1), await one_at_a_time.enqueue(2)

    async def settle() -> None:
        for _ in range(50):
            await anyio.lowlevel.checkpoint()

    await worker.start()
    try:
        with anyio.fail_after(5):
            while started != [1]:
                await anyio.lowlevel.checkpoint()
        assert await dashboard.cancel(first.id) is True
        assert await dashboard.cancel(first.id) is False  # already asked
        worker.runner.wake()  # the worker claims again: job 1 still runs, so not job 2
        await settle()
        assert started == [1]
        assert (await first.info()).status == "running"  # until it really stops
        clock.advance(20)  # the worker's next heartbeat learns of the cancel
        with anyio.fail_after(5):
            while started != [1, 2]:
                await settle()
        assert ended == ["1 stopped"]
        info = await first.info()
        assert (info.status, info.attempts) == ("cancelled", 1)
        assert await second.cancel() is True  # the same process: it stops at once
        with anyio.fail_after(5):
            while (await second.info()).status != "cancelled":
                await settle()
        assert ended == ["1 stopped", "2 stopped"]
    finally:
        await worker.stop()


async def test_queue_concurrency_bounds_a_queue_but_not_the_others(jobs: Jobs) -> None:
    email, other = Gauge(), Gauge()
    jobs.queue("email", concurrency=1)

    @jobs.task(queue="email")
    async def verify(n: int) -> None:
        await email.run(n)

    @jobs.task(queue="email")
    async def digest(n: int) -> None:
        await email.run(n)

    @jobs.task(queue="default")
    async def resize(n: int) -> None:
        await other.run(n)

    for n in range(4):
        await verify.enqueue(n)
        await digest.enqueue(n)
        await resize.enqueue(n)
    await drain(jobs)
    assert await statuses(jobs) == {"succeeded": 12}
    assert email.peak == 1
    assert other.peak > 1


# -- groups ----------------------------------------------------------------------------


async def test_a_group_runs_one_at_a_time_in_enqueue_order(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(concurrency=10)
    gauges = {"user:1": Gauge(), "user:2": Gauge()}

    @jobs.task
    async def step(group: str, n: int) -> None:
        await gauges[group].run(n)

    for n in range(20):
        for group in gauges:
            await step.options(group=group).enqueue(group, n)
    await drain(jobs)
    for gauge in gauges.values():
        assert gauge.order == list(range(20))
        assert gauge.peak == 1


async def test_a_job_being_retried_keeps_its_group_waiting(jobs: Jobs, clock: FakeClock) -> None:
    ran: list[str] = []

    @jobs.task(retries=2)
    async def flaky(name: str) -> None:
        ran.append(name)
        if name == "first" and ran.count("first") == 1:
            raise Retry(delay=30)

    await flaky.options(group="g").enqueue("first")
    second = await flaky.options(group="g").enqueue("second")
    await drain(jobs)
    assert ran == ["first"]
    assert (await second.info()).status == JobStatus.QUEUED
    clock.advance(30)
    await drain(jobs)
    assert ran == ["first", "first", "second"]


async def test_a_chain_member_waiting_for_its_chain_does_not_hold_its_group(
    jobs: Jobs, clock: FakeClock
) -> None:
    ran: list[str] = []

    @jobs.task
    async def step(name: str) -> None:
        ran.append(name)

    later = step.options(delay=60)
    await jobs.chain(later.spec("report"), step.options(group="g").spec("mail report"))
    await step.options(group="g").enqueue("mail invoice")  # enqueued after the member
    await drain(jobs)
    assert ran == ["mail invoice"]
    clock.advance(60)
    await drain(jobs)
    assert ran == ["mail invoice", "report", "mail report"]


async def test_a_dead_job_releases_its_group(jobs: Jobs) -> None:
    ran: list[str] = []

    @jobs.task(retries=0)
    async def doomed(name: str) -> None:
        ran.append(name)
        if name == "first":
            raise RuntimeError("boom")

    first = await doomed.options(group="g").enqueue("first")
    await doomed.options(group="g").enqueue("second")
    await drain(jobs)
    assert (await first.info()).status == JobStatus.DEAD
    assert ran == ["first", "second"]


# -- the serving runner ----------------------------------------------------------------


async def test_the_runner_sleeps_until_the_next_token_not_the_poll_interval(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(poll_interval=3600)

    @jobs.task(rate_limit="1/s")
    async def tick(n: int) -> int:
        return n

    handles = [await tick.enqueue(n) for n in range(3)]
    async with jobs:
        assert await handles[0].result(timeout=5) == 0
        for n in (1, 2):
            clock.advance(1.0)
            assert await handles[n].result(timeout=5) == n


# -- real clock, real workers ----------------------------------------------------------


def start_times(infos: list[datetime | None]) -> list[float]:
    times = sorted(t.timestamp() for t in infos if t is not None)
    assert len(times) == len(infos)
    return times


def assert_within_bucket(starts: list[float], *, burst: int, per_second: float) -> None:
    """No span of starts took more tokens than the bucket could give in that span."""
    slack = 0.02  # clock reads of different processes around one commit
    for i, begin in enumerate(starts):
        for j in range(i, len(starts)):
            allowed = burst + per_second * (starts[j] - begin + slack)
            assert j - i + 1 <= allowed, (i, j, starts[i : j + 1])


@pytest.mark.slow
async def test_real_clock_30_jobs_at_10_per_second_take_a_burst_then_the_rate(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(clock=None, concurrency=50)

    @jobs.task(rate_limit="10/s")
    async def ping(n: int) -> None: ...

    handles = [await ping.enqueue(n) for n in range(30)]
    with anyio.fail_after(10):
        async with jobs:
            for handle in handles:
                await handle.result(timeout=10)
    starts = start_times([(await h.info()).started_at for h in handles])
    assert starts[-1] - starts[0] >= 1.5
    assert starts[9] - starts[0] < 0.5  # the burst went at once
    assert_within_bucket(starts, burst=10, per_second=10)


@pytest.mark.slow
async def test_real_clock_a_1_per_second_task_does_not_delay_a_fast_queue(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(clock=None)

    @jobs.task(queue="slow", rate_limit="1/s", priority=5)
    async def throttled(n: int) -> None: ...

    @jobs.task(queue="fast")
    async def quick(n: int) -> None: ...

    slow = [await throttled.enqueue(n) for n in range(5)]
    async with jobs:
        begin = jobs.clock.now()
        fast = [await quick.enqueue(n) for n in range(20)]
        with anyio.fail_after(5):
            for handle in fast:
                await handle.result(timeout=5)
        fast_done = jobs.clock.now() - begin
        waiting = [(await h.info()).status for h in slow].count(JobStatus.QUEUED)
    assert fast_done < 0.9
    assert waiting >= 3


@pytest.mark.slow
async def test_real_clock_a_group_of_20_runs_in_order_with_concurrency_10(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(clock=None, concurrency=10)
    gauge = Gauge()

    @jobs.task
    async def step(n: int) -> None:
        await gauge.run(n)

    handles = [await step.options(group="order:7").enqueue(n) for n in range(20)]
    with anyio.fail_after(5):  # one poll interval per job would take 20 s
        async with jobs:
            for handle in handles:
                await handle.result(timeout=5)
    assert gauge.order == list(range(20))
    assert gauge.peak == 1


WORKER_SCRIPT = """
import os, sys
import anyio
from asyncjobs import Jobs

jobs = Jobs(sys.argv[1], concurrency=int(sys.argv[2]))
jobs.limiter("shared", "10/s")

@jobs.task(name="limited", limiter="shared")
async def limited(n: int) -> int:
    return os.getpid()

@jobs.task(name="pair", concurrency=2)
async def pair(n: int) -> int:
    await anyio.sleep(0.2)
    return os.getpid()

async def main() -> None:
    async with jobs:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)

anyio.run(main)
"""


@asynccontextmanager
async def run_workers(
    url: str, processes: int, concurrency: int
) -> AsyncIterator[list[anyio.abc.Process]]:
    """Start worker processes on ``url`` and wait until each is serving."""
    started: list[anyio.abc.Process] = []
    try:
        for _ in range(processes):
            started.append(
                await anyio.open_process(
                    [sys.executable, "-c", WORKER_SCRIPT, url, str(concurrency)],
                    stdin=PIPE,
                    stdout=PIPE,
                )
            )
        with anyio.fail_after(30):
            for process in started:
                assert process.stdout is not None
                line = await process.stdout.receive()
                assert line.startswith(b"ready"), line
        yield started
    finally:
        for process in started:
            if process.stdin is not None:
                await process.stdin.aclose()
        with anyio.move_on_after(10):
            for process in started:
                await process.wait()
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


@pytest.fixture
def worker_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "shared.db")


@pytest.mark.slow
async def test_two_processes_sharing_10_per_second_never_exceed_it_together(
    make_jobs: MakeJobs, worker_url: str
) -> None:
    jobs = make_jobs(worker_url, clock=None, workers=False)
    await jobs.start()  # the schema exists before the workers open the file
    async with run_workers(worker_url, processes=2, concurrency=20):
        handles = await jobs.enqueue_many([jobs_spec("limited", n) for n in range(40)])
        pids = set()
        for handle in handles:
            pids.add(await handle.result(timeout=15))
    assert len(pids) == 2  # both processes took tokens
    starts = start_times([(await h.info()).started_at for h in handles])
    assert starts[-1] - starts[0] >= 2.5  # 10 at once, then 30 more at 10/s
    assert_within_bucket(starts, burst=10, per_second=10)


@pytest.mark.slow
async def test_task_concurrency_2_never_runs_3_at_once_across_two_processes(
    make_jobs: MakeJobs, worker_url: str
) -> None:
    jobs = make_jobs(worker_url, clock=None, workers=False)
    await jobs.start()
    async with run_workers(worker_url, processes=2, concurrency=3):
        handles = await jobs.enqueue_many([jobs_spec("pair", n) for n in range(10)])
        for handle in handles:
            await handle.result(timeout=15)
    events: list[tuple[float, int]] = []
    for handle in handles:
        info = await handle.info()
        assert info.started_at is not None
        assert info.finished_at is not None
        events += [(info.started_at.timestamp(), 1), (info.finished_at.timestamp(), -1)]
    running = peak = 0
    for _, step in sorted(events):  # a finish sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    assert peak == 2


def jobs_spec(task: str, n: int) -> JobSpec[Any]:
    """A job of a task defined only in the worker processes."""
    return JobSpec(task=task, args=(n,))


# -- keyed limiters and jobs enqueued by name where the task is not defined -----------


def domain(address: str) -> str | None:
    return address.split("@")[1] if "@" in address else None  # no domain: shared bucket


class Sender(NamedTuple):
    producer: Jobs  # a web process: it enqueues "send" by name, without its definition
    worker: Jobs
    send: Task[[str], None]  # the worker's, under a limiter keyed by the domain
    ran: list[str]  # the addresses sent, in order


def sender(make_jobs: MakeJobs, url: str, rate: str) -> Sender:
    producer, worker = make_jobs(url, workers=False), make_jobs(url)
    worker.limiter("per_domain", rate, key=domain)
    ran: list[str] = []

    @worker.task(name="send", limiter="per_domain")
    async def send(address: str) -> None:
        ran.append(address)

    return Sender(producer, worker, send, ran)


async def test_keyed_limiter_applies_to_jobs_enqueued_by_name(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """DESIGN: "a job enqueued by name from a process that lacks the task takes its
    retries, timeout, limits from the worker's definition": the worker computes the key
    the producer could not, so each domain gets its own bucket, not one shared by all."""
    producer, worker, _, ran = sender(make_jobs, backend_url, "1/m")

    for address in ["1@a.example", "2@b.example", "3@c.example", "4@a.example"]:
        await producer.enqueue("send", address)
    await drain(worker)
    assert sorted(ran) == ["1@a.example", "2@b.example", "3@c.example"], ran
    assert (await statuses(worker)) == {"succeeded": 3, "queued": 1}  # a.example's next token


async def test_a_job_whose_key_is_pending_is_not_overtaken_by_a_later_one_of_its_key(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """A job of the same key enqueued later where the task is defined (its key known at
    once) waits behind the one enqueued by name: one token, the older job takes it."""
    producer, worker, send, ran = sender(make_jobs, backend_url, "1/m")

    await producer.enqueue("send", "first@a.example")
    await send.enqueue("second@a.example")
    await drain(worker)
    assert ran == ["first@a.example"]


async def test_a_failing_key_function_on_a_job_enqueued_by_name_is_logged_and_it_still_runs(
    make_jobs: MakeJobs, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The producer could not run the key function and the worker's fails on the job's
    arguments: the error is logged with the job, which takes the shared bucket."""
    producer = make_jobs(backend_url, workers=False)
    worker = make_jobs(backend_url)
    worker.limiter("per_customer", "1/m", key=lambda customer: customer["id"])
    ran: list[dict[str, int]] = []

    @worker.task(name="bill", limiter="per_customer")
    async def bill(customer: dict[str, int]) -> None:
        ran.append(customer)

    bad = await producer.enqueue("bill", {"no_id": 1})
    for n in range(3):
        await producer.enqueue("bill", {"id": n})
    with caplog.at_level("ERROR", logger="asyncjobs"):
        await drain(worker)
    assert sorted(ran, key=str) == [{"id": 0}, {"id": 1}, {"id": 2}, {"no_id": 1}]
    (record,) = [r for r in caplog.records if "could not be computed" in r.getMessage()]
    assert bad.id in record.getMessage()
    assert "KeyError" in record.getMessage()


async def test_a_limiter_without_a_key_puts_jobs_enqueued_by_name_in_its_shared_bucket(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    producer = make_jobs(backend_url, workers=False)
    worker = make_jobs(backend_url)
    worker.limiter("provider", "2/m")

    @worker.task(name="call", limiter="provider")
    async def call(n: int) -> None: ...

    for n in range(5):
        await producer.enqueue("call", n)
    await drain(worker)
    assert (await statuses(worker)) == {"succeeded": 2, "queued": 3}


async def test_keys_of_workflow_members_enqueued_by_name_come_from_their_own_arguments(
    make_jobs: MakeJobs, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain member that receives the previous result, and a batch's on_complete that
    receives the counts, get their key from the arguments they were enqueued with."""
    producer = make_jobs(backend_url, workers=False)
    worker = make_jobs(backend_url)
    worker.limiter("per_customer", "1/m", key=lambda customer_id: customer_id)
    seen: list[tuple[str, object]] = []

    @worker.task(name="fetch")
    async def fetch(customer_id: str) -> str:
        return f"data of {customer_id}"

    @worker.task(name="render", limiter="per_customer")
    async def render(data: str, customer_id: str) -> None:
        seen.append(("render", data))

    @worker.task(name="report", limiter="per_customer")
    async def report(customer_id: str, batch: Any = None) -> None:
        seen.append(("report", batch["total"]))

    await producer.chain(
        JobSpec(task="fetch", args=("c1",)), JobSpec(task="render", args=("c1",)),
        pass_result=True,
    )  # fmt: skip
    await producer.batch(
        [JobSpec(task="fetch", args=("c2",)), JobSpec(task="fetch", args=("c3",))],
        on_complete=JobSpec(task="report", args=("c2",)),
    )
    with caplog.at_level("ERROR", logger="asyncjobs"):
        await drain(worker)
    assert sorted(seen) == [("render", "data of c1"), ("report", 2)]
    assert not [r for r in caplog.records if "could not be computed" in r.getMessage()]


async def test_a_job_whose_key_is_pending_is_keyed_while_the_shared_bucket_is_empty(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """With the limiter's shared bucket empty a claim reads keyed jobs only: a job
    whose key is pending must still get its key and its own bucket's token, before a
    later job of that key takes it."""
    producer, worker, send, ran = sender(make_jobs, backend_url, "1/h")

    await send.enqueue("postmaster")  # no key: the shared bucket's one token
    await drain(worker)
    await producer.enqueue("send", "first@a.example")
    await send.enqueue("second@a.example")
    await producer.enqueue("send", "only@b.example")
    await drain(worker)
    assert ran == ["postmaster", "first@a.example", "only@b.example"]


async def test_pending_keys_come_in_claim_order(make_jobs: MakeJobs, backend_url: str) -> None:
    producer = make_jobs(backend_url, workers=False)
    first = await producer.enqueue("b", "x@b.example")
    urgent: Job[Any] = await producer.enqueue(
        JobSpec(task="a", args=("u@a.example",), options=JobOptions(priority=5))
    )
    for n in range(3):
        await producer.enqueue("a", f"{n}@a.example")
    rows = await producer.store.pending_keys(["a", "b"], limit=2)
    assert [row.id for row in rows] == [urgent.id, first.id]


async def test_a_job_enqueued_by_name_is_stored_as_any_other(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """The pending key is a column of its own: no options to parse on each claim and
    run, for a task without a keyed limiter, where it is never cleared."""
    producer = make_jobs(backend_url, workers=False)
    worker = make_jobs(backend_url)

    @worker.task(name="plain")
    async def plain(n: int) -> int:
        return n

    job = await producer.enqueue("plain", 1)
    row = await producer.store.get(job.id)
    assert row is not None
    assert row.options is None
    await drain(worker)
    assert await job.result(timeout=5) == 1


async def test_a_stream_of_jobs_enqueued_by_name_does_not_hold_up_those_already_keyed(
    make_jobs: MakeJobs, backend_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web process enqueues by name at a steady rate: a new job arrives each time
    the worker has stored keys, before its next claim. A job whose key is pending holds
    back only the limiter's jobs behind it, so those already keyed still run."""
    producer, worker, _, ran = sender(make_jobs, backend_url, "1000/s")

    enqueued: list[str] = []
    store_keys = worker.store.set_rate_keys

    async def set_rate_keys(keys: Any) -> None:
        await store_keys(keys)
        if len(enqueued) < 20:  # the web process enqueues another meanwhile
            enqueued.append(f"user{len(enqueued)}@d{len(enqueued)}.example")
            await producer.enqueue("send", enqueued[-1])
            if len(enqueued) == 20:
                ran.append("<stream stopped>")

    monkeypatch.setattr(worker.store, "set_rate_keys", set_rate_keys)
    await producer.enqueue("send", "first@a.example")
    await drain(worker)
    assert len(ran) == 22
    assert ran.index("first@a.example") < ran.index("<stream stopped>"), ran
    assert ran.index("user0@d0.example") < ran.index("<stream stopped>"), ran
