"""Text a job's run produces (an exception's traceback, a progress message) and the
keys computed from its arguments, on every backend (``db_url`` is overridden).

PostgreSQL refuses NUL in text, and neither driver encodes a lone surrogate: a job
whose exception held either must still end visible, with the rest of its batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asyncjobs import ConfigurationError, Jobs, current_job
from asyncjobs.testing import drain

MakeJobs = Callable[..., Jobs]

ODD = "a\x00b\ud800c"  # a NUL and a lone surrogate


@pytest.fixture
def db_url(backend_url: str) -> str:
    return backend_url


async def test_a_job_whose_exception_holds_a_nul_or_lone_surrogate_ends_dead_readably(
    jobs: Jobs,
) -> None:
    @jobs.task(name="parse", retries=0)
    async def parse(data: str) -> None:
        raise ValueError("bad record: " + data)

    @jobs.task(name="fine")
    async def fine() -> int:
        return 1

    bad = await jobs.enqueue(parse, ODD)  # the argument itself is JSON: escaped
    good = await jobs.enqueue(fine)
    await drain(jobs)  # one write of both outcomes
    info = await jobs.get(bad.id)
    assert info is not None
    assert info.status == "dead"
    assert info.error is not None
    assert "ValueError: bad record: a\\x00b\\ud800c" in info.error
    assert await good.result(timeout=5) == 1
    # The next job runs too: nothing is left to fail every later write.
    later = await jobs.enqueue(fine)
    await drain(jobs)
    assert await later.result(timeout=5) == 1


async def test_a_progress_message_with_a_nul_or_lone_surrogate_is_stored_escaped(
    jobs: Jobs,
) -> None:
    @jobs.task(name="step")
    async def step() -> None:
        await current_job().set_progress(0.5, ODD)

    job = await jobs.enqueue(step)
    await drain(jobs)
    info = await jobs.get(job.id)
    assert info is not None
    assert (info.status, info.progress, info.progress_message) == (
        "succeeded",
        0.5,
        "a\\x00b\\ud800c",
    )


async def test_a_limiter_key_with_a_nul_is_refused_at_enqueue(jobs: Jobs) -> None:
    jobs.limiter("per-customer", "10/s", key=lambda customer: customer)

    @jobs.task(name="bill", limiter="per-customer")
    async def bill(customer: str) -> None: ...

    with pytest.raises(ConfigurationError, match="per-customer"):
        await jobs.enqueue(bill, "acme\x00")
    assert await jobs.list() == []


async def test_a_limiter_key_too_long_to_index_is_refused_and_blocks_no_claim(
    make_jobs: MakeJobs, db_url: str
) -> None:
    """PostgreSQL refuses an index entry of a bucket over about 2,700 bytes: a job with
    such a key made every claim of the store fail, other tasks' jobs too. Refused at
    enqueue where the task is defined; enqueued by name, it takes the shared bucket."""
    producer, worker = make_jobs(db_url, workers=False), make_jobs(db_url)
    worker.limiter("per-customer", "10/s", key=lambda customer: customer)

    @worker.task(name="bill", limiter="per-customer")
    async def bill(customer: str) -> int:
        return len(customer)

    @worker.task(name="other")
    async def other() -> str:
        return "ran"

    long_key = "".join(f"{n:x}" for n in range(1000))  # 2,890 bytes that do not compress
    by_name = await producer.enqueue("bill", long_key)
    unrelated = await worker.enqueue(other)
    await drain(worker)
    assert await unrelated.result(timeout=5) == "ran"
    assert await by_name.result(timeout=5) == len(long_key)
    with pytest.raises(ConfigurationError, match=r"'per-customer'.*at most 1000 bytes"):
        await worker.enqueue(bill, long_key)
    assert len(await worker.list()) == 2
    fits = await worker.enqueue(bill, "é" * 500)  # 1,000 bytes
    await drain(worker)
    assert await fits.result(timeout=5) == 500
