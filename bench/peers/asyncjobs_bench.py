"""asyncjobs through its public API only: ``Jobs(...)``, ``@jobs.task``, ``enqueue``,
``enqueue_many``, ``start``/``stop``, ``jobs.list()``.

Variants: ``sqlite-normal`` and ``sqlite-full`` (one SQLite file in WAL mode,
``synchronous=NORMAL`` / ``FULL``) and ``postgres`` (a fresh database; skipped by
run_all.py while asyncjobs has no PostgreSQL store). Concurrency 10, every other
setting at its default.

Two workloads only asyncjobs runs: ``idle`` (CPU of an idle process holding
10,000 jobs scheduled for later and 1,000 rate-limited jobs) and ``memory`` (RSS
while hundreds of thousands of finished jobs accumulate in the store).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from asyncjobs import Jobs
from bench.peers._common import (
    CONCURRENCY,
    Adapter,
    Recorder,
    create_database,
    drop_database,
    main,
    rss_bytes,
)


class AsyncJobsAdapter(Adapter):
    library = "asyncjobs"

    def __init__(self, variant: str, workdir: Path) -> None:
        super().__init__(variant, workdir)
        self.backend = "PostgreSQL" if variant == "postgres" else "SQLite"
        self.dsn: str | None = None

    async def setup(self) -> None:
        if self.variant == "postgres":
            self.dsn = await create_database("bench_asyncjobs")
            self.jobs = Jobs(self.dsn, concurrency=CONCURRENCY)
            self.settings = {"url": "postgresql://…/<fresh database>", "concurrency": CONCURRENCY}
        else:
            synchronous = self.variant.removeprefix("sqlite-")
            self.db_path = self.workdir / "jobs.db"
            self.jobs = Jobs(
                "sqlite:///" + str(self.db_path), concurrency=CONCURRENCY, synchronous=synchronous
            )
            self.settings = {
                "store": "SQLite file, WAL",
                "synchronous": synchronous.upper(),
                "concurrency": CONCURRENCY,
            }

        async def noop(x: float) -> None:
            self.hook(x)

        self.noop = self.jobs.task(name="bench.noop")(noop)

    async def teardown(self) -> None:
        await self.jobs.close()
        if self.dsn is not None:
            await drop_database(self.dsn)

    async def enqueue(self, x: float) -> None:
        await self.jobs.enqueue(self.noop, x)

    async def enqueue_bulk(self, n: int) -> None:
        for start in range(0, n, 1000):
            await self.jobs.enqueue_many([self.noop.spec(0.0) for _ in range(min(1000, n - start))])

    async def start_workers(self) -> None:
        await self.jobs.start()

    async def stop_workers(self) -> None:
        await self.jobs.stop()

    async def unfinished(self) -> int:
        queued = await self.jobs.list(status="queued", limit=1)
        running = await self.jobs.list(status="running", limit=1)
        return len(queued) + len(running)

    def db_bytes(self) -> int:
        if self.dsn is not None:
            return 0
        files = [self.db_path, Path(f"{self.db_path}-wal")]
        return sum(f.stat().st_size for f in files if f.exists())


def _cpu_seconds() -> float:
    return time.process_time()  # all threads of this process, ns resolution


async def idle(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """CPU share of an idle process (process CPU time over a wall interval): with an
    empty store, then holding jobs scheduled for later, then also jobs held back by
    a rate limit. Each phase settles for ``settle`` s, then is measured."""
    assert isinstance(adapter, AsyncJobsAdapter)
    jobs = adapter.jobs
    scheduled = int(params.get("scheduled", 10_000))
    limited = int(params.get("rate_limited", 1000))
    interval = float(params.get("interval", 5))
    settle = float(params.get("settle", 2))

    async def limited_noop() -> None:
        pass

    slow = jobs.task(name="bench.rate_limited", rate_limit="1/h")(limited_noop)
    later = adapter.noop.options(delay=3600)
    adapter.hook = lambda x: None

    async def cpu_percent() -> tuple[float, float]:
        await asyncio.sleep(settle)
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        await asyncio.sleep(interval)
        wall = time.perf_counter() - wall0
        return (_cpu_seconds() - cpu0) / wall * 100, wall

    await jobs.start()
    idle_empty, _ = await cpu_percent()
    for start in range(0, scheduled, 1000):
        await jobs.enqueue_many([later.spec(0.0) for _ in range(min(1000, scheduled - start))])
    idle_scheduled, _ = await cpu_percent()
    for start in range(0, limited, 1000):
        await jobs.enqueue_many([slow.spec() for _ in range(min(1000, limited - start))])
    idle_both, wall = await cpu_percent()
    ran_limited = len(await jobs.list(status="succeeded", task="bench.rate_limited", limit=limited))
    await jobs.stop()
    return {
        "scheduled": scheduled,
        "rate_limited": limited,
        "rate_limited_ran": ran_limited,
        "rate_limits_enforced": ran_limited < limited,
        "interval_s": wall,
        "cpu_percent_empty": idle_empty,
        "cpu_percent_scheduled": idle_scheduled,
        "cpu_percent": idle_both,
    }


async def memory(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """RSS at checkpoints while finished jobs accumulate (fed in chunks of 1,000,
    never more than a few thousand waiting), with the drain rate of each segment."""
    assert isinstance(adapter, AsyncJobsAdapter)
    jobs = adapter.jobs
    checkpoints = sorted(int(c) for c in params.get("checkpoints", [100_000, 300_000]))
    target = checkpoints[-1]
    recorder = Recorder(target)
    adapter.hook = recorder.hit
    await jobs.start()
    enqueued = 0
    rss0 = rss_bytes()
    t_prev, n_prev = time.perf_counter(), 0
    points = []
    while checkpoints:
        if enqueued < target and enqueued - recorder.count < 3000:
            k = min(1000, target - enqueued)
            await jobs.enqueue_many([adapter.noop.spec(0.0) for _ in range(k)])
            enqueued += k
        else:
            await asyncio.sleep(0.005)
        while checkpoints and recorder.count >= checkpoints[0]:
            now = time.perf_counter()
            points.append(
                {
                    "finished": recorder.count,
                    "rss_mib": rss_bytes() / 2**20,
                    "db_mib": adapter.db_bytes() / 2**20,
                    "segment_jobs_per_s": (recorder.count - n_prev) / (now - t_prev),
                }
            )
            t_prev, n_prev = now, recorder.count
            checkpoints.pop(0)
    await jobs.stop()
    return {
        "rss_start_mib": rss0 / 2**20,
        "points": points,
        "rss_growth_mib": points[-1]["rss_mib"] - points[0]["rss_mib"],
    }


VARIANTS = dict.fromkeys(("sqlite-normal", "sqlite-full", "postgres"), AsyncJobsAdapter)

if __name__ == "__main__":
    main(VARIANTS, {"idle": idle, "memory": memory})
