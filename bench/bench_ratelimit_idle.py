"""What a rate-limited backlog costs a worker process that has nothing it may run.

Run: ``.venv/bin/python bench/bench_ratelimit_idle.py`` (``--help`` for sizes). One
process, one run: each scenario starts workers on a fresh SQLite file, lets them
settle, then measures the process's CPU time (all threads, so aiosqlite's too) over a
wall-clock window. The baseline is the same worker with an empty store.

Scenarios:
- idle: no jobs (the baseline: the runner's cheap change polling only);
- blocked: a backlog of N jobs of a task limited to 1/h (its burst is spent, so every
  job is held back by the rate limit);
- blocked, keyed: the same backlog in one key of a keyed limiter (the claim looks
  through a window of held-back rows);
- trickle 10/s: a backlog of N at 10/s, so the worker runs 10 jobs a second and sleeps
  until each next token.

It also times one claim against each backlog directly on the store.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from asyncjobs import Jobs, JobSpec
from asyncjobs.stores._claims import ClaimRequest

Setup = Callable[[Jobs], Any]


def plain_task(rate: str) -> Setup:
    def setup(jobs: Jobs) -> Any:
        @jobs.task(name="limited", rate_limit=rate)
        async def limited(n: int) -> None: ...

        return limited

    return setup


def keyed_task(jobs: Jobs) -> Any:
    jobs.limiter("per_domain", "1/h", key=lambda n: "hot.example")

    @jobs.task(name="limited", limiter="per_domain")
    async def limited(n: int) -> None: ...

    return limited


async def scenario(
    directory: Path, name: str, setup: Setup, backlog: int, window: float
) -> dict[str, float]:
    path = directory / f"{name.replace(' ', '_').replace('/', '_')}.db"
    jobs = Jobs(f"sqlite:///{path}", concurrency=10)
    try:
        setup(jobs)
        for start in range(0, backlog, 1000):
            await jobs.enqueue_many(
                [
                    JobSpec(task="limited", args=(n,))
                    for n in range(start, min(backlog, start + 1000))
                ]
            )
        claim_ms = await claim_cost(jobs)
        async with jobs:
            await anyio.sleep(1.0)  # settle: the burst runs, the runner goes to sleep
            done_before = len(await jobs.list(status="succeeded", limit=100_000))
            cpu, wall = time.process_time(), time.perf_counter()
            await anyio.sleep(window)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            done = len(await jobs.list(status="succeeded", limit=100_000)) - done_before
        return {"cpu_pct": 100 * cpu / wall, "jobs_run": done, "claim_ms": claim_ms}
    finally:
        await jobs.close()


async def claim_cost(jobs: Jobs, rounds: int = 200) -> float:
    """Milliseconds per claim of 10 when the burst is spent (tokens taken up front)."""
    request: ClaimRequest = jobs.runner._request(10)
    now = time.time()
    await jobs.store.claim(request, now=now)  # spend the burst (if any job is ready)
    begin = time.perf_counter()
    for _ in range(rounds):
        await jobs.store.claim(request, now=now)
    elapsed = (time.perf_counter() - begin) / rounds * 1000
    await jobs.store.recover(now=now + 3600)  # give back what the first claim took
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=10_000, help="jobs in the backlog")
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per scenario")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the store files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        rows = [
            ("idle (baseline)", plain_task("1/h"), 0),
            ("blocked 1/h", plain_task("1/h"), args.backlog),
            ("blocked, keyed 1/h", keyed_task, args.backlog),
            ("trickle 10/s", plain_task("10/s"), args.backlog),
        ]
        results = [
            (name, await scenario(directory, name, setup, size, args.window))
            for name, setup, size in rows
        ]
    base = results[0][1]["cpu_pct"]
    print(f"backlog {args.backlog} jobs, window {args.window:.0f}s, CPU of this process")
    print(f"{'scenario':<22}{'CPU %':>8}{'vs idle':>10}{'jobs run':>10}{'ms/claim':>10}")
    for name, r in results:
        print(
            f"{name:<22}{r['cpu_pct']:>8.2f}{r['cpu_pct'] - base:>+10.2f}"
            f"{r['jobs_run']:>10.0f}{r['claim_ms']:>10.3f}"
        )


if __name__ == "__main__":
    anyio.run(main)
