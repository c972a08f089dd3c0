"""Writes that free a group (or a concurrency slot) without enqueueing anything wake
the runners, as an enqueue does: another process's through its NOTIFY, this process's
own at once. Each worker here has a clock that never moves and a long poll interval,
so it claims again only when woken."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

from asyncjobs import Jobs, JobSpec
from asyncjobs.stores import ClaimRequest, JobRow, Outcome, OutcomeKind, TaskLimits
from asyncjobs.stores._postgres_sql import SELECT_CHANNEL
from asyncjobs.testing import FakeClock

HEAD: JobSpec[Any] = JobSpec(task="step", args=(1,)).with_options(group="g", delay=3600)
NEXT: JobSpec[Any] = JobSpec(task="step", args=(2,)).with_options(group="g")
CRASHED: JobSpec[Any] = JobSpec(task="step", args=(1,)).with_options(group="g")
ONE: JobSpec[Any] = JobSpec(task="step", args=(1,))
TWO: JobSpec[Any] = JobSpec(task="step", args=(2,))


@asynccontextmanager
async def idle_workers(url: str, clock: FakeClock | None = None) -> AsyncIterator[Jobs]:
    """Workers that have claimed since everything enqueued so far was stored, and are
    now idle: what they did not take was not claimable then."""
    workers = Jobs(url, clock=clock or FakeClock(), poll_interval=600)
    probe = Jobs(url, workers=False)

    @workers.task(name="step")
    async def step(n: int) -> int:
        return n

    try:
        async with workers:
            job = await probe.enqueue("step", 0)  # heard: a claim after the others
            with anyio.fail_after(10):
                assert await job.result() == 0
            yield workers
    finally:
        await probe.close()


async def _cancel(jobs: Jobs, job_id: str) -> None:
    assert await jobs.cancel(job_id)


async def _discard(jobs: Jobs, job_id: str) -> None:
    assert await jobs.discard(job_id)


async def _purge(jobs: Jobs, job_id: str) -> None:
    assert await jobs.purge(status="scheduled") == 1


ENDS = [_cancel, _discard, _purge]


@pytest.mark.parametrize("end", ENDS, ids=["cancel", "discard", "purge"])
async def test_ending_a_waiting_group_head_elsewhere_wakes_the_workers(
    postgres_url: str, end: Callable[[Jobs, str], Awaitable[None]]
) -> None:
    web = Jobs(postgres_url, workers=False)
    try:
        head = await web.enqueue(HEAD)
        after = await web.enqueue(NEXT)
        async with idle_workers(postgres_url):
            assert (await web.get(after.id)).status == "queued"  # type: ignore[union-attr]
            await end(web, head.id)
            with anyio.fail_after(10):
                assert await after.result() == 2
    finally:
        await web.close()


@pytest.mark.parametrize("end", ENDS, ids=["cancel", "discard", "purge"])
async def test_ending_a_waiting_group_head_in_the_workers_process_wakes_them(
    postgres_url: str, end: Callable[[Jobs, str], Awaitable[None]]
) -> None:
    web = Jobs(postgres_url, workers=False)
    try:
        head = await web.enqueue(HEAD)
        after = await web.enqueue(NEXT)
        async with idle_workers(postgres_url) as workers:
            await end(workers, head.id)
            with anyio.fail_after(10):
                assert await after.result() == 2
    finally:
        await web.close()


async def _crashed_run(url: str, job_id: str, lease_until: float, *, cancel: bool) -> None:
    """``job_id`` as a worker that crashed left it: running on its last attempt."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE asyncjobs_jobs SET status = 'running', attempts = max_attempts, "
            "worker = 'crashed', started_at = $2 - 1, lease_until = $2, "
            "cancel_requested_at = CASE WHEN $3 THEN $2 - 1 END WHERE id = $1",
            job_id,
            lease_until,
            cancel,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("cancel", [False, True], ids=["dead", "cancelled"])
async def test_lease_recovery_that_ends_a_group_job_elsewhere_wakes_the_workers(
    postgres_url: str, cancel: bool
) -> None:
    web = Jobs(postgres_url, workers=False)
    clock = FakeClock()
    try:
        crashed = await web.enqueue(CRASHED)
        # Expiring long after the workers' clock: their own recovery leaves it.
        await _crashed_run(postgres_url, crashed.id, clock.now() + 10**6, cancel=cancel)
        after = await web.enqueue(NEXT)
        async with idle_workers(postgres_url, clock):
            recovered = await web.store.recover(now=clock.now() + 2 * 10**6)
            assert [r.status for r in recovered] == ["cancelled" if cancel else "dead"]
            with anyio.fail_after(10):
                assert await after.result() == 2
    finally:
        await web.close()


@pytest.mark.parametrize("cancel", [False, True], ids=["dead", "cancelled"])
async def test_lease_recovery_in_the_workers_process_that_ends_a_group_job_wakes_them(
    postgres_url: str, cancel: bool
) -> None:
    web = Jobs(postgres_url, workers=False)
    clock = FakeClock()
    try:
        crashed = await web.enqueue(CRASHED)
        await _crashed_run(postgres_url, crashed.id, clock.now() + 100, cancel=cancel)
        after = await web.enqueue(NEXT)
        async with idle_workers(postgres_url, clock):
            clock.advance(200)  # the maintenance loop's next recovery (every 30 s)
            with anyio.fail_after(10):
                assert await after.result() == 2
    finally:
        await web.close()


# -- finishing a job elsewhere: what it frees wakes the workers -----------------------


def _request(worker: str, *, concurrency: int | None = None) -> ClaimRequest:
    limits = TaskLimits(max_attempts=3, concurrency=concurrency)
    return ClaimRequest(worker=worker, tasks={"step": limits}, queues=None, limit=1, lease=600)


async def _finish(jobs: Jobs, row: JobRow, kind: OutcomeKind) -> None:
    outcome = Outcome(job_id=row.id, worker=row.worker or "", attempt=row.attempts, kind=kind)
    assert await jobs.store.finish([outcome], now=FakeClock().now()) == [row.id]


@pytest.mark.parametrize("kind", [OutcomeKind.SUCCEEDED, OutcomeKind.DEAD, OutcomeKind.CANCELLED])
async def test_a_group_job_ending_elsewhere_wakes_the_workers_for_the_next(
    postgres_url: str, kind: OutcomeKind
) -> None:
    """Another process (here a store's own claim and finish, as a worker's at capacity
    writes its outcomes) runs the group's head; its end frees the next job."""
    web = Jobs(postgres_url, workers=False)
    try:
        await web.enqueue(ONE.with_options(group="g"))
        after = await web.enqueue(NEXT)
        [head] = await web.store.claim(_request("elsewhere"), now=FakeClock().now())
        async with idle_workers(postgres_url):
            assert (await web.get(after.id)).status == "queued"  # type: ignore[union-attr]
            await _finish(web, head, kind)
            with anyio.fail_after(10):
                assert await after.result() == 2
    finally:
        await web.close()


async def test_a_job_given_back_elsewhere_wakes_the_workers(postgres_url: str) -> None:
    web = Jobs(postgres_url, workers=False)
    try:
        job = await web.enqueue(TWO)
        [row] = await web.store.claim(_request("elsewhere"), now=FakeClock().now())
        async with idle_workers(postgres_url):
            await _finish(web, row, OutcomeKind.RELEASE)
            with anyio.fail_after(10):
                assert await job.result() == 2
    finally:
        await web.close()


async def test_a_job_under_a_concurrency_limit_ending_elsewhere_wakes_the_workers(
    postgres_url: str,
) -> None:
    """The slot it held is free: the job waiting for it runs."""
    web = Jobs(postgres_url, workers=False)
    workers = Jobs(postgres_url, clock=FakeClock(), poll_interval=600)

    @workers.task(name="step", concurrency=1)
    async def step(n: int) -> int:
        return n

    @workers.task(name="probe")
    async def probe() -> None:
        pass

    try:
        await web.enqueue(ONE)
        waiting = await web.enqueue(TWO)
        request = _request("elsewhere", concurrency=1)
        [first] = await web.store.claim(request, now=FakeClock().now())
        async with workers:
            heard = await web.enqueue("probe")  # a claim after the others were stored
            with anyio.fail_after(10):
                await heard.result()
            assert (await web.get(waiting.id)).status == "queued"  # type: ignore[union-attr]
            await _finish(web, first, OutcomeKind.SUCCEEDED)
            with anyio.fail_after(10):
                assert await waiting.result() == 2
    finally:
        await workers.close()
        await web.close()


@pytest.mark.parametrize(
    ("specs", "kind"),
    [
        ([ONE], OutcomeKind.SUCCEEDED),  # nothing waits on it
        ([ONE.with_options(group="g")], OutcomeKind.DEAD),  # the last of its group
        ([ONE.with_options(group="g"), NEXT], OutcomeKind.RETRY),  # its group still waits
    ],
    ids=["plain", "last-of-group", "group-retry"],
)
async def test_a_finish_that_frees_nothing_sends_no_notification(
    postgres_url: str, specs: list[JobSpec[Any]], kind: OutcomeKind
) -> None:
    web = Jobs(postgres_url, workers=False)
    heard: list[str] = []
    probed = anyio.Event()

    def on_notify(conn: object, pid: int, channel: str, payload: object) -> None:
        heard.append(str(payload))
        if payload == "probe":
            probed.set()

    listener = await asyncpg.connect(postgres_url)
    try:
        for spec in specs:
            await web.enqueue(spec)
        channel = await listener.fetchval(SELECT_CHANNEL)
        await listener.add_listener(channel, on_notify)
        [row] = await web.store.claim(_request("elsewhere"), now=FakeClock().now())
        outcome = Outcome(
            job_id=row.id, worker="elsewhere", attempt=1, kind=kind, run_at=FakeClock().now()
        )
        assert await web.store.finish([outcome], now=FakeClock().now()) == [row.id]
        # Delivered in the order of their commits: the probe after any of the finish's.
        await listener.execute("SELECT pg_notify($1, 'probe')", channel)
        with anyio.fail_after(10):
            await probed.wait()
        assert heard == ["probe"]
    finally:
        await listener.close()
        await web.close()
