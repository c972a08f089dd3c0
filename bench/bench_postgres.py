"""PostgreSQL benchmark: enqueue latency and end-to-end throughput, against peers.

Run: ``.venv/bin/python bench/bench_postgres.py [--dsn postgresql://...] [--jobs N]``.
The DSN defaults to ``$ASYNCJOBS_TEST_POSTGRES_DSN`` or ``postgresql://postgres@127.0.0.1/test``.

Each system gets a fresh database on the same server, created and dropped here, and
runs in this one process with the same concurrency: asyncjobs (``PostgresStore``),
procrastinate and pgqueuer (``pip install 'asyncjobs[bench]'``; a peer that is not
installed is skipped with a note). Measured per system:

- enqueue latency: ``--latency`` single enqueues one after another (p50, p99);
- bulk enqueue: ``--jobs`` jobs in batches of 500 (jobs/s);
- throughput: the same no-op jobs run by a worker with concurrency ``--concurrency``
  from the moment it starts until the last one finished (jobs/s).

``--analyze`` runs ANALYZE in each system's database between the enqueue and the run,
as autovacuum does on a live server within a minute or so of a burst. Without it the
run reads tables PostgreSQL has never analysed, whose plans can differ: asyncjobs'
claim then sorts every due job of its tasks (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from asyncjobs import Jobs, JobSpec


@dataclass
class Result:
    system: str
    p50_ms: float
    p99_ms: float
    bulk_per_s: float
    run_per_s: float


@asynccontextmanager
async def fresh_database(dsn: str, label: str) -> AsyncIterator[str]:
    name = f"asyncjobs_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def latencies(enqueue_one: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        await enqueue_one(i)
        times.append(time.perf_counter() - start)
    return times


def summarize(system: str, lat: list[float], n: int, bulk_s: float, run_s: float) -> Result:
    lat_ms = sorted(t * 1000 for t in lat)
    return Result(
        system=system,
        p50_ms=statistics.median(lat_ms),
        p99_ms=lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))],
        bulk_per_s=n / bulk_s,
        run_per_s=(n + len(lat)) / run_s,
    )


Settle = Callable[[str], Awaitable[None]]
"""Run between the enqueue and the run, on the system's database URL."""


async def analyze(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def leave_alone(url: str) -> None:
    return None


class Counter:
    def __init__(self, target: int) -> None:
        self.target, self.n, self.done = target, 0, asyncio.Event()

    def hit(self) -> None:
        self.n += 1
        if self.n >= self.target:
            self.done.set()


async def bench_asyncjobs(url: str, n: int, n_lat: int, concurrency: int, settle: Settle) -> Result:
    counter = Counter(n + n_lat)
    jobs = Jobs(url, concurrency=concurrency, poll_interval=0.5)

    @jobs.task(name="noop")
    async def noop(i: int) -> None:
        counter.hit()

    try:
        await jobs.store.open()
        lat = await latencies(lambda i: jobs.enqueue(noop, i), n_lat)
        start = time.perf_counter()
        for first in range(0, n, 500):
            specs: list[JobSpec[object]] = [
                JobSpec(task="noop", args=(i,)) for i in range(first, min(n, first + 500))
            ]
            await jobs.enqueue_many(specs)
        bulk_s = time.perf_counter() - start
        await settle(url)
        start = time.perf_counter()
        async with jobs:
            await counter.done.wait()
            run_s = time.perf_counter() - start
    finally:
        await jobs.close()
    return summarize("asyncjobs", lat, n, bulk_s, run_s)


async def bench_procrastinate(
    url: str, n: int, n_lat: int, concurrency: int, settle: Settle
) -> Result:
    import procrastinate

    counter = Counter(n + n_lat)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop(i: int) -> None:
        counter.hit()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        lat = await latencies(lambda i: noop.defer_async(i=i), n_lat)
        start = time.perf_counter()
        for first in range(0, n, 500):
            await noop.batch_defer_async(*[{"i": i} for i in range(first, min(n, first + 500))])
        bulk_s = time.perf_counter() - start
        await settle(url)
        start = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False)
        run_s = time.perf_counter() - start
    assert counter.n == n + n_lat, counter.n
    return summarize("procrastinate", lat, n, bulk_s, run_s)


async def bench_pgqueuer(url: str, n: int, n_lat: int, concurrency: int, settle: Settle) -> Result:
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    counter = Counter(n + n_lat)
    conn = await asyncpg.connect(url)
    try:
        queries = Queries.from_asyncpg_connection(conn)
        await queries.install()
        lat = await latencies(lambda i: queries.enqueue("noop", str(i).encode()), n_lat)
        start = time.perf_counter()
        for first in range(0, n, 500):
            size = min(n, first + 500) - first
            payloads: list[bytes | None] = [str(first + k).encode() for k in range(size)]
            await queries.enqueue(["noop"] * size, payloads, [0] * size)
        bulk_s = time.perf_counter() - start
        await settle(url)
        qm = QueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job: object) -> None:
            counter.hit()

        start = time.perf_counter()
        await qm.run(
            mode=QueueExecutionMode.drain,
            batch_size=concurrency // 2,
            max_concurrent_tasks=concurrency,
        )
        run_s = time.perf_counter() - start
    finally:
        await conn.close()
    assert counter.n == n + n_lat, counter.n
    return summarize("pgqueuer", lat, n, bulk_s, run_s)


PEERS: dict[str, Callable[[str, int, int, int, Settle], Awaitable[Result]]] = {
    "asyncjobs": bench_asyncjobs,
    "procrastinate": bench_procrastinate,
    "pgqueuer": bench_pgqueuer,
}


def parser_with_dsn(doc: str | None) -> argparse.ArgumentParser:
    """A command line whose ``--dsn`` defaults to the tests' server."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("ASYNCJOBS_TEST_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/test",
    )
    return parser


async def main() -> None:
    parser = parser_with_dsn(__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--only", nargs="*", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--analyze", action="store_true", help="ANALYZE before each run")
    args = parser.parse_args()
    settle = analyze if args.analyze else leave_alone
    results: list[Result] = []
    for system in args.only:
        try:
            async with fresh_database(args.dsn, system) as url:
                results.append(
                    await PEERS[system](url, args.jobs, args.latency, args.concurrency, settle)
                )
        except ImportError as error:
            print(f"note: {system} skipped, not installed ({error.name}); "
                  "pip install 'asyncjobs[bench]'")  # fmt: skip
    print(
        f"\nPostgreSQL, {args.jobs} no-op jobs (+{args.latency} latency probes), "
        f"concurrency {args.concurrency}, one process"
        f"{', tables analysed before the run' if args.analyze else ''}\n"
    )
    base = next((r for r in results if r.system == "asyncjobs"), None)
    header = (
        f"{'system':<14}{'enqueue p50':>13}{'enqueue p99':>13}{'bulk jobs/s':>13}"
        f"{'run jobs/s':>12}{'asyncjobs/run':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{base.run_per_s / r.run_per_s:.2f}x" if base and r is not base else ""
        print(
            f"{r.system:<14}{r.p50_ms:>10.2f} ms{r.p99_ms:>10.2f} ms{r.bulk_per_s:>13,.0f}"
            f"{r.run_per_s:>12,.0f}{ratio:>15}"
        )


if __name__ == "__main__":
    asyncio.run(main())
