"""Chains, batches, results and current_job(), on every backend (``db_url`` is overridden)."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aiosqlite
import anyio
import asyncpg
import httpx
import pytest

from asyncjobs import (
    AsyncJobsError,
    Batch,
    BatchCounts,
    BatchProgress,
    Chain,
    ConfigurationError,
    Job,
    JobFailed,
    Jobs,
    JobSpec,
    JobStatus,
    Retry,
    Task,
    current_job,
)
from asyncjobs._retention import prune_expired
from asyncjobs.stores._sqlite_admin import ADMIN_BATCH
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


# -- chains ------------------------------------------------------------------------


async def test_a_chain_runs_its_jobs_in_order_one_after_another(jobs: Jobs) -> None:
    order: list[str] = []

    @jobs.task
    async def step(name: str) -> str:
        order.append(name)
        return name.upper()

    chain = await jobs.chain(step.spec("encode"), step.spec("thumbnail"), step.spec("notify"))
    assert isinstance(chain, Chain)
    assert [i.status for i in await chain.infos()] == ["queued", "waiting", "waiting"]
    assert await chain.status() == JobStatus.QUEUED
    await drain(jobs)
    assert order == ["encode", "thumbnail", "notify"]
    assert await chain.status() == JobStatus.SUCCEEDED
    assert await chain.result(timeout=5) == "NOTIFY"
    started = [(await job.info()).started_at for job in chain.jobs]
    finished = [(await job.info()).finished_at for job in chain.jobs]
    assert all(f is not None and s is not None for s, f in zip(started, finished, strict=True))
    assert finished[0] <= started[1]  # type: ignore[operator]
    assert finished[1] <= started[2]  # type: ignore[operator]


async def test_a_chain_can_pass_each_result_to_the_next_job(jobs: Jobs) -> None:
    @jobs.task
    async def add(a: int, b: int) -> int:
        return a + b

    @jobs.task
    async def times(value: int, factor: int) -> int:
        return value * factor

    @jobs.task
    async def describe(value: int, *, unit: str) -> dict[str, Any]:
        return {"value": value, "unit": unit}

    chain = await jobs.chain(
        add.spec(1, 2),
        times.spec(10),  # type: ignore[call-arg]
        describe.spec(unit="cm"),  # type: ignore[call-arg]
        pass_result=True,
    )
    await drain(jobs)
    assert await chain.result(timeout=5) == {"value": 30, "unit": "cm"}
    assert [(await job.info()).args for job in chain.jobs] == [[1, 2], [3, 10], [30]]


async def test_a_chain_without_pass_result_leaves_arguments_alone(jobs: Jobs) -> None:
    @jobs.task
    async def echo(*args: int) -> list[int]:
        return list(args)

    chain = await jobs.chain(echo.spec(1), echo.spec(2))
    await drain(jobs)
    assert await chain.result(timeout=5) == [2]


async def test_when_a_chain_member_ends_dead_the_rest_are_cancelled(jobs: Jobs) -> None:
    ran: list[str] = []

    @jobs.task(retries=0)
    async def step(name: str) -> None:
        ran.append(name)
        if name == "transcode":
            raise RuntimeError("codec missing")

    chain = await jobs.chain(
        step.spec("upload"), step.spec("transcode"), step.spec("thumbnail"), step.spec("notify")
    )
    await drain(jobs)
    assert ran == ["upload", "transcode"]
    statuses = [i.status for i in await chain.infos()]
    assert statuses == ["succeeded", "dead", "cancelled", "cancelled"]
    assert await chain.status() == JobStatus.DEAD
    with pytest.raises(JobFailed) as failed:
        await chain.result(timeout=5)
    assert failed.value.job_id == chain.jobs[1].id
    assert failed.value.status == JobStatus.DEAD
    assert "codec missing" in (failed.value.error or "")


async def test_a_chain_member_retried_before_succeeding_moves_the_chain_on(
    jobs: Jobs, clock: FakeClock
) -> None:
    attempts: list[int] = []

    @jobs.task
    async def fetch() -> int:
        return 7

    @jobs.task(retries=3)
    async def flaky(value: int) -> int:
        attempts.append(current_job().attempt)
        if len(attempts) < 3:
            raise Retry(delay=30)
        return value * 2

    @jobs.task
    async def publish(value: int) -> str:
        return f"published {value}"

    chain = await jobs.chain(
        fetch.spec(),
        flaky.spec(),  # type: ignore[call-arg]
        publish.spec(),  # type: ignore[call-arg]
        pass_result=True,
    )
    await drain(jobs)
    assert await chain.status() == JobStatus.SCHEDULED  # flaky waits out its retry delay
    assert (await chain.jobs[2].info()).status == JobStatus.WAITING
    for _ in range(2):
        clock.advance(30)
        await drain(jobs)
    assert attempts == [1, 2, 3]
    assert await chain.result(timeout=5) == "published 14"
    assert (await chain.jobs[1].info()).args == [7], "the result was passed once"


async def test_cancelling_a_chain_cancels_every_member_not_finished(jobs: Jobs) -> None:
    @jobs.task
    async def step(n: int) -> None: ...

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    assert await chain.cancel()
    assert [i.status for i in await chain.infos()] == ["cancelled"] * 3
    assert not await chain.cancel()
    await drain(jobs)
    assert await chain.status() == JobStatus.CANCELLED


async def test_a_chain_cancelled_from_another_process_while_a_member_runs_goes_no_further(
    make_jobs: MakeJobs,
) -> None:
    """The running member only hears of it at its worker's next heartbeat and may
    succeed first; the members after it must not run all the same."""
    jobs = make_jobs()
    web = make_jobs(workers=False)  # e.g. the dashboard's process
    release, ran = anyio.Event(), []

    @jobs.task(name="step")
    async def step(n: int) -> None:
        ran.append(n)
        if n == 1:
            await release.wait()

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, jobs)
            while not ran:
                await anyio.lowlevel.checkpoint()
            assert await Chain(web, [job.id for job in chain.jobs]).cancel()
            release.set()
    assert ran == [1]
    assert [i.status for i in await chain.infos()][1:] == ["cancelled", "cancelled"]
    assert await chain.status() == JobStatus.CANCELLED


async def test_discarding_a_waiting_chain_member_cancels_the_rest(jobs: Jobs) -> None:
    @jobs.task
    async def step(n: int) -> None: ...

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    assert await jobs.discard(chain.jobs[1].id)  # the middle one, still waiting
    assert await jobs.get(chain.jobs[1].id) is None
    third = await jobs.get(chain.jobs[2].id)
    assert third is not None
    assert third.status == "cancelled"  # not left waiting for a job that is gone
    await drain(jobs)
    first = await jobs.get(chain.jobs[0].id)
    assert first is not None
    assert first.status == "succeeded"


async def test_a_chain_broken_by_a_discarded_member_reports_it_cancelled(jobs: Jobs) -> None:
    """status() and result() pass over the member that is gone, not raise that it is."""

    @jobs.task
    async def step(n: int) -> int:
        return n

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    assert await jobs.discard(chain.jobs[1].id)  # from the dashboard, say
    await drain(jobs)
    assert await chain.status() == JobStatus.CANCELLED
    with pytest.raises(JobFailed) as failed:
        await chain.result(timeout=5)
    assert (failed.value.job_id, failed.value.status) == (chain.jobs[2].id, JobStatus.CANCELLED)
    # A chain whose first members were purged while the last still waits is not broken.
    later = await jobs.chain(step.spec(4), step.options(delay=60).spec(5))
    await drain(jobs)
    assert await jobs.purge(status="succeeded") == 2
    assert await later.status() == JobStatus.SCHEDULED
    assert await jobs.purge(status="scheduled") == 1
    with pytest.raises(AsyncJobsError, match="no job of <Chain"):
        await later.status()


async def test_a_chain_with_a_member_gone_lists_the_members_still_stored(jobs: Jobs) -> None:
    """``infos()`` raised once any member was gone (discarded, purged or pruned), though
    ``status()`` and ``result()`` pass over it: the chain whose step was discarded, the
    one to look into, could not be listed. It lists the members still stored, in order
    (each with its id), and raises only when none is, as ``status()`` does."""

    @jobs.task
    async def step(n: int) -> int:
        return n

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    assert await jobs.discard(chain.jobs[1].id)
    first, _, last = chain.jobs
    infos = await chain.infos()
    assert [(i.id, i.status) for i in infos] == [(first.id, "queued"), (last.id, "cancelled")]
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["succeeded", "cancelled"]
    assert await jobs.discard(first.id)
    assert await jobs.discard(last.id)
    with pytest.raises(AsyncJobsError, match="no job of <Chain"):
        await chain.infos()


async def test_a_chain_whose_last_member_is_gone_does_not_read_succeeded(jobs: Jobs) -> None:
    """Discarding the last member (unrun: waiting or released, or dead) left no member to
    show the chain broke, and ``status()`` read ``succeeded`` once the rest had. What
    became of the last member is no longer stored: ``status()`` says so, as ``result()``
    does, instead of reporting a success."""
    step, _, _ = media_step(jobs)  # "transcode" fails
    waiting = await jobs.chain(step.spec("a"), step.spec("b"), step.spec("c"))
    released = await jobs.chain(step.spec("d"), step.options(delay=60).spec("e"))
    dead = await jobs.chain(step.spec("f"), step.spec("transcode"))
    assert await jobs.discard(waiting.jobs[-1].id)  # from the dashboard, say
    assert await waiting.status() == JobStatus.QUEUED  # under way: the first is due
    await drain(jobs)
    assert (await released.jobs[-1].info()).status == JobStatus.SCHEDULED
    assert await dead.status() == JobStatus.DEAD
    assert await jobs.discard(released.jobs[-1].id)
    assert await jobs.discard(dead.jobs[-1].id)
    for chain in (waiting, released, dead):
        with pytest.raises(AsyncJobsError, match=r"last job .* is no longer stored"):
            await chain.status()
        with pytest.raises(AsyncJobsError, match="does not exist"):
            await chain.result(timeout=5)
    # A chain that succeeded whole still reads so, and one whose first members are
    # gone too, while its last one is stored.
    whole = await jobs.chain(step.spec("g"), step.spec("h"))
    await drain(jobs)
    assert await jobs.discard(whole.jobs[0].id)
    assert await whole.status() == JobStatus.SUCCEEDED


async def test_purging_queued_jobs_cancels_the_chains_behind_them(jobs: Jobs) -> None:
    @jobs.task
    async def step(n: int) -> None: ...

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    lone = await jobs.enqueue(step, 4)
    assert await jobs.purge(status="queued") == 2  # the chain's first job and the lone one
    assert await jobs.get(lone.id) is None
    assert await jobs.get(chain.jobs[0].id) is None
    assert [(await job.info()).status for job in chain.jobs[1:]] == ["cancelled"] * 2


async def test_purge_leaves_the_unfinished_members_of_a_chain_under_way(jobs: Jobs) -> None:
    """``purge(status="waiting")`` deleted a chain's waiting members (and one of
    ``"scheduled"`` its released last member) before they ran, and the chain then read
    ``succeeded`` once the jobs before them did: no member was left to say it broke. A
    purge takes a chain's later members once they finished (cancel the chain first)."""

    @jobs.task
    async def step(n: int) -> int:
        return n

    chain = await jobs.chain(step.spec(1), step.spec(2), step.spec(3))
    assert await jobs.purge(status="waiting") == 0
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["succeeded"] * 3
    last_queued = await jobs.chain(step.spec(4), step.options(delay=60).spec(5))
    await drain(jobs)  # its second member is released, due in a minute
    assert await jobs.purge(status="scheduled") == 0
    assert await last_queued.status() == JobStatus.SCHEDULED

    assert await last_queued.cancel()
    assert await jobs.purge(status="cancelled") == 1
    waiting = await jobs.batch([step.spec(6)], on_complete=step.spec(-1))
    assert await jobs.purge(status="waiting") == 1  # an on_complete is no chain member
    assert waiting.on_complete is not None
    assert await jobs.get(waiting.on_complete.id) is None


def media_step(jobs: Jobs) -> tuple[Task[[str], str], list[str], set[str]]:
    """A chain step (no retries) that returns its name, or fails for the names in a set
    (a codec missing, "transcode" at first): the task, the names run, that set."""
    ran: list[str] = []
    failing = {"transcode"}

    @jobs.task(retries=0)
    async def step(name: str) -> str:
        ran.append(name)
        if name in failing:
            raise RuntimeError("codec missing")
        return name

    return step, ran, failing


@pytest.mark.parametrize("how", ["retry", "retry_dead"])
async def test_retrying_a_dead_chain_member_carries_the_chain_on(jobs: Jobs, how: str) -> None:
    """The members after it, cancelled before they ran when it ended dead, wait again
    and run once it succeeds: retrying the failed step resumes the workflow."""
    step, ran, failing = media_step(jobs)
    chain = await jobs.chain(
        step.spec("upload"), step.spec("transcode"), step.spec("thumbnail"), step.spec("notify")
    )
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["succeeded", "dead", *["cancelled"] * 2]
    failing.clear()
    if how == "retry":
        assert await jobs.retry(chain.jobs[1].id)
    else:
        assert await jobs.retry_dead() == 1
    assert [i.status for i in await chain.infos()] == ["succeeded", "queued", *["waiting"] * 2]
    await drain(jobs)
    assert ran == ["upload", "transcode", "transcode", "thumbnail", "notify"]
    assert await chain.status() == JobStatus.SUCCEEDED
    assert await chain.result(timeout=5) == "notify"


async def test_a_member_retried_before_its_dead_predecessor_waits_for_it(
    jobs: Jobs, clock: FakeClock
) -> None:
    failing = True

    @jobs.task(retries=0)
    async def fetch() -> int:
        if failing:
            raise RuntimeError("source down")
        return 7

    @jobs.task(retries=0)
    async def publish(value: int) -> str:
        return f"published {value}"

    @jobs.task(retries=0)
    async def announce(text: str) -> str:
        return f"{text}, announced"

    chain = await jobs.chain(
        fetch.spec(),
        publish.spec(),  # type: ignore[call-arg]
        announce.spec(),  # type: ignore[call-arg]
        pass_result=True,
    )
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["dead", "cancelled", "cancelled"]

    assert await jobs.retry(chain.jobs[1].id)  # the follower first: it must not run alone
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["dead", "waiting", "waiting"]

    failing = False
    assert await jobs.retry(chain.jobs[0].id)
    await drain(jobs)
    assert await chain.result(timeout=5) == "published 7, announced"


async def test_a_member_waiting_for_a_dead_predecessor_is_cancelled_when_that_is_deleted(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=3600, dead_retention=3600)

    @jobs.task(retries=0)
    async def fetch() -> int:
        raise RuntimeError("source down")

    @jobs.task
    async def publish() -> None:
        pass

    chain = await jobs.chain(fetch.spec(), publish.spec())
    await drain(jobs)
    dead, follower = chain.jobs
    assert await jobs.retry(follower.id)  # now it waits for the dead one
    clock.advance(2 * 3600)
    assert await prune_expired(jobs) == 0, "kept while a retried member waits on it"
    assert (await follower.info()).status == JobStatus.WAITING

    assert await jobs.discard(dead.id)
    info = await follower.info()
    assert info.status == JobStatus.CANCELLED, "not left waiting for a job that is gone"
    assert await jobs.retry(follower.id)  # and a retry by hand runs it on its own
    await drain(jobs)
    assert (await follower.info()).status == JobStatus.SUCCEEDED


async def test_a_cancelled_member_retried_after_retention_pruned_the_one_before_it(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Dead jobs kept for less time than the rest: retention prunes a broken chain's dead
    member before the cancelled one after it. Retried, that one has nothing to wait for
    and runs on its own; but one that takes the previous result, which it never got, ran
    with its arguments shifted (``publish("news")`` as ``value="news"``) and succeeded.
    Its retry is refused, and leaves it as it was."""
    jobs = make_jobs(retention=7200, dead_retention=3600)
    seen: list[tuple[object, str]] = []

    @jobs.task(retries=0)
    async def fetch() -> int:
        raise RuntimeError("source down")

    @jobs.task
    async def publish(value: object, channel: str = "main") -> str:
        seen.append((value, channel))
        return f"published {value} on {channel}"

    plain = await jobs.chain(fetch.spec(), publish.spec(7, "news"))
    passing = await jobs.chain(fetch.spec(), publish.spec("news"), pass_result=True)
    await drain(jobs)
    clock.advance(3601)
    assert await prune_expired(jobs) == 2  # the dead ones; the cancelled ones are kept
    for chain in (plain, passing):
        assert await jobs.get(chain.jobs[0].id) is None
        assert (await chain.jobs[1].info()).status == JobStatus.CANCELLED

    assert await jobs.retry(plain.jobs[1].id)
    orphan = passing.jobs[1]
    with pytest.raises(AsyncJobsError, match=rf"job {orphan.id} cannot be retried.*pass_result"):
        await jobs.retry(orphan.id)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=jobs.dashboard(auth=("admin", "secret"))),
        base_url="http://testserver",
        auth=("admin", "secret"),
    ) as client:
        page = await client.get(f"/jobs/{orphan.id}")
        token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
        assert token is not None
        refused = await client.post(
            f"/jobs/{orphan.id}/retry", data={"csrf_token": token.group(1)}, follow_redirects=True
        )
    assert "Not retried: this chain member takes the result" in refused.text
    await drain(jobs)
    assert seen == [(7, "news")]
    assert await plain.jobs[1].result(timeout=5) == "published 7 on news"
    info = await orphan.info()
    assert (info.status, info.attempts, info.max_attempts) == (JobStatus.CANCELLED, 0, 4)


async def test_retention_keeps_the_members_a_dead_one_cancelled_as_long_as_it(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Cancelled jobs are pruned sooner than dead ones: the members after a dead one,
    cancelled before they ran, went first, and a retry of the dead one then completed
    the chain without them (``succeeded``, the last step never run). They are kept as
    long as the member before them is, so they go on with the chain once it is retried."""
    jobs = make_jobs(retention=60, dead_retention=3600)
    step, ran, failing = media_step(jobs)
    chain = await jobs.chain(
        step.spec("upload"), step.spec("transcode"), step.spec("thumbnail"), step.spec("notify")
    )
    await drain(jobs)
    clock.advance(120)
    assert await prune_expired(jobs) == 1  # the succeeded one alone
    stored = [await jobs.get(j.id) for j in chain.jobs]
    assert [i and i.status for i in stored] == [None, "dead", "cancelled", "cancelled"]

    failing.clear()
    assert await jobs.retry(chain.jobs[1].id)
    await drain(jobs)
    assert ran == ["upload", "transcode", "transcode", "thumbnail", "notify"]
    assert await chain.status() == JobStatus.SUCCEEDED

    broken = await jobs.chain(step.spec("a"), step.spec("transcode"), step.spec("b"))
    failing.add("transcode")
    await drain(jobs)
    clock.advance(3601)
    # The dead one goes on dead_retention, with what ran before and what it cancelled
    # (and the first chain's last three, which succeeded after the retry).
    assert await prune_expired(jobs) == 6
    assert [await jobs.get(j.id) for j in broken.jobs] == [None, None, None]


async def test_a_purge_keeps_the_members_a_dead_one_cancelled_as_long_as_it(
    jobs: Jobs, clock: FakeClock
) -> None:
    """As retention does: a purge of cancelled (or of all finished) jobs took the members
    after a dead one, cancelled before they ran, and a retry of the dead one then
    finished the chain without them. They stay while the member before them is stored,
    and go when the same purge takes that one; a purge of dead jobs leaves them."""
    step, ran, failing = media_step(jobs)
    chain = await jobs.chain(
        step.spec("upload"), step.spec("transcode"), step.spec("thumbnail"), step.spec("notify")
    )
    await drain(jobs)
    clock.advance(1)
    assert await jobs.purge(status="cancelled") == 0
    assert await jobs.purge(status="succeeded") == 1
    stored = [await jobs.get(j.id) for j in chain.jobs]
    assert [i and i.status for i in stored] == [None, "dead", "cancelled", "cancelled"]
    failing.clear()
    assert await jobs.retry(chain.jobs[1].id)
    await drain(jobs)
    assert ran == ["upload", "transcode", "transcode", "thumbnail", "notify"]
    assert await chain.status() == JobStatus.SUCCEEDED

    failing.add("transcode")
    broken = await jobs.chain(step.spec("transcode"), step.spec("a"), step.spec("b"))
    unrun = await jobs.chain(step.spec("c"), step.spec("d"))
    assert await unrun.cancel()
    await drain(jobs)
    clock.advance(1)
    assert await jobs.purge(status="dead") == 1  # the members after it stay, free to go
    assert await jobs.purge(status="cancelled") == 4
    assert [await jobs.get(j.id) for j in (*broken.jobs, *unrun.jobs)] == [None] * 5

    await jobs.chain(step.spec("transcode"), step.spec("e"), step.spec("f"))
    await drain(jobs)
    clock.advance(1)
    assert await jobs.purge(older_than=0) == 6  # the dead one takes them in the same call
    assert await jobs.list() == []


async def test_retention_prunes_a_cancelled_chain_in_one_pass(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Each member of a chain cancelled before it ran is kept while the one before it is
    (a retry of that one takes it back), so a pass pruned the first member alone: a
    chain of N lingered N passes, a minute apart. One pass takes the whole run, still in
    batches of at most ``batch`` jobs."""
    jobs = make_jobs(retention=60)

    @jobs.task
    async def step(n: int) -> None: ...

    chain = await jobs.chain(*(step.spec(n) for n in range(5)))
    assert await chain.cancel()
    kept = await jobs.chain(step.spec(5), step.spec(6))
    assert await kept.cancel()
    clock.advance(61)
    assert await prune_expired(jobs, batch=2, max_batches=2) == 4  # bounded batches
    assert await prune_expired(jobs) == 3
    assert await jobs.list() == []


async def test_one_prune_pass_keeps_a_cancelled_member_that_a_retried_one_waits_for(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Pruning the run of a cancelled chain stops at a member that a later one, retried
    by hand, waits for; and it leaves one still within retention (cancelled later)."""
    jobs = make_jobs(retention=60)

    @jobs.task
    async def step(n: int) -> None: ...

    chain = await jobs.chain(*(step.spec(n) for n in range(4)))
    assert await chain.cancel()
    assert await jobs.retry(chain.jobs[3].id)  # it waits for the third again
    late = await jobs.chain(step.spec(4), step.spec(5), step.spec(6))
    assert await late.jobs[0].cancel()
    clock.advance(30)
    assert await jobs.retry(late.jobs[2].id)
    assert await late.jobs[2].cancel()  # cancelled 30 s after the two before it
    clock.advance(31)
    assert await prune_expired(jobs) == 4
    stored = [await jobs.get(j.id) for j in (*chain.jobs, *late.jobs)]
    assert [i and i.status for i in stored] == [
        *[None, None, "cancelled", "waiting"],
        *[None, None, "cancelled"],
    ]


async def test_a_chain_member_cancelled_while_waiting_and_retried_waits_again(
    jobs: Jobs,
) -> None:
    order: list[int] = []

    @jobs.task
    async def step(n: int) -> int:
        order.append(n)
        return n

    chain = await jobs.chain(step.spec(1), step.spec(2))
    second = chain.jobs[1]
    assert await second.cancel()  # while it waits for the first
    assert await jobs.retry(second.id)
    assert (await second.info()).status == "waiting"  # not queued beside the first
    await drain(jobs)
    assert order == [1, 2]
    assert await second.result(timeout=5) == 2


async def test_a_chain_member_retried_after_its_predecessor_succeeded_gets_the_result(
    jobs: Jobs,
) -> None:
    calls: list[int] = []

    @jobs.task(retries=0)
    async def fetch() -> int:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("the API is down")
        return 7

    @jobs.task
    async def publish(value: int) -> str:
        return f"published {value}"

    chain = await jobs.chain(fetch.spec(), publish.spec(), pass_result=True)  # type: ignore[call-arg]
    first, second = chain.jobs
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["dead", "cancelled"]
    assert await jobs.retry(first.id)  # fixed: it succeeds, and its follower runs after it
    await drain(jobs)
    assert await first.result(timeout=5) == 7
    assert await second.result(timeout=5) == "published 7"
    # Cancelled by hand while it waited, it stays so when the one before it succeeds.
    chain = await jobs.chain(fetch.spec(), publish.spec(), pass_result=True)  # type: ignore[call-arg]
    first, second = chain.jobs
    assert await second.cancel()
    await drain(jobs)
    assert [i.status for i in await chain.infos()] == ["succeeded", "cancelled"]
    assert await jobs.retry(second.id)  # now the rest of the chain, by hand
    await drain(jobs)
    assert await second.result(timeout=5) == "published 7"
    # Released with the result, then cancelled before it ran: a retry passes it once.
    later = publish.options(delay=60)
    chain = await jobs.chain(fetch.spec(), later.spec(), pass_result=True)  # type: ignore[call-arg]
    first, second = chain.jobs
    await drain(jobs)
    assert (await second.info()).status == "scheduled"
    assert await second.cancel()
    assert await jobs.retry(second.id)
    await drain(jobs)
    assert (await second.info()).args == [7]
    assert await second.result(timeout=5) == "published 7"


async def test_a_batchs_on_complete_cancelled_and_retried_still_gets_the_counts(
    jobs: Jobs,
) -> None:
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(1), member.spec(2)], on_complete=done.spec())
    assert batch.on_complete is not None
    assert await batch.on_complete.cancel()
    assert await jobs.retry(batch.on_complete.id)  # members not finished: it waits again
    assert (await batch.on_complete.info()).status == "waiting"
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 2, "succeeded": 2, "dead": 0, "cancelled": 0}]
    # Retried once every member finished, it runs at once, with the counts.
    assert await jobs.retry(batch.id) is False  # succeeded: nothing to retry
    other = await jobs.batch([member.spec(3)], on_complete=done.spec())
    assert other.on_complete is not None
    assert await other.on_complete.cancel()
    await drain(jobs)  # the member finishes; the cancelled on_complete is not released
    assert await jobs.retry(other.id)
    await drain(jobs)
    assert seen[-1] == {"id": other.id, "total": 1, "succeeded": 1, "dead": 0, "cancelled": 0}


@pytest.mark.parametrize("how", ["retry", "retry_dead"])
async def test_an_on_complete_retried_after_it_ran_gets_the_members_current_counts(
    jobs: Jobs, how: str
) -> None:
    """A dead on_complete retried by hand ran with the counts its batch gave it first,
    though a member retried since had succeeded. Its retry now releases it as the
    batch's end did: with the members' counts as they are then, once every one of them
    has finished."""
    failing = {1}
    seen: list[BatchCounts] = []

    @jobs.task(retries=0)
    async def member(n: int) -> None:
        if n in failing:
            raise RuntimeError("flaky")

    @jobs.task(retries=0)
    async def done(**kwargs: Any) -> None:
        seen.append(kwargs["batch"])
        if failing:
            raise RuntimeError("report failed")

    batch = await jobs.batch([member.spec(1), member.spec(2)], on_complete=done.spec())
    assert batch.on_complete is not None
    await drain(jobs)
    assert (await batch.on_complete.info()).status == JobStatus.DEAD
    failing.clear()
    assert await jobs.retry(batch.jobs[0].id)
    if how == "retry":
        assert await jobs.retry(batch.id)  # before the member ran: it waits for it
        assert (await batch.on_complete.info()).status == JobStatus.WAITING
    else:
        await drain(jobs)
        assert await jobs.retry_dead() == 1
    await drain(jobs)
    assert (await batch.on_complete.info()).status == JobStatus.SUCCEEDED
    counts = {"id": batch.id, "total": 2, "cancelled": 0}
    assert seen == [{**counts, "succeeded": 1, "dead": 1}, {**counts, "succeeded": 2, "dead": 0}]


async def test_chain_members_go_in_one_transaction_and_are_validated_first(jobs: Jobs) -> None:
    @jobs.task
    async def step(n: object) -> None: ...

    with pytest.raises(ValueError, match="at least one"):
        await jobs.chain()
    with pytest.raises(ConfigurationError, match="idempotency_key"):
        await jobs.chain(step.spec(1), step.options(idempotency_key="k").spec(2))
    with pytest.raises(TypeError, match="argument 0"):
        await jobs.chain(step.spec(1), step.spec(b"bytes"))
    with pytest.raises(TypeError, match="JobSpec"):
        await jobs.chain(step)  # type: ignore[arg-type]
    assert await jobs.list() == []


# -- batches -----------------------------------------------------------------------


def counting_batch(jobs: Jobs) -> tuple[Task[[int], None], Task[..., None], list[BatchCounts]]:
    """A no-op ``member`` task, and a ``done`` task that records the counts it gets."""
    seen: list[BatchCounts] = []

    @jobs.task
    async def member(n: int) -> None: ...

    @jobs.task
    async def done(**kwargs: Any) -> None:
        seen.append(kwargs["batch"])

    return member, done, seen


async def test_a_batch_runs_on_complete_once_with_the_counts(jobs: Jobs, clock: FakeClock) -> None:
    seen: list[BatchCounts | None] = []

    @jobs.task(retries=0)
    async def send_report(user_id: int) -> int:
        if user_id == 3:
            raise RuntimeError("mailbox full")
        return user_id

    @jobs.task
    async def report_done(batch: BatchCounts | None = None) -> str:
        seen.append(batch)
        return "done"

    batch = await jobs.batch(
        [send_report.spec(u) for u in range(5)]
        + [send_report.options(delay=60).spec(u) for u in (10, 11)],
        on_complete=report_done.spec(),
    )
    assert isinstance(batch, Batch)
    assert batch.on_complete is not None
    assert (await batch.on_complete.info()).status == JobStatus.WAITING
    assert await batch.progress() == BatchProgress(
        total=7, done=0, succeeded=0, dead=0, cancelled=0
    )
    await drain(jobs)
    progress = await batch.progress()
    assert (progress.done, progress.total, progress.succeeded, progress.dead) == (5, 7, 4, 1)
    assert progress.fraction == pytest.approx(5 / 7)
    assert seen == []
    assert (await batch.on_complete.info()).status == JobStatus.WAITING
    clock.advance(60)
    await drain(jobs)
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 7, "succeeded": 6, "dead": 1, "cancelled": 0}]
    assert await batch.on_complete.result(timeout=5) == "done"
    final = await batch.wait(timeout=5)
    assert final.finished
    assert (final.succeeded, final.dead) == (6, 1)


async def test_waiting_for_a_batch_whose_on_complete_was_cancelled_waits_for_the_members(
    jobs: Jobs,
) -> None:
    @jobs.task
    async def member(n: int) -> None: ...

    @jobs.task
    async def done() -> None: ...

    batch = await jobs.batch([member.spec(1), member.spec(2)], on_complete=done.spec())
    assert batch.on_complete is not None
    assert await batch.on_complete.cancel()
    waited: list[BatchProgress] = []

    async def wait() -> None:
        waited.append(await batch.wait(timeout=10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        await drain(jobs)
    assert waited[0].finished
    assert waited[0].succeeded == 2


async def test_a_batch_waits_for_a_member_that_is_retried(jobs: Jobs, clock: FakeClock) -> None:
    seen: list[BatchCounts] = []
    tries: list[int] = []

    @jobs.task
    async def member(n: int) -> int:
        if n == 0:
            tries.append(1)
            if len(tries) == 1:
                raise Retry(delay=10)
        return n

    @jobs.task
    async def done(*, batch: BatchCounts) -> None:
        seen.append(batch)

    batch = await jobs.batch(
        [member.spec(n) for n in range(3)],
        on_complete=done.spec(batch={"id": "", "total": 0, "succeeded": 0, "dead": 0,
                                     "cancelled": 0}),
    )  # fmt: skip
    await drain(jobs)
    assert seen == []
    assert (await batch.progress()).done == 2
    clock.advance(10)
    await drain(jobs)
    assert len(tries) == 2
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 3, "dead": 0, "cancelled": 0}]
    assert await batch.results(timeout=5) == [0, 1, 2]


async def test_a_batch_waits_for_a_member_retried_by_hand_after_its_on_complete_ran(
    jobs: Jobs,
) -> None:
    """wait() returns once every member finished and on_complete too: a dead member
    retried by hand after on_complete ran is unfinished again, and waited for."""
    tries: list[int] = []

    @jobs.task(retries=0)
    async def member(n: int) -> int:
        if n == 0:
            tries.append(1)
            if len(tries) == 1:
                raise RuntimeError("first try")
        return n

    @jobs.task
    async def done() -> None: ...

    batch = await jobs.batch([member.spec(0), member.spec(1)], on_complete=done.spec())
    assert batch.on_complete is not None
    await drain(jobs)
    assert (await batch.on_complete.info()).status == "succeeded"
    assert await batch.wait(timeout=0) == BatchProgress(
        total=2, done=2, succeeded=1, dead=1, cancelled=0
    )
    assert await jobs.retry(batch.jobs[0].id)
    with pytest.raises(TimeoutError):
        await batch.wait(timeout=0)  # reads it once: a member is unfinished
    waited: list[BatchProgress] = []

    async def wait() -> None:
        waited.append(await batch.wait(timeout=10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        await drain(jobs)
    assert waited == [BatchProgress(total=2, done=2, succeeded=2, dead=0, cancelled=0)]


async def test_pruning_keeps_a_batchs_finished_members_while_its_on_complete_waits(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(retention=3600)
    member, done, seen = counting_batch(jobs)
    slow = member.options(delay=4 * 3600)  # a slow or backing-off member
    batch = await jobs.batch(
        [member.spec(1), member.spec(2), slow.spec(3)], on_complete=done.spec()
    )
    lone = await member.enqueue(4)
    await drain(jobs)
    clock.advance(2 * 3600)
    assert await prune_expired(jobs) == 1  # the lone job; the batch's two are kept
    assert await jobs.get(lone.id) is None
    assert (await batch.progress()).done == 2
    clock.advance(3 * 3600)
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 3, "dead": 0, "cancelled": 0}]
    clock.advance(2 * 3600)
    assert await prune_expired(jobs) == 4  # once on_complete ran: members and on_complete


async def test_a_batch_counts_cancelled_members_and_still_completes(jobs: Jobs) -> None:
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(3)], on_complete=done.spec())
    assert await batch.jobs[1].cancel()
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 2, "dead": 0, "cancelled": 1}]
    with pytest.raises(JobFailed):
        await batch.results(timeout=5)


async def test_purging_a_batchs_queued_members_keeps_the_on_complete_they_release(
    jobs: Jobs,
) -> None:
    """Purging cancels the members first, which releases on_complete (queued now): the
    purge deletes what matched before, not the job it just released."""
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(1), member.spec(2)], on_complete=done.spec())
    assert await jobs.purge(status="queued") == 2
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 2, "succeeded": 0, "dead": 0, "cancelled": 2}]


async def test_a_purge_in_several_steps_deletes_only_what_matched_before_it_began(
    jobs: Jobs,
) -> None:
    """SQLite purges ``ADMIN_BATCH`` rows per transaction: a step must not take what an
    earlier step changed. A batch as big as a step: the step that cancels its last
    member releases on_complete (queued now), which the next step took, so it never
    ran. A chain member retried by hand waits on a cancelled one; deleting that one
    cancels it, and the next step of a purge of cancelled jobs deleted it too."""
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(ADMIN_BATCH)], on_complete=done.spec())
    assert await jobs.purge(status="queued") == ADMIN_BATCH
    await drain(jobs)
    assert seen == [
        {"id": batch.id, "total": ADMIN_BATCH, "succeeded": 0, "dead": 0, "cancelled": ADMIN_BATCH}
    ]

    others = await jobs.chain(*[member.spec(n) for n in range(ADMIN_BATCH - 1)])
    assert await others.jobs[0].cancel()  # and every member after it
    chain = await jobs.chain(member.spec(1), member.spec(2))
    assert await chain.jobs[0].cancel()
    assert await jobs.retry(chain.jobs[1].id)  # waits for the one before it
    assert await jobs.purge(status="cancelled") == ADMIN_BATCH
    follower = await chain.jobs[1].info()
    assert follower.status == JobStatus.CANCELLED, "cancelled by the purge, not purged"


async def test_discarding_the_last_open_batch_member_still_completes_the_batch(
    jobs: Jobs, clock: FakeClock
) -> None:
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch(
        [member.spec(1), member.options(delay=60).spec(2)], on_complete=done.spec()
    )
    await drain(jobs)  # the first member succeeds; the second waits for its time
    assert await jobs.discard(batch.jobs[1].id)
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 2, "succeeded": 1, "dead": 0, "cancelled": 1}]


async def test_discarded_batch_member_is_counted_cancelled_in_on_complete(jobs: Jobs) -> None:
    """README: discarding an unfinished member cancels it first, and its batch still
    completes counting it cancelled, though its row is gone by then."""
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(3)], on_complete=done.spec())
    assert await jobs.discard(batch.jobs[0].id)
    assert await jobs.get(batch.jobs[0].id) is None
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 2, "dead": 0, "cancelled": 1}]
    assert await batch.progress() == BatchProgress(
        total=3, done=3, succeeded=2, dead=0, cancelled=1
    )


async def test_purged_batch_member_is_counted_cancelled_in_on_complete(jobs: Jobs) -> None:
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch(
        [member.options(delay=100).spec(0), member.spec(1), member.spec(2)],
        on_complete=done.spec(),
    )
    assert await jobs.purge(status="scheduled") == 1
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 2, "dead": 0, "cancelled": 1}]


async def test_purging_succeeded_members_mid_batch_keeps_the_counts(
    jobs: Jobs, clock: FakeClock
) -> None:
    """A routine ``purge(status="succeeded")`` while a batch is under way: its deleted
    members still count, under their own outcome (retention pruning keeps such rows)."""
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch(
        [member.spec(0), member.spec(1), member.options(delay=100).spec(2)],
        on_complete=done.spec(),
    )
    await drain(jobs)
    assert await jobs.purge(status="succeeded") == 2
    assert await batch.progress() == BatchProgress(
        total=3, done=2, succeeded=2, dead=0, cancelled=0
    )
    clock.advance(101)
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 3, "dead": 0, "cancelled": 0}]
    # Purged again once the batch is done, on_complete included: still counted.
    assert await jobs.purge(status="succeeded") == 2
    assert await batch.wait(timeout=5) == BatchProgress(
        total=3, done=3, succeeded=3, dead=0, cancelled=0
    )


async def test_batch_with_a_discarded_member_finishes(jobs: Jobs, db_url: str) -> None:
    """With no on_complete too, a deleted member counts under its outcome, and
    ``wait()`` does not raise for it; so do all of them once the whole batch is
    deleted, until retention prunes their tally."""
    member, _, _ = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(3)])
    assert await jobs.discard(batch.jobs[0].id)
    await drain(jobs)
    finished = BatchProgress(total=3, done=3, succeeded=2, dead=0, cancelled=1)
    assert await batch.progress() == finished
    assert (await batch.progress()).finished
    assert await batch.wait(timeout=5) == finished
    assert await jobs.purge(status="succeeded") == 2
    assert await batch.progress() == finished
    assert await batch.wait(timeout=5) == finished
    assert await tallies(db_url) == 2  # cancelled and succeeded


async def test_a_retried_on_complete_gets_the_counts_of_members_purged_meanwhile(
    jobs: Jobs,
) -> None:
    """An on_complete cancelled while it waited, retried by hand after every member was
    purged: it waits again, is released at once, and gets the members' counts."""
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(3)], on_complete=done.spec())
    assert batch.on_complete is not None
    assert await jobs.cancel(batch.on_complete.id)
    await drain(jobs)
    assert await jobs.purge(status="succeeded") == 3
    assert await jobs.retry(batch.on_complete.id)
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 3, "succeeded": 3, "dead": 0, "cancelled": 0}]


async def test_retention_keeps_a_batchs_counts_while_a_job_of_it_is_stored(
    jobs: Jobs, clock: FakeClock, db_url: str
) -> None:
    """Retention prunes succeeded members before a dead on_complete (kept longer): the
    batch's counts keep them until the last job of the batch is pruned too, and then
    forget the batch."""
    member, _, _ = counting_batch(jobs)

    @jobs.task(retries=0)
    async def report(**kwargs: Any) -> None:
        raise RuntimeError("the report failed")

    batch = await jobs.batch([member.spec(n) for n in range(2)], on_complete=report.spec())
    await drain(jobs)
    clock.advance(jobs.settings.retention + 1)
    assert await prune_expired(jobs) == 2
    counted = BatchProgress(total=2, done=2, succeeded=2, dead=0, cancelled=0)
    assert await batch.progress() == counted
    assert await tallies(db_url) == 1
    clock.advance(jobs.settings.dead_retention)
    assert await prune_expired(jobs) == 1
    assert await tallies(db_url) == 0
    assert await batch.progress() == BatchProgress(
        total=2, done=0, succeeded=0, dead=0, cancelled=0
    )


async def test_waiting_for_a_batch_whose_on_complete_was_discarded_waits_for_the_members(
    jobs: Jobs,
) -> None:
    member, done, seen = counting_batch(jobs)

    batch = await jobs.batch([member.spec(n) for n in range(2)], on_complete=done.spec())
    assert batch.on_complete is not None
    assert await jobs.discard(batch.on_complete.id)
    await drain(jobs)
    assert seen == []
    assert await batch.wait(timeout=5) == BatchProgress(
        total=2, done=2, succeeded=2, dead=0, cancelled=0
    )


async def test_an_on_complete_without_a_batch_parameter_gets_no_extra_argument(
    jobs: Jobs,
) -> None:
    calls: list[tuple[Any, ...]] = []

    @jobs.task
    async def member(n: int) -> None: ...

    @jobs.task
    async def done(label: str) -> None:
        calls.append((label,))

    batch = await jobs.batch([member.spec(1)], on_complete=done.spec("all sent"))
    await drain(jobs)
    assert calls == [("all sent",)]
    assert batch.on_complete is not None
    assert (await batch.on_complete.info()).status == JobStatus.SUCCEEDED


async def test_an_on_complete_named_by_a_process_without_it_gets_the_counts_if_it_takes_them(
    make_jobs: MakeJobs,
) -> None:
    """The web process enqueues by name; the worker's own definition decides."""
    worker, web = make_jobs(), make_jobs(workers=False)
    seen: list[Any] = []

    @worker.task(name="member")
    async def member(n: int) -> None: ...

    @worker.task(name="counted")
    async def counted(label: str, batch: BatchCounts) -> None:
        seen.append((label, batch["succeeded"]))

    @worker.task(name="plain")
    async def plain(label: str) -> None:
        seen.append((label,))

    for done in ("counted", "plain"):
        await web.batch(
            [JobSpec(task="member", args=(1,)), JobSpec(task="member", args=(2,))],
            on_complete=JobSpec(task=done, args=(done,)),
        )
    await web.batch([], on_complete=JobSpec(task="plain", args=("empty",)))
    await drain(worker)
    assert sorted(seen, key=str) == [("counted", 2), ("empty",), ("plain",)]


async def test_an_on_complete_with_a_delay_keeps_it_when_the_members_finish_sooner(
    jobs: Jobs, clock: FakeClock
) -> None:
    ran: list[float] = []

    @jobs.task
    async def member(n: int) -> None: ...

    @jobs.task
    async def done() -> None:
        ran.append(clock.now())

    start = clock.now()
    batch = await jobs.batch([member.spec(1)], on_complete=done.options(delay=3600).spec())
    await drain(jobs)
    assert batch.on_complete is not None
    info = await batch.on_complete.info()
    assert (info.status, ran) == (JobStatus.SCHEDULED, [])
    clock.advance(3600)
    await drain(jobs)
    assert ran == [start + 3600]


async def test_an_empty_batch_runs_on_complete_at_once_with_zero_counts(jobs: Jobs) -> None:
    seen: list[BatchCounts | None] = []

    @jobs.task
    async def done(batch: BatchCounts | None = None) -> None:
        seen.append(batch)

    batch = await jobs.batch([], on_complete=done.spec())
    await drain(jobs)
    assert seen == [{"id": batch.id, "total": 0, "succeeded": 0, "dead": 0, "cancelled": 0}]
    assert (await batch.progress()).fraction == 1.0
    assert (await jobs.batch([])).jobs == []


async def test_a_batch_without_on_complete_reports_progress(jobs: Jobs) -> None:
    @jobs.task
    async def member(n: int) -> int:
        return n * n

    batch = await jobs.batch([member.spec(n) for n in range(4)])
    assert batch.on_complete is None
    assert (await batch.progress()).done == 0
    await drain(jobs)
    assert await batch.wait(timeout=5) == BatchProgress(
        total=4, done=4, succeeded=4, dead=0, cancelled=0
    )
    assert await batch.results(timeout=5) == [0, 1, 4, 9]
    assert (await batch.wait(timeout=timedelta(seconds=5))).done == 4  # or a timedelta
    assert await batch.results(timeout=timedelta(seconds=5)) == [0, 1, 4, 9]


async def test_a_batch_waited_on_with_timeout_zero_reads_it_once(jobs: Jobs) -> None:
    """As ``job.result(timeout=0)`` and ``chain.result(timeout=0)``: a finished batch
    answers at once, an unfinished one raises TimeoutError (a poll that never blocks)."""

    @jobs.task
    async def member(n: int) -> int:
        return n * n

    @jobs.task
    async def done() -> None: ...

    batch = await jobs.batch([member.spec(n) for n in range(3)], on_complete=done.spec())
    plain = await jobs.batch([member.spec(n) for n in range(2)])
    for unfinished in (batch, plain):
        with pytest.raises(TimeoutError):
            await unfinished.wait(timeout=0)
        with pytest.raises(TimeoutError):
            await unfinished.results(timeout=timedelta(0))
    await drain(jobs)
    finished = BatchProgress(total=3, done=3, succeeded=3, dead=0, cancelled=0)
    assert await batch.wait(timeout=0) == finished
    assert await batch.wait(timeout=timedelta(0)) == finished
    assert await batch.results(timeout=0) == [0, 1, 4]
    assert (await plain.wait(timeout=-1)).done == 2
    assert await plain.results(timeout=0) == [0, 1]


async def test_on_complete_runs_once_with_two_processes_draining_one_store(
    make_jobs: MakeJobs, db_url: str
) -> None:
    calls: list[BatchCounts] = []
    instances = [make_jobs(db_url), make_jobs(db_url)]
    for jobs in instances:

        @jobs.task(name="member")
        async def member(n: int) -> None: ...

        @jobs.task(name="done")
        async def done(batch: BatchCounts | None = None) -> None:
            assert batch is not None
            calls.append(batch)

    first, second = instances
    spec = first.registry["member"].spec
    await first.batch([spec(n) for n in range(20)], on_complete=first.registry["done"].spec())
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, first)
        tg.start_soon(drain, second)
    await drain(first)
    await drain(second)
    assert len(calls) == 1
    assert calls[0]["succeeded"] == 20


@contextlib.asynccontextmanager
async def callers_transaction(db_url: str, *, commit: bool) -> AsyncIterator[Any]:
    """An app's own connection to the store's database, in an open transaction that
    commits (or rolls back) after the block."""
    if db_url.startswith("sqlite:///"):
        path = db_url.removeprefix("sqlite:///")
        async with aiosqlite.connect(path, isolation_level=None) as db:
            await db.execute("BEGIN IMMEDIATE")
            yield db
            await db.execute("COMMIT" if commit else "ROLLBACK")
        return
    conn = await asyncpg.connect(db_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        yield conn
        await (transaction.commit() if commit else transaction.rollback())
    finally:
        await conn.close()


@pytest.mark.parametrize("commit", [True, False], ids=["committed", "rolled_back"])
async def test_a_chain_and_a_batch_enqueued_in_a_callers_transaction_exist_if_it_commits(
    jobs: Jobs, db_url: str, commit: bool
) -> None:
    ran: list[int] = []

    @jobs.task
    async def step(n: int) -> int:
        ran.append(n)
        return n

    @jobs.task
    async def done(batch: BatchCounts) -> int:
        ran.append(-1)
        return batch["succeeded"]

    await jobs.list()  # the store (and its schema) open before the app's transaction
    async with callers_transaction(db_url, commit=commit) as conn, jobs.transaction(conn):
        chain = await jobs.chain(step.spec(1), step.spec(2))
        batch = await jobs.batch([step.spec(3), step.spec(4)], on_complete=done.spec())  # type: ignore[call-arg]
    await drain(jobs)
    assert batch.on_complete is not None
    if commit:
        assert await chain.result(timeout=5) == 2
        assert await batch.on_complete.result(timeout=5) == 2
        assert sorted(ran) == [-1, 1, 2, 3, 4]
        return
    assert ran == []
    assert [await jobs.get(j.id) for j in (*chain.jobs, *batch.jobs, batch.on_complete)] == [
        None
    ] * 5
    with pytest.raises(AsyncJobsError, match="no job of <Chain"):
        await chain.status()
    with pytest.raises(AsyncJobsError, match="does not exist"):
        await batch.wait(timeout=5)
    assert (await batch.progress()).done == 0


# -- results and current_job() ------------------------------------------------------


async def tallies(db_url: str) -> int:
    """How many tallies of deleted batch members the store keeps."""
    sql = "SELECT count(*) FROM asyncjobs_batch_deleted"
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
            (count,) = db.execute(sql).fetchone()
        db.close()
        return int(count)
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def corrupt_payload(db_url: str, job_id: str) -> None:
    """Damage a stored payload behind the store's back (a bad migration, a hand edit)."""
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE asyncjobs_jobs SET payload = '{not json' WHERE id = ?", (job_id,))
        db.close()
        return
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("UPDATE asyncjobs_jobs SET payload = '{not json' WHERE id = $1", job_id)
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["chain", "batch"])
async def test_a_corrupt_payload_on_a_waiting_job_sends_it_dead_and_nothing_else(
    jobs: Jobs, db_url: str, kind: str
) -> None:
    """Releasing a chain member (pass_result) or a batch's on_complete rewrites its
    payload in the transaction that writes its predecessor's outcome, with others."""

    @jobs.task
    async def step(n: int = 0) -> int:
        return n

    @jobs.task
    async def done(**kwargs: Any) -> None: ...

    if kind == "chain":
        chain = await jobs.chain(step.spec(1), step.spec(), pass_result=True)
        first, waiting = chain.jobs
    else:
        batch = await jobs.batch([step.spec(1)], on_complete=done.spec())
        assert batch.on_complete is not None
        (first,), waiting = batch.jobs, batch.on_complete
    other = await jobs.enqueue(step, 7)
    await corrupt_payload(db_url, waiting.id)
    await drain(jobs)
    assert await first.result(timeout=5) == 1
    assert await other.result(timeout=5) == 7
    info = await waiting.info()
    assert info.status == "dead"
    assert info.error is not None
    assert "cannot be decoded" in info.error


async def test_result_is_stored_as_json_and_returned(jobs: Jobs) -> None:
    @jobs.task
    async def compute() -> dict[str, Any]:
        return {"items": [1, 2.5, "three", None, True], "nested": {"ok": False}}

    job = await compute.enqueue()
    await drain(jobs)
    expected = {"items": [1, 2.5, "three", None, True], "nested": {"ok": False}}
    assert await job.result(timeout=5) == expected
    assert (await job.info()).result == expected


async def test_result_of_a_dead_job_raises_job_failed(jobs: Jobs) -> None:
    @jobs.task(retries=0)
    async def broken() -> None:
        raise ValueError("nope")

    job = await broken.enqueue()
    await drain(jobs)
    with pytest.raises(JobFailed) as failed:
        await job.result(timeout=5)
    assert failed.value.status == JobStatus.DEAD


async def test_waiting_for_a_result_is_woken_by_the_finish_not_by_polling(jobs: Jobs) -> None:
    """A waiter that has backed off to a long poll still returns as soon as the job ends."""

    @jobs.task
    async def slow(n: int) -> int:
        return n + 1

    job = await slow.enqueue(41)
    returned_at: list[float] = []

    async def wait() -> None:
        assert await job.result(timeout=10) == 42
        returned_at.append(anyio.current_time())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            # Let the waiter back off (its polls are now ~0.64 s apart); real time passes.
            with pytest.raises(TimeoutError):
                await (await jobs.enqueue("elsewhere.task")).result(timeout=0.65)
            await drain(jobs)
            finished_at = anyio.current_time()
    assert returned_at
    assert returned_at[0] - finished_at < 0.3


async def test_waiting_for_a_result_backs_off_instead_of_busy_polling(jobs: Jobs) -> None:
    """A job nobody runs: a 0.3 s wait reads the store a handful of times, not hundreds."""
    gets = 0
    real_get = jobs.store.get

    async def counting_get(job_id: str) -> Any:
        nonlocal gets
        gets += 1
        return await real_get(job_id)

    jobs.store.get = counting_get  # type: ignore[method-assign]
    job: Job[Any] = await jobs.enqueue("elsewhere.task")
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.3)
    assert 1 <= gets <= 10


async def test_current_job_tells_a_task_about_its_own_job(jobs: Jobs) -> None:
    seen: list[tuple[str, int, str | None, str, int]] = []

    @jobs.task(retries=2)
    async def charge(order: int) -> None:
        ctx = current_job()
        seen.append((ctx.id, ctx.attempt, ctx.idempotency_key, ctx.task, ctx.max_attempts))
        if ctx.attempt == 1:
            raise Retry(delay=0)

    job = await charge.options(idempotency_key="charge:9").enqueue(9)
    await drain(jobs)
    await drain(jobs)
    assert seen == [
        (job.id, 1, "charge:9", charge.name, 3),
        (job.id, 2, "charge:9", charge.name, 3),
    ]
    with pytest.raises(LookupError, match="inside a running job"):
        current_job()


async def test_progress_set_by_a_task_shows_in_job_info(jobs: Jobs) -> None:
    during: list[tuple[float | None, str | None]] = []

    @jobs.task
    async def encode() -> None:
        ctx = current_job()
        await ctx.set_progress(0.4, "encoding")
        info = await jobs.get(ctx.id)
        assert info is not None
        during.append((info.progress, info.progress_message))
        await ctx.set_progress(1.0)

    job = await encode.enqueue()
    await drain(jobs)
    assert during == [(0.4, "encoding")]
    info = await job.info()
    assert (info.progress, info.progress_message) == (1.0, None)
    with pytest.raises(ValueError, match=r"between 0\.0 and 1\.0"):
        await current_job_progress(jobs, 1.5)


async def test_a_progress_of_minus_zero_reads_as_zero_on_every_store(jobs: Jobs) -> None:
    """-0.0 passes the range check (it equals 0.0). SQLite stored it as 0.0 and
    PostgreSQL kept the sign, so the dashboard showed "-0%" on one store alone."""
    await current_job_progress(jobs, -0.0)
    (info,) = await jobs.list(task="progress--0.0")
    assert info.progress == 0.0
    assert str(info.progress) == "0.0"


async def current_job_progress(jobs: Jobs, value: float) -> None:
    """Run a task that sets ``value`` as its progress and re-raise what it raised."""
    errors: list[BaseException] = []

    @jobs.task(name=f"progress-{value}", retries=0)
    async def bad() -> None:
        try:
            await current_job().set_progress(value)
        except ValueError as error:
            errors.append(error)

    await bad.enqueue()
    await drain(jobs)
    if errors:
        raise errors[0]
