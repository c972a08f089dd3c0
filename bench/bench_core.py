"""Core benchmark: enqueue latency and throughput, end-to-end no-op jobs, against a baseline.

Run: ``.venv/bin/python bench/bench_core.py`` (``--help`` for sizes). Everything runs in
one process on files in one directory (``--dir``, default a fresh directory under $TMPDIR),
so the baseline and asyncjobs share the disk and the machine's load. The baseline is a
raw aiosqlite ``INSERT`` + ``COMMIT`` loop, one commit per row, with the same pragmas.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import anyio

from asyncjobs import Jobs


@dataclass
class Row:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    higher_is_better: bool = True

    def ratio(self) -> str:
        if not self.baseline:
            return ""
        ratio = self.value / self.baseline if self.higher_is_better else self.baseline / self.value
        return f"{ratio:.1f}x"


def fresh(directory: Path, name: str) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{directory / name}{suffix}").unlink(missing_ok=True)
    return str(directory / name)


async def baseline_commits(directory: Path, rows: int, synchronous: str) -> list[float]:
    """Per-row latency of INSERT + COMMIT on a raw aiosqlite connection."""
    db = await aiosqlite.connect(fresh(directory, f"baseline-{synchronous}.db"))
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        await db.commit()
        latencies = []
        for i in range(rows):
            start = time.perf_counter()
            await db.execute("INSERT INTO t (payload) VALUES (?)", (f'{{"args":[{i}]}}',))
            await db.commit()
            latencies.append(time.perf_counter() - start)
        return latencies
    finally:
        await db.close()


def make_jobs(directory: Path, name: str, **kwargs: object) -> Jobs:
    jobs = Jobs("sqlite:///" + fresh(directory, name), **kwargs)  # type: ignore[arg-type]

    @jobs.task(name="noop")
    async def noop(i: int) -> None:
        return None

    return jobs


async def enqueue_latency(directory: Path, count: int) -> list[float]:
    jobs = make_jobs(directory, "latency.db", workers=False)
    task = jobs.registry["noop"]
    try:
        await jobs.enqueue(task, -1)  # open the store and create the schema
        latencies = []
        for i in range(count):
            start = time.perf_counter()
            await jobs.enqueue(task, i)
            latencies.append(time.perf_counter() - start)
        return latencies
    finally:
        await jobs.close()


async def enqueue_concurrent(directory: Path, producers: int, each: int) -> float:
    jobs = make_jobs(directory, "concurrent.db", workers=False)
    task = jobs.registry["noop"]

    async def producer(base: int) -> None:
        for i in range(each):
            await jobs.enqueue(task, base + i)

    try:
        await jobs.enqueue(task, -1)
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for p in range(producers):
                tg.start_soon(producer, p * each)
        elapsed = time.perf_counter() - start
        return producers * each / elapsed
    finally:
        await jobs.close()


async def end_to_end(directory: Path, count: int, synchronous: str, concurrency: int) -> float:
    """No-op jobs per second from start of workers until the last one ran."""
    jobs = Jobs(
        "sqlite:///" + fresh(directory, f"e2e-{synchronous}.db"),
        concurrency=concurrency,
        synchronous=synchronous,
    )
    done = anyio.Event()
    ran = 0

    @jobs.task(name="noop")
    async def noop(i: int) -> None:
        nonlocal ran
        ran += 1
        if ran == count:
            done.set()

    try:
        for start_at in range(0, count, 1000):
            await jobs.enqueue_many([noop.spec(i) for i in range(start_at, start_at + 1000)])
        start = time.perf_counter()
        async with jobs:
            with anyio.fail_after(600):
                await done.wait()
            elapsed = time.perf_counter() - start
        succeeded = len(await jobs.list(status="succeeded", limit=count + 1))
        if succeeded != count:
            raise RuntimeError(f"only {succeeded} of {count} jobs succeeded")
        return count / elapsed
    finally:
        await jobs.close()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def main(args: argparse.Namespace, directory: Path) -> None:
    base_normal = await baseline_commits(directory, args.baseline_rows, "NORMAL")
    base_full = await baseline_commits(directory, args.baseline_rows, "FULL")
    latencies = await enqueue_latency(directory, args.latency_count)
    per_second = await enqueue_concurrent(directory, args.producers, args.per_producer)
    e2e_normal = await end_to_end(directory, args.jobs, "normal", args.concurrency)
    e2e_full = await end_to_end(directory, args.jobs, "full", args.concurrency)

    base_rate = len(base_normal) / sum(base_normal)
    base_rate_full = len(base_full) / sum(base_full)
    us = 1e6
    rows = [
        Row("baseline: aiosqlite INSERT+COMMIT (normal)", base_rate, "rows/s"),
        Row("baseline: aiosqlite INSERT+COMMIT (full)", base_rate_full, "rows/s"),
        Row("baseline: INSERT+COMMIT p50", pct(base_normal, 50) * us, "us"),
        Row(
            "enqueue p50, 1 producer", pct(latencies, 50) * us, "us",
            pct(base_normal, 50) * us, higher_is_better=False,
        ),
        Row(
            "enqueue p99, 1 producer", pct(latencies, 99) * us, "us",
            pct(base_normal, 99) * us, higher_is_better=False,
        ),
        Row(f"enqueues/s, {args.producers} producers", per_second, "jobs/s", base_rate),
        Row(
            f"end to end, {args.jobs} no-op jobs, concurrency {args.concurrency}, normal",
            e2e_normal, "jobs/s", base_rate,
        ),
        Row(
            f"end to end, {args.jobs} no-op jobs, concurrency {args.concurrency}, full",
            e2e_full, "jobs/s", base_rate_full,
        ),
    ]  # fmt: skip
    width = max(len(r.name) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  {'unit':<7} {'vs baseline':>11}")
    for r in rows:
        print(f"{r.name:<{width}}  {r.value:>12,.1f}  {r.unit:<7} {r.ratio():>11}")
    print(f"\nfiles in {directory}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to put the database files (same disk for all)")
    parser.add_argument("--baseline-rows", type=int, default=3000)
    parser.add_argument("--latency-count", type=int, default=3000)
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--per-producer", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=10)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    where = Path(arguments.dir or tempfile.mkdtemp(prefix="asyncjobs-bench-"))
    where.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(arguments, where))
