"""How long ``Store.snapshot`` (behind ``jobs.stats()`` and /metrics) and one pruning
batch take on a SQLite store holding many finished jobs.

    .venv/bin/python bench/bench_ops.py --finished 1000000 --pending 20000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from asyncjobs._retention import BATCH
from asyncjobs.stores import SQLiteStore


def fill(path: Path, finished: int, pending: int, now: float) -> None:
    db = sqlite3.connect(path)
    rows = []
    for i in range(finished):
        done = now - random.random() * 7 * 86400  # spread over a week of retention
        status = "dead" if i % 50 == 0 else "succeeded"
        rows.append((uuid.uuid4().hex, f"task{i % 5}", f"q{i % 3}", status, "{}", 1, 1,
                     done - 5, done - 6, done - 1, done))  # fmt: skip
    for i in range(pending):
        rows.append((uuid.uuid4().hex, f"task{i % 5}", f"q{i % 3}", "queued", "{}", 0, 3,
                     now - i, now - i, None, None))  # fmt: skip
    db.executemany(
        "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, attempts, max_attempts, "
        "run_at, enqueued_at, started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    db.commit()
    db.execute("ANALYZE")
    db.close()


async def main(finished: int, pending: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        store = SQLiteStore(path)
        await store.open()
        await store.close()
        now = time.time()
        fill(path, finished, pending, now)
        store = SQLiteStore(path)
        await store.open()
        try:
            timings = []
            for _ in range(5):
                start = time.perf_counter()
                await store.snapshot(now=now, windows=[60, 300], sample=1000, workers_since=0)
                timings.append(time.perf_counter() - start)
            median, best = sorted(timings)[2] * 1000, min(timings) * 1000
            print(f"snapshot, {finished} finished + {pending} queued jobs: "
                  f"median {median:.0f} ms, best {best:.0f} ms")  # fmt: skip
            start = time.perf_counter()
            deleted = await store.prune(
                finished_before=now - 6 * 86400, dead_before=now - 6 * 86400,
                workers_before=0, limit=BATCH,
            )  # fmt: skip
            took = time.perf_counter() - start
            print(f"prune: one batch of {deleted} jobs in {took * 1000:.0f} ms")
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.finished, args.pending))
