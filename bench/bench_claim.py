"""Claim cost by the number of task names a worker runs, on SQLite and PostgreSQL.

Run: ``.venv/bin/python bench/bench_claim.py [--stores sqlite postgres] [--tasks 1 200
1000] [--dsn postgresql://...]``. The DSN defaults to ``$ASYNCJOBS_TEST_POSTGRES_DSN``
or ``postgresql://postgres@127.0.0.1/test``; a fresh database (a SQLite file in a
temporary directory) is made and dropped for each count.

20,000 queued jobs spread evenly over ``N`` tasks (on PostgreSQL the table analysed);
then claims of 100 by a worker that runs all ``N`` tasks, through ``Store.claim``.
Prints the median claim time for each ``N``, and its ratio to one task's on the same
store in the same run: an app with many tasks should claim about as fast as an app
with one. ``--groups``: each job in an ordered group of its own (20,000 one-job groups),
the claim that reads group heads instead of plain jobs.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from bench_postgres import fresh_database, parser_with_dsn

from asyncjobs.stores import ClaimRequest, NewJob, TaskLimits, open_store

JOBS, CLAIM, CLAIMS = 20_000, 100, 20


def new_job(n: int, task: str, grouped: bool) -> NewJob:
    return NewJob(
        id=f"{task}-{n:06d}", task=task, queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3,
        group_key=f"g{n:06d}" if grouped else None,
    )  # fmt: skip


async def median_claim(url: str, tasks: int, grouped: bool) -> float:
    """The median seconds of a claim of ``CLAIM`` jobs over ``tasks`` task names (each
    job in a group of its own when ``grouped``)."""
    store = open_store(url)
    await store.open()
    try:
        names = [f"task{i:04d}" for i in range(tasks)]
        jobs = [new_job(n, names[n % tasks], grouped) for n in range(JOBS)]
        for first in range(0, JOBS, 1000):
            await store.insert(jobs[first : first + 1000], now=1.0)
        if url.startswith("postgresql"):
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("ANALYZE asyncjobs_jobs")
            finally:
                await conn.close()
        request = ClaimRequest(
            worker="bench", tasks={name: TaskLimits(max_attempts=3) for name in names},
            queues=None, limit=CLAIM, lease=60.0,
        )  # fmt: skip
        times = []
        for _ in range(CLAIMS):
            start = time.perf_counter()
            claimed = await store.claim(request, now=2.0)
            times.append(time.perf_counter() - start)
            assert len(claimed) == CLAIM, len(claimed)
        return statistics.median(times)
    finally:
        await store.close()


@asynccontextmanager
async def fresh_store(store: str, dsn: str, label: str) -> AsyncIterator[str]:
    if store == "postgres":
        async with fresh_database(dsn, label) as url:
            yield url
    else:
        with tempfile.TemporaryDirectory() as directory:
            yield "sqlite:///" + str(Path(directory) / "claim.db")


async def main() -> None:
    parser = parser_with_dsn(__doc__)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 200, 1000])
    parser.add_argument(
        "--stores", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--groups", action="store_true", help="each job in a group of its own")
    args = parser.parse_args()
    kind = " in one-job groups" if args.groups else ""
    print(f"\nclaims of {CLAIM} from {JOBS:,} queued jobs{kind} (median of {CLAIMS})\n")
    print(f"{'store':<10}{'tasks':>6}{'claim ms':>10}{'vs fewest':>11}")
    for store in args.stores:
        results: dict[int, float] = {}
        for tasks in sorted(set(args.tasks)):
            async with fresh_store(store, args.dsn, f"claim{tasks}") as url:
                results[tasks] = await median_claim(url, tasks, args.groups)
        base = results[min(results)]
        for tasks, seconds in results.items():
            print(f"{store:<10}{tasks:>6}{seconds * 1000:>10.2f}{seconds / base:>10.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
