"""Logging: one record per job transition, with ids and timing in ``extra``, never the arguments."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import pytest

from asyncjobs import Jobs, JobStatus, current_job
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.testing import FakeClock, drain

SECRET = "hunter2-secret-token"


def job_records(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "job_id", None) == job_id]


async def test_one_record_per_transition_with_extra_fields(
    make_jobs: Callable[..., Jobs], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = make_jobs(concurrency=1)  # one at a time: each run takes exactly its 1.5 s

    @jobs.task(name="charge", retries=1)
    async def charge(token: str, fail: bool) -> str:
        clock.advance(1.5)
        if fail:
            raise RuntimeError("card declined")
        return "ok"

    caplog.set_level(logging.DEBUG, logger="asyncjobs")
    good = await jobs.enqueue(charge, SECRET, fail=False)
    bad = await jobs.enqueue(charge, SECRET, fail=True)
    await drain(jobs)  # good succeeds; bad fails its first attempt
    clock.advance(3600)
    await drain(jobs)  # bad fails again: dead

    good_records = job_records(caplog, good.id)
    assert [(r.levelname, getattr(r, "outcome", "started")) for r in good_records] == [
        ("DEBUG", "started"), ("INFO", "succeeded"),
    ]  # fmt: skip
    done = good_records[-1]
    assert (done.task, done.attempt) == ("charge", 1)  # type: ignore[attr-defined]
    assert done.duration == pytest.approx(1.5)  # type: ignore[attr-defined]

    bad_transitions = [
        (r.levelname, r.outcome, r.attempt)  # type: ignore[attr-defined]
        for r in job_records(caplog, bad.id)
        if hasattr(r, "outcome")
    ]
    assert bad_transitions == [("WARNING", "retry", 1), ("ERROR", "dead", 2)]

    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert SECRET not in record.getMessage()
            assert SECRET not in repr(vars(record))


async def test_a_stuck_job_recovered_by_lease_expiry_is_logged(
    jobs: Jobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @jobs.task(name="slow", retries=2)
    async def slow() -> None: ...

    job = await jobs.enqueue(slow)
    request = ClaimRequest(
        worker="crashed", tasks={"slow": TaskLimits(max_attempts=3)}, queues=None, limit=1, lease=5
    )
    await jobs.store.claim(request, now=clock.now())
    assert (await jobs.stats())["totals"]["stuck"] == 0
    clock.advance(6)
    assert (await jobs.stats())["totals"]["stuck"] == 1  # counted while its lease is expired
    caplog.set_level(logging.INFO, logger="asyncjobs")
    await jobs.runner.recover()
    (record,) = job_records(caplog, job.id)
    assert record.levelname == "WARNING"
    assert "lease expired" in record.getMessage()
    assert (record.task, record.attempt) == ("slow", 1)  # type: ignore[attr-defined]
    assert (await jobs.stats())["totals"]["stuck"] == 0
    assert (await jobs.stats())["totals"]["counts"]["queued"] == 1


async def test_actions_on_jobs_are_logged(jobs: Jobs, caplog: pytest.LogCaptureFixture) -> None:
    @jobs.task(name="flaky", retries=0)
    async def flaky() -> None:
        raise RuntimeError("down")

    caplog.set_level(logging.INFO, logger="asyncjobs")
    queued = await jobs.enqueue(flaky.options(delay=60))
    dead, other = await jobs.enqueue(flaky), await jobs.enqueue(flaky)
    await drain(jobs)
    assert await jobs.cancel(queued.id)
    assert await jobs.retry(dead.id)
    assert await jobs.discard(queued.id)
    assert await jobs.retry_dead(task="flaky") == 1  # the other one

    def actions(job_id: str) -> list[str]:
        return [r.action for r in job_records(caplog, job_id) if hasattr(r, "action")]

    assert actions(queued.id) == ["cancel", "discard"]
    assert actions(dead.id) == ["retry"]
    assert actions(other.id) == []
    (bulk,) = [r for r in caplog.records if getattr(r, "action", None) == "retry_dead"]
    assert "1 dead job(s) retried" in bulk.getMessage()


async def test_a_purge_is_logged_with_what_it_deleted(
    jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    """jobs.purge() (and the CLI's purge) deleted jobs, queued ones too, without a record,
    where discard, retry_dead and retention's pruning each leave one."""

    @jobs.task(name="later")
    async def later() -> None: ...

    caplog.set_level(logging.INFO, logger="asyncjobs")
    await jobs.enqueue(later.options(delay=60))
    await jobs.enqueue(later.options(delay=60))
    assert await jobs.purge(status="scheduled") == 2
    assert await jobs.purge(status="dead") == 0
    (record,) = [r for r in caplog.records if getattr(r, "action", None) == "purge"]
    assert "2 job(s) purged" in record.getMessage()
    fields = [getattr(record, name) for name in ("status", "older_than", "count")]
    assert fields == ["scheduled", None, 2]


async def test_a_failure_the_store_turns_into_cancelled_is_logged_as_cancelled(
    make_jobs: Callable[..., Jobs],
    backend_url: str,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelled from another process after this worker's last heartbeat, a job that
    then fails is not retried: the log says cancelled, not retrying."""
    jobs = make_jobs(backend_url)

    @jobs.task(name="flaky", retries=3)
    async def flaky() -> None:
        job_id = current_job().id
        await jobs.store.cancel([job_id], now=clock.now())  # as another process would
        raise RuntimeError("down")

    caplog.set_level(logging.INFO, logger="asyncjobs")
    job = await jobs.enqueue(flaky)
    await drain(jobs)
    assert (await job.info()).status == JobStatus.CANCELLED
    (record,) = job_records(caplog, job.id)
    assert record.outcome == "cancelled"  # type: ignore[attr-defined]
    assert "retrying" not in record.getMessage()


async def test_a_job_cut_off_by_shutdown_is_logged_as_released(
    make_jobs: Callable[..., Jobs], caplog: pytest.LogCaptureFixture
) -> None:
    jobs = make_jobs(shutdown_timeout=0)
    started = anyio.Event()

    @jobs.task(name="stuck")
    async def stuck() -> None:
        started.set()
        await anyio.Event().wait()

    caplog.set_level(logging.INFO, logger="asyncjobs")
    job = await stuck.enqueue()
    await jobs.start()
    with anyio.fail_after(5):
        await started.wait()
        await jobs.stop()
    [record] = job_records(caplog, job.id)
    assert record.outcome == "release"  # type: ignore[attr-defined]
    assert record.getMessage() == (
        f"job {job.id} (stuck) released by shutdown: it runs again, no attempt spent"
    )
    assert (await job.info()).status == JobStatus.QUEUED


async def test_a_failures_logged_line_is_cut_short_where_its_message_is_huge(
    jobs: Jobs, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure's log line carried its exception's last line whole: 140,000 characters
    of one message (a response body in an error) in each record. The stored error keeps
    it (up to its own cap); the log line says how much it cut."""

    @jobs.task(name="upload", retries=1)
    async def upload() -> None:
        raise RuntimeError("bad response: " + "x" * 140_000)

    caplog.set_level(logging.INFO, logger="asyncjobs")
    job = await jobs.enqueue(upload)
    await drain(jobs)  # a retry
    clock.advance(3600)
    await drain(jobs)  # dead
    retry, dead = (r for r in job_records(caplog, job.id) if r.levelno >= logging.WARNING)
    for record in (retry, dead):
        line = record.getMessage()
        assert len(line) < 1_200, len(line)
        assert line.endswith(" characters cut]"), line[-100:]
    info = await jobs.get(job.id)
    assert info is not None
    assert info.error is not None
    assert len(info.error) > 60_000  # the stored error keeps more than the log line
