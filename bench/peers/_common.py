"""What every library's benchmark shares: the Adapter API, the workloads, the CLI.

Each library has one adapter module in this package. ``run_all.py`` runs one
workload per process (``python -m bench.peers.<module> --variant V --workload W``)
and reads the last stdout line, ``RESULT {json}``. Producer and workers live in
that same process, so pickup latency is measured on one ``time.perf_counter``.

The job is a no-op that calls ``hook(x)``: ``x`` is the ``perf_counter`` value
taken just before the enqueue call (0.0 when latency is not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDIS_HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
# A Redis database number of its own, and key names with a per-run tag on top.
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "9"))
PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CONCURRENCY = 10
RUN_TAG = f"{os.getpid()}{uuid.uuid4().hex[:6]}"

Hook = Callable[[float], None]


def _no_hook(x: float) -> None:
    raise RuntimeError("job ran before start_workers() installed the hook")


class Adapter:
    """One library, one backend. Subclasses fill in the async methods."""

    library = "?"
    backend = "?"
    sync_enqueue = False
    """True when ``enqueue`` blocks (a sync library): concurrent producers use threads."""

    def __init__(self, variant: str, workdir: Path) -> None:
        self.variant = variant
        self.workdir = workdir
        self.hook: Hook = _no_hook
        self.settings: dict[str, Any] = {}
        """The configuration used, reported with the figures."""

    async def setup(self) -> None:
        """Create an empty queue (database, schema, keys) and connect the producer."""

    async def teardown(self) -> None:
        """Close everything and delete what ``setup`` created."""

    async def enqueue(self, x: float) -> None:
        if self.sync_enqueue:
            self.enqueue_sync(x)
            return
        raise NotImplementedError

    def enqueue_sync(self, x: float) -> None:
        """The blocking enqueue of a sync library (``sync_enqueue = True``)."""
        raise NotImplementedError

    async def enqueue_bulk(self, n: int) -> None:
        """Fill the queue with ``n`` jobs (not timed; use the library's fastest way)."""
        if self.sync_enqueue:
            for _ in range(n):
                await self.enqueue(0.0)
            return
        for start in range(0, n, 100):
            await asyncio.gather(*(self.enqueue(0.0) for _ in range(min(100, n - start))))

    async def start_workers(self) -> None:
        """Start ``CONCURRENCY`` workers in this process; jobs call ``self.hook``."""
        raise NotImplementedError

    async def stop_workers(self) -> None:
        raise NotImplementedError

    async def unfinished(self) -> int:
        """How many jobs are not finished yet (a lower bound is fine; 0 means done)."""
        raise NotImplementedError


# -- helpers for adapters ------------------------------------------------------------


async def create_database(prefix: str) -> str:
    """A fresh PostgreSQL database; returns its DSN. Drop it with ``drop_database``."""
    import asyncpg

    name = f"{prefix}_{RUN_TAG}"
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(PG_DSN)
    return urlunsplit(parts._replace(path="/" + name))


async def drop_database(dsn: str) -> None:
    import asyncpg

    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def redis_delete(*patterns: str) -> int:
    """Delete the keys matching ``patterns`` in the benchmark's Redis database."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    deleted = 0
    try:
        for pattern in patterns:
            batch = [key async for key in client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(batch), 500):
                deleted += await client.delete(*batch[i : i + 500])
    finally:
        await client.aclose()
    return deleted


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Recorder:
    """Counts job runs (thread-safe) and records enqueue-to-start latencies."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.count = 0
        self.latencies: list[float] = []
        self.done = asyncio.Event()
        self.done_at = 0.0
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()

    def hit(self, x: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self.count += 1
            count = self.count
            if x:
                self.latencies.append(now - x)
        if count == self.expect:
            self.done_at = now
            self._loop.call_soon_threadsafe(self.done.set)


async def _wait_unfinished_zero(adapter: Adapter, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while await adapter.unfinished() > 0:
        if time.perf_counter() > deadline:
            raise TimeoutError("jobs still unfinished in the store")
        await asyncio.sleep(0.002)
    return time.perf_counter()


# -- workloads -----------------------------------------------------------------------


async def throughput(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """Enqueue ``n`` no-op jobs first, then time the workers draining them."""
    n = int(params.get("n", 10_000))
    t = time.perf_counter()
    await adapter.enqueue_bulk(n)
    fill_s = time.perf_counter() - t
    if await adapter.unfinished() == 0:
        raise RuntimeError("enqueue_bulk() left nothing in the queue")
    recorder = Recorder(n)
    adapter.hook = recorder.hit
    t0 = time.perf_counter()
    await adapter.start_workers()
    try:
        await asyncio.wait_for(recorder.done.wait(), timeout=float(params.get("timeout", 120)))
    except TimeoutError:
        # Too slow to finish in the time allowed: report the rate over that window.
        ran_s = time.perf_counter() - t0
        done, acked_s = recorder.count, None
    else:
        ran_s = recorder.done_at - t0
        done = n
        acked_s = await _wait_unfinished_zero(adapter, 60) - t0
        await asyncio.sleep(0.05)  # a job run twice would show up here
    await adapter.stop_workers()
    return {
        "n": n,
        "finished": done,
        "partial": done < n,
        "jobs_per_s": done / ran_s,
        "ran_s": ran_s,
        "acked_s": acked_s,
        "jobs_per_s_acked": None if acked_s is None else n / acked_s,
        "fill_s": fill_s,
        "runs": recorder.count,
    }


async def enqueue_latency(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """One producer enqueueing sequentially; per-call latency (no workers running)."""
    n = int(params.get("n", 2000))
    for _ in range(int(params.get("warmup", 50))):
        await adapter.enqueue(0.0)
    samples = []
    t_start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        await adapter.enqueue(0.0)
        samples.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t_start
    samples.sort()
    return {
        "n": n,
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "mean_us": sum(samples) / n * 1e6,
        "per_s": n / elapsed,
    }


async def enqueue_concurrent(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """``producers`` concurrent producers (threads for a sync library); enqueues/s."""
    n = int(params.get("n", 5000))
    producers = int(params.get("producers", 50))
    per = n // producers
    await adapter.enqueue(0.0)  # connect, warm up
    t = time.perf_counter()
    if adapter.sync_enqueue:
        # A sync library blocks in enqueue: its concurrent producers are threads.
        def produce() -> None:
            for _ in range(per):
                adapter.enqueue_sync(0.0)

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(producers) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, produce) for _ in range(producers)))
    else:

        async def produce_async() -> None:
            for _ in range(per):
                await adapter.enqueue(0.0)

        await asyncio.gather(*(produce_async() for _ in range(producers)))
    elapsed = time.perf_counter() - t
    return {"n": per * producers, "producers": producers, "per_s": per * producers / elapsed}


async def pickup_latency(adapter: Adapter, params: dict[str, Any]) -> dict[str, Any]:
    """Enqueue at a steady ``rate`` for ``duration`` s; latency from enqueue to job start."""
    rate = float(params.get("rate", 500))
    duration = float(params.get("duration", 3))
    warmup = 20
    n = int(rate * duration)
    recorder = Recorder(warmup + n)
    adapter.hook = recorder.hit
    await adapter.start_workers()
    for _ in range(warmup):
        await adapter.enqueue(0.0)
    while recorder.count < warmup:  # noqa: ASYNC110 - the hook may run in a thread
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await adapter.enqueue(time.perf_counter())
    sent_s = time.perf_counter() - t0
    try:
        await asyncio.wait_for(recorder.done.wait(), timeout=30)
    finally:
        await adapter.stop_workers()
    samples = sorted(recorder.latencies)
    return {
        "n": n,
        "rate": rate,
        "achieved_rate": n / sent_s,
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "max_ms": samples[-1] * 1e3,
    }


Workload = Callable[[Adapter, dict[str, Any]], Awaitable[dict[str, Any]]]
WORKLOADS: dict[str, Workload] = {
    "throughput": throughput,
    "enqueue": enqueue_latency,
    "enqueue_concurrent": enqueue_concurrent,
    "pickup": pickup_latency,
}


# -- CLI -----------------------------------------------------------------------------


def _dump_tasks() -> None:
    """On a stuck workload: show where every asyncio task waits (stderr)."""
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def _run(adapter: Adapter, workload: Workload, params: dict[str, Any]) -> dict[str, Any]:
    limit = float(params.get("time_limit", 300))
    await adapter.setup()
    try:
        async with asyncio.timeout(limit):
            try:
                result = await workload(adapter, params)
            except TimeoutError:
                _dump_tasks()
                raise
    finally:
        await asyncio.wait_for(adapter.teardown(), 30)
    result["settings"] = adapter.settings
    return result


def main(
    adapters: dict[str, Callable[[str, Path], Adapter]],
    extra_workloads: dict[str, Workload] | None = None,
) -> None:
    """``python -m bench.peers.<module> --variant V --workload W [--params JSON]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=sorted(adapters))
    workloads = {**WORKLOADS, **(extra_workloads or {})}
    parser.add_argument("--workload", required=True, choices=sorted(workloads))
    parser.add_argument("--params", default="{}", help="JSON object of workload parameters")
    parser.add_argument("--workdir", default=None, help="folder for database files")
    args = parser.parse_args()
    workdir = Path(args.workdir or Path.cwd() / "bench" / "results" / f"tmp-{RUN_TAG}")
    workdir.mkdir(parents=True, exist_ok=True)
    adapter = adapters[args.variant](args.variant, workdir)
    try:
        result = asyncio.run(_run(adapter, workloads[args.workload], json.loads(args.params)))
    except BaseException as error:
        traceback.print_exc()
        print("RESULT " + json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        sys.exit(1)
    finally:
        if args.workdir is None:
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            workdir.rmdir()
    print("RESULT " + json.dumps(result), flush=True)
