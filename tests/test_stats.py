"""``jobs.stats()`` on a known mix of jobs, with a fake clock."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import counting_steps

from asyncjobs import Jobs
from asyncjobs._stats import build, human_duration, percentile, timing
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._ops_rows import FinishedSample, OpsSnapshot
from asyncjobs.stores._sqlite_admin import _snapshot
from asyncjobs.stores._sqlite_schema import migrate
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]


async def make_mix(jobs: Jobs, clock: FakeClock) -> None:
    """Default queue: 3 succeeded (2 s each, waited 10 s), 2 queued, 1 scheduled.
    Email queue: 1 dead, 1 cancelled, 1 stuck (running, lease expired)."""

    @jobs.task(name="work")
    async def work(n: int) -> int:
        clock.advance(2)
        return n

    @jobs.task(name="boom", queue="email", retries=0)
    async def boom() -> None:
        raise RuntimeError("no")

    for n in range(3):
        await jobs.enqueue(work, n)
    await jobs.enqueue(boom)
    clock.advance(10)
    await drain(jobs)  # one at a time: 3 succeed, each takes 2 s; boom dies

    cancelled = await jobs.enqueue(boom)
    await cancelled.cancel()
    stuck = await jobs.enqueue(boom)
    request = ClaimRequest(
        worker="ghost:1:dead", tasks={"boom": TaskLimits(max_attempts=1)}, queues=None,
        limit=1, lease=5,
    )  # fmt: skip
    (claimed,) = await jobs.store.claim(request, now=clock.now())
    assert claimed.id == stuck.id

    await jobs.enqueue(work.options(delay=3600), 9)
    clock.advance(30)
    await jobs.enqueue(work, 1)
    await jobs.enqueue(work, 2)


async def test_stats_on_a_known_mix(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(concurrency=1)  # one job at a time: each takes its own 2 s
    await make_mix(jobs, clock)
    stats = await jobs.stats()
    json.dumps(stats)  # JSON-shaped all the way down

    totals = stats["totals"]
    assert totals["counts"] == {
        "waiting": 0, "scheduled": 1, "queued": 2, "running": 1,
        "succeeded": 3, "dead": 1, "cancelled": 1,
    }  # fmt: skip
    assert [q["queue"] for q in stats["queues"]] == ["default", "email"]
    default, email = stats["queues"]
    assert default["counts"]["succeeded"] == 3
    assert default["counts"]["queued"] == 2
    assert default["oldest_queued_age"] == 0.0  # both queued jobs were just enqueued
    assert email["counts"]["dead"] == 1
    assert email["counts"]["cancelled"] == 1
    assert [t["task"] for t in default["tasks"]] == ["work"]
    assert email["tasks"][0]["task"] == "boom"

    # Timings of the newest finished jobs: 3 runs of 2 s (boom ran 0 s); waits 10 to 14 s.
    run = default["run_time"]
    assert run["count"] == 3
    assert run["p50"] == pytest.approx(2.0)
    assert run["max"] == pytest.approx(2.0)
    wait = default["wait_time"]
    assert wait["count"] == 3
    assert wait["p50"] == pytest.approx(12.0)
    assert wait["max"] == pytest.approx(14.0)
    assert totals["run_time"]["count"] == 4  # cancelled jobs have no run time

    # Everything finished 30 to 34 s ago: inside both windows.
    one_minute = totals["windows"]["1m"]
    assert (one_minute["succeeded"], one_minute["dead"], one_minute["cancelled"]) == (3, 1, 1)
    assert one_minute["failure_rate"] == pytest.approx(0.25)
    assert one_minute["throughput"] == pytest.approx(4 / 60, rel=1e-4)

    # The stuck job's lease (5 s) expired 30 s ago; nobody recovered it yet.
    assert totals["stuck"] == 1
    assert email["stuck"] == 1
    assert [s["task"] for s in stats["stuck_jobs"]] == ["boom"]
    assert stats["stuck_jobs"][0]["worker"] == "ghost:1:dead"


async def test_windows_slide_and_queued_age_grows(make_jobs: MakeJobs, clock: FakeClock) -> None:
    jobs = make_jobs(concurrency=1)
    await make_mix(jobs, clock)
    clock.advance(60)  # finished jobs are now 90 to 94 s old
    stats = await jobs.stats()
    windows = stats["totals"]["windows"]
    assert windows["1m"]["succeeded"] == 0
    assert windows["1m"]["failure_rate"] is None
    assert windows["5m"]["succeeded"] == 3
    assert windows["5m"]["dead"] == 1
    assert stats["queues"][0]["oldest_queued_age"] == pytest.approx(60.0)
    clock.advance(3600)  # the delayed job is due now
    stats = await jobs.stats()
    assert stats["totals"]["counts"]["scheduled"] == 0
    assert stats["totals"]["counts"]["queued"] == 3
    assert stats["totals"]["windows"]["5m"]["succeeded"] == 0


async def test_a_job_given_a_past_run_at_waits_from_its_enqueue(
    make_jobs: MakeJobs, clock: FakeClock, backend_url: str
) -> None:
    """A run_at in the past is kept as given, but the job has waited only since it was
    enqueued: the queue's oldest age and the job's wait time count from then."""
    jobs = make_jobs(backend_url, workers=False)

    @jobs.task(name="work")
    async def work() -> None: ...

    await jobs.enqueue(work.options(run_at=clock.datetime() - timedelta(hours=1)))
    clock.advance(5)
    stats = await jobs.stats()
    assert stats["totals"]["counts"]["queued"] == 1
    assert stats["totals"]["oldest_queued_age"] == pytest.approx(5.0)
    await drain(jobs)
    wait = (await jobs.stats())["totals"]["wait_time"]
    assert wait["count"] == 1
    assert wait["max"] == pytest.approx(5.0)


async def test_stats_of_an_empty_store(jobs: Jobs) -> None:
    stats = await jobs.stats()
    assert stats["queues"] == []
    assert set(stats["totals"]["counts"].values()) == {0}
    assert stats["totals"]["run_time"] == {
        "count": 0, "p50": None, "p90": None, "p99": None, "max": None,
    }  # fmt: skip
    assert stats["workers"] == []


async def test_workers_appear_with_their_heartbeat_and_stop(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs(concurrency=3, visibility_timeout=30)

    @jobs.task
    async def noop() -> None: ...

    async with jobs:
        (worker,) = (await jobs.stats())["workers"]
        assert worker["id"] == jobs.runner.worker_id
        assert worker["alive"] is True
        assert worker["concurrency"] == 3
        assert worker["stopped_at"] is None
        clock.advance(25)  # two heartbeat intervals (10 s): last_seen follows
        with anyio.fail_after(5):
            while (await jobs.stats())["workers"][0]["seconds_since_seen"] > 5:
                await anyio.lowlevel.checkpoint()
    (worker,) = (await jobs.stats())["workers"]
    assert worker["alive"] is False
    assert worker["stopped_at"] is not None


async def test_a_worker_that_stopped_heartbeating_is_not_alive(
    jobs: Jobs, clock: FakeClock
) -> None:
    await jobs.runner.record_beat()
    clock.advance(61)  # longer than visibility_timeout (60 s)
    (worker,) = (await jobs.stats())["workers"]
    assert worker["alive"] is False
    assert worker["stopped_at"] is None
    assert worker["seconds_since_seen"] == pytest.approx(61)
    clock.advance(3600)  # not seen for over an hour: left out
    assert (await jobs.stats())["workers"] == []


async def test_a_worker_is_judged_alive_by_its_own_visibility_timeout(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """A worker with a long visibility timeout heartbeats every third of it. A process
    with a shorter one (a dashboard, the CLI) showed it dead between its heartbeats."""
    worker = make_jobs(visibility_timeout=600)  # heartbeats every 200 s
    observer = make_jobs(visibility_timeout=30)
    await worker.runner.record_beat()
    clock.advance(150)  # within the worker's heartbeat interval
    assert [w["alive"] for w in (await observer.stats())["workers"]] == [True]
    clock.advance(451)  # past its own visibility timeout
    assert [w["alive"] for w in (await observer.stats())["workers"]] == [False]


async def test_schedules_are_listed_with_their_next_run(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.periodic(every=timedelta(minutes=5), name="tidy")
    async def tidy() -> None: ...

    @jobs.cron("0 2 * * *", timezone="Europe/Rome", name="nightly")
    async def nightly() -> None: ...

    nightly_stats, tidy_stats = (await jobs.stats())["schedules"]
    assert tidy_stats["task"] == "tidy"
    assert tidy_stats["schedule"] == "every 300s"
    assert tidy_stats["every"] == 300
    next_run = datetime.fromisoformat(tidy_stats["next_run_at"])
    assert 0 < next_run.timestamp() - clock.now() <= 300
    assert next_run.timestamp() % 300 == 0
    assert nightly_stats["schedule"] == "0 2 * * * (Europe/Rome)"
    assert nightly_stats["cron"] == "0 2 * * *"


class Visits:
    """Counts the entries read from the parts of a snapshot wrapped with it."""

    def __init__(self) -> None:
        self.count = 0

    def seen(self, entries: Iterable[Any]) -> Iterator[Any]:
        for entry in entries:
            self.count += 1
            yield entry

    def mapping(self, values: dict[Any, Any]) -> dict[Any, Any]:
        visits = self

        class Counted(dict[Any, Any]):
            def __iter__(self) -> Iterator[Any]:
                return visits.seen(super().__iter__())

            def keys(self) -> Iterator[Any]:  # type: ignore[override]
                return visits.seen(super().keys())

            def values(self) -> Iterator[Any]:  # type: ignore[override]
                return visits.seen(super().values())

            def items(self) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
                return visits.seen(super().items())

        return Counted(values)

    def sequence(self, values: list[Any]) -> list[Any]:
        visits = self

        class Counted(list[Any]):
            def __iter__(self) -> Iterator[Any]:
                return visits.seen(super().__iter__())

        return Counted(values)


def test_stats_read_each_entry_of_the_snapshot_a_bounded_number_of_times() -> None:
    """With many tasks: stats() read every entry of the store's snapshot once per task
    and per queue, so the event loop stalled for seconds (1,000 tasks: 2 s) at each
    stats(), dashboard overview and metrics scrape."""
    visits = Visits()
    pairs = [(f"q{n % 10}", f"t{n}") for n in range(400)]
    counts = {(q, t, s): 2 for q, t in pairs for s in ("queued", "succeeded", "paused")}
    snapshot = OpsSnapshot(
        counts=visits.mapping(counts),
        oldest_due=visits.mapping({(q, t): 100.0 + n for n, (q, t) in enumerate(pairs)}),
        finished=visits.mapping({(q, t, "succeeded"): [1, 2] for q, t in pairs}),
        samples=visits.sequence(
            [
                FinishedSample(
                    queue=q,
                    task=t,
                    status="succeeded",
                    run_at=0.0,
                    started_at=float(n % 7),
                    finished_at=10.0,
                )
                for n, (q, t) in enumerate(pairs)
            ]
        ),
        stuck=[],
        stuck_counts=visits.mapping(dict.fromkeys(pairs, 1)),
        workers=[],
    )
    entries = len(counts) + 4 * len(pairs)
    stats = build(snapshot, now=1000.0, alive_within=60)
    assert visits.count <= 5 * entries
    totals, first = stats["totals"], stats["queues"][0]
    assert (totals["counts"]["queued"], totals["counts"]["dead"]) == (800, 800)  # paused: dead
    assert totals["oldest_queued_age"] == 900.0
    assert totals["windows"]["5m"]["succeeded"] == 800
    assert (totals["run_time"]["count"], totals["run_time"]["max"]) == (400, 10.0)
    assert totals["stuck"] == 400
    assert first["queue"] == "q0"
    assert (first["counts"]["succeeded"], first["stuck"]) == (80, 40)
    assert first["windows"]["1m"]["succeeded"] == 40
    assert first["tasks"][0]["task"] == "t0"
    assert first["tasks"][0]["oldest_queued_age"] == 900.0
    assert first["tasks"][1]["task"] == "t10"
    assert first["tasks"][1]["run_time"]["p50"] == 7.0  # started at 10 % 7, ended at 10


def test_percentiles_use_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.9) == 7.0
    assert timing([3.0, 1.0, 2.0]) == {"count": 3, "p50": 2.0, "p90": 3.0, "p99": 3.0, "max": 3.0}


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.0004, "0 ms"),
        (0.85, "850 ms"),
        (4.25, "4.2 s"),
        (119.0, "119.0 s"),
        (210.0, "3.5 min"),
        (7200.0, "2.0 h"),
        (129600.0, "36.0 h"),
        (259200.0, "3.0 d"),
        # Just under a unit's end, rounded up into the next unit: not "1000 ms", "120.0 s".
        (0.9996, "1.0 s"),
        (119.96, "2.0 min"),
        (7199.9, "2.0 h"),
        (172799.0, "2.0 d"),
    ],
)
def test_durations_read_as_people_read_them(seconds: float | None, shown: str) -> None:
    """One formatter for the CLI's and the dashboard's tables."""
    assert human_duration(seconds) == shown
    assert human_duration(None, missing="\u2013") == "\u2013"


def test_workers_forked_from_one_jobs_each_report_as_themselves(tmp_path: Path) -> None:
    """A prefork server that imports the app before forking (gunicorn --preload)."""
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), shutdown_timeout=0)

    @jobs.task(name="noop")
    async def noop() -> None: ...

    async def start_and_stop() -> None:
        async with jobs:
            pass

    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # the child: start its workers, stop them, leave at once
            code = 1
            try:
                asyncio.run(start_and_stop())
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0

    async def workers() -> list[Any]:
        try:
            return list((await jobs.stats())["workers"])
        finally:
            await jobs.close()

    seen = asyncio.run(workers())
    assert sorted(worker["pid"] for worker in seen) == sorted(children)
    assert len({worker["id"] for worker in seen}) == 2


async def test_a_worker_of_the_highest_concurrency_shows_in_stats_on_every_store(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """The highest concurrency Jobs takes fits the workers table of every store."""
    jobs = make_jobs(backend_url, concurrency=2**31 - 1)

    @jobs.task
    async def noop() -> None: ...

    async with jobs:
        (worker,) = (await jobs.stats())["workers"]
    assert worker["concurrency"] == 2**31 - 1


async def test_workers_started_again_in_their_process_show_the_new_start(
    make_jobs: MakeJobs, clock: FakeClock, backend_url: str
) -> None:
    """Stopped and started again, a Jobs keeps its worker id: its row is updated, and
    showed the first start (before the stop it also shows) as when it started."""
    jobs = make_jobs(backend_url)

    @jobs.task
    async def noop() -> None: ...

    async with jobs:
        pass
    clock.advance(600)
    async with jobs:
        (worker,) = (await jobs.stats())["workers"]
        assert worker["alive"] is True
        assert worker["stopped_at"] is None
        started_at = datetime.fromisoformat(worker["started_at"]).timestamp()
        assert started_at == pytest.approx(clock.now(), abs=0.001)


# Jobs of one status finished at ? + i (i from 1), named ? || i.
FILL_FINISHED = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, run_at, "
    "enqueued_at, started_at, finished_at) "
    "SELECT ? || i, 't', 'default', ?, '{}', 3, 0.0, 0.0, 0.0, ? + i FROM n"
)


def steps_of_the_finished_reads(path: Path, older: int) -> dict[str, int]:
    """SQLite VM steps of each statement of the snapshot that reads the finished index
    (its windows, its samples), behind ``older`` succeeded and as many dead jobs that
    finished before the windows."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db)
        for status in ("succeeded", "dead", "cancelled"):
            db.execute(FILL_FINISHED, (older, f"old-{status}-", status, 0.0))
            db.execute(FILL_FINISHED, (50, f"new-{status}-", status, 1_000_000.0))
        statements: list[str] = []
        db.set_trace_callback(statements.append)
        snapshot = _snapshot(db, 1_000_100.0, [60.0, 300.0], 20, 0.0)
        db.set_trace_callback(None)
        assert [s.finished_at for s in snapshot.samples] == sorted(
            [1_000_000.0 + i for i in range(41, 51)] * 2, reverse=True
        )
        steps = {}
        for statement in statements:
            if "asyncjobs_jobs_finished" in statement:
                with counting_steps(db) as counted:
                    db.execute(statement).fetchall()
                steps[statement] = counted.count
        assert len(steps) == 2, statements
        return steps
    finally:
        db.close()


def test_the_snapshot_reads_the_newest_finished_jobs_not_all_of_them(tmp_path: Path) -> None:
    """The windows (jobs finished in the last minute, 5 minutes) and the samples (the
    newest succeeded and dead jobs) read each status's newest jobs in the finished
    index, (status, finished_at): older finished jobs cost them nothing."""
    small = steps_of_the_finished_reads(tmp_path / "small.db", 100)
    big = steps_of_the_finished_reads(tmp_path / "big.db", 100_000)
    assert small.keys() == big.keys()
    for statement, steps in big.items():
        assert steps < 2 * small[statement], (statement, small[statement], steps)
