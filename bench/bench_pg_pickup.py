"""PostgreSQL pickup across processes: a web process enqueues, a worker process runs.

Run: ``.venv/bin/python bench/bench_pg_pickup.py [--dsn postgresql://...] [--jobs N]
[--rate R]``. The DSN defaults to ``$ASYNCJOBS_TEST_POSTGRES_DSN`` or
``postgresql://postgres@127.0.0.1/test``; a fresh database is created and dropped.

A worker process (``Jobs`` with its workers, a no-op task) waits for work; this
process enqueues ``--jobs`` jobs one at a time at ``--rate`` per second with
``workers=False``, as a web process would. The pickup latency of each job is its
``started_at - enqueued_at`` as stored (both from the same host's clock), so it
measures how soon the idle worker hears of the insert and claims it: through the
LISTEN connection's notification, or at its next look at the store.
"""

from __future__ import annotations

import asyncio
import statistics
import sys

import asyncpg
from bench_postgres import fresh_database, parser_with_dsn

from asyncjobs import Jobs

WORKER = """
import asyncio, sys
from asyncjobs import Jobs

jobs = Jobs(sys.argv[1])

@jobs.task(name="noop")
async def noop(n: int) -> None: ...

async def main() -> None:
    async with jobs:
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def pickups(url: str, n: int, rate: float) -> list[float]:
    web = Jobs(url, workers=False)
    await web.store.open()  # creates the schema before the worker starts
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert worker.stdout is not None
        if (await worker.stdout.readline()).strip() != b"ready":
            raise SystemExit("the worker process did not start")
        await asyncio.sleep(1.0)  # its runner idle, its LISTEN connection open
        for i in range(n):
            await web.enqueue("noop", i)
            await asyncio.sleep(1 / rate)
        conn = await asyncpg.connect(url)
        try:
            for _ in range(100):  # up to 10 s for the last ones
                rows = await conn.fetch(
                    "SELECT started_at - enqueued_at AS pickup FROM asyncjobs_jobs "
                    "WHERE status = 'succeeded'"
                )
                if len(rows) == n:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        return sorted(r["pickup"] * 1000 for r in rows)
    finally:
        worker.kill()
        await worker.wait()
        await web.close()


async def main() -> None:
    parser = parser_with_dsn(__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="enqueues per second")
    args = parser.parse_args()
    async with fresh_database(args.dsn, "pickup") as url:
        ms = await pickups(url, args.jobs, args.rate)
    p99 = ms[max(0, round(len(ms) * 0.99) - 1)]
    print(
        f"{len(ms)} of {args.jobs} jobs ran; pickup across processes "
        f"p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
