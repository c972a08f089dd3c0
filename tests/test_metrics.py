"""Prometheus metrics (``jobs.metrics_app()``) on a known mix of jobs."""

from __future__ import annotations

import builtins
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncjobs import ConfigurationError, Jobs
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(jobs: Jobs, accept: str = "text/plain") -> httpx.Response:
    transport = httpx.ASGITransport(app=jobs.metrics_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/metrics", headers={"accept": accept})


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def test_metrics_on_a_known_mix(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(concurrency=1)

    @jobs.task(name="work")
    async def work() -> None:
        clock.advance(3)  # each run takes 3 s

    @jobs.task(name="boom", queue="email", retries=0)
    async def boom() -> None:
        raise RuntimeError("no")

    for _ in range(2):
        await jobs.enqueue(work)
    await jobs.enqueue(boom)
    await jobs.enqueue(boom)
    await drain(jobs)
    await jobs.enqueue(work)  # queued
    await jobs.enqueue(boom)  # claimed by a worker that then vanishes: stuck
    request = ClaimRequest(
        worker="ghost", tasks={"boom": TaskLimits(max_attempts=1)}, queues=None, limit=1, lease=1
    )
    assert len(await jobs.store.claim(request, now=clock.now())) == 1
    clock.advance(20)

    response = await scrape(jobs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    work_labels = {"queue": "default", "task": "work"}
    boom_labels = {"queue": "email", "task": "boom"}
    assert value(found, "asyncjobs_jobs", **work_labels, status="succeeded") == 2
    assert value(found, "asyncjobs_jobs", **work_labels, status="queued") == 1
    assert value(found, "asyncjobs_jobs", **boom_labels, status="dead") == 2
    assert value(found, "asyncjobs_jobs", **boom_labels, status="running") == 1
    assert value(found, "asyncjobs_dead_jobs", **boom_labels) == 2
    assert value(found, "asyncjobs_stuck_jobs", **boom_labels) == 1
    assert value(found, "asyncjobs_stuck_jobs", **work_labels) == 0
    assert value(found, "asyncjobs_oldest_queued_age_seconds", **work_labels) == 20
    assert value(found, "asyncjobs_finished_jobs", **work_labels, outcome="succeeded",
                 window="1m") == 2  # fmt: skip
    assert value(found, "asyncjobs_finished_jobs", **boom_labels, outcome="dead",
                 window="5m") == 2  # fmt: skip
    # Run times of 3 s fall in the 5 s bucket, not the 2.5 s one.
    run = "asyncjobs_job_run_seconds_bucket"
    assert value(found, run, **work_labels, le="2.5") == 0
    assert value(found, run, **work_labels, le="5.0") == 2
    assert value(found, run, **work_labels, le="+Inf") == 2
    assert value(found, "asyncjobs_job_run_seconds_gsum", **work_labels) == pytest.approx(6)
    # The second work job waited for the first to run (3 s) once due.
    wait = "asyncjobs_job_wait_seconds_bucket"
    assert value(found, wait, **work_labels, le="0.01") == 1
    assert value(found, wait, **work_labels, le="5.0") == 2


async def test_every_process_on_a_store_serves_the_same_numbers(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    one = make_jobs()

    @one.task(name="work")
    async def work() -> None: ...

    await one.enqueue(work)
    await drain(one)
    other = make_jobs(workers=False)  # another process: never ran a job itself
    found = samples((await scrape(other)).text)
    assert value(found, "asyncjobs_jobs", queue="default", task="work", status="succeeded") == 1


async def test_workers_are_counted(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs()
    await jobs.runner.record_beat()
    found = samples((await scrape(jobs)).text)
    assert value(found, "asyncjobs_workers", state="alive") == 1
    clock.advance(120)
    found = samples((await scrape(jobs)).text)
    assert value(found, "asyncjobs_workers", state="alive") == 0
    assert value(found, "asyncjobs_workers", state="gone") == 1
    assert value(found, "asyncjobs_worker_last_seen_age_seconds",
                 worker=jobs.runner.worker_id) == 120  # fmt: skip


async def test_openmetrics_is_served_when_asked(jobs: Jobs) -> None:
    response = await scrape(jobs, accept="application/openmetrics-text; version=1.0.0")
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


async def test_only_get_and_head(jobs: Jobs) -> None:
    transport = httpx.ASGITransport(app=jobs.metrics_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/metrics")).status_code == 405
        head = await client.head("/metrics")
        assert head.status_code == 200
        assert head.content == b""


async def test_a_store_failure_answers_503(jobs: Jobs) -> None:
    await jobs.store.open()

    async def broken(**kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    jobs.store.snapshot = broken  # type: ignore[assignment,method-assign]
    response = await scrape(jobs)
    assert response.status_code == 503


def test_missing_prometheus_client_names_the_extra(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigurationError, match=r"asyncjobs\[metrics\]"):
        jobs.metrics_app()


async def test_head_sends_the_content_length_a_get_would_have(jobs: Jobs) -> None:
    """RFC 9110: a HEAD response's Content-Length, when sent, is that of the GET's body
    (not 0, which says the exposition is empty)."""
    transport = httpx.ASGITransport(app=jobs.metrics_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        get = await client.get("/metrics")
        head = await client.head("/metrics")
    assert head.status_code == 200
    assert head.content == b""
    assert int(get.headers["content-length"]) == len(get.content) > 0
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == get.headers["content-type"]
