"""How long ``Store.snapshot`` (behind ``jobs.stats()`` and /metrics) and one pruning
batch take on a SQLite store holding many finished jobs.

    .venv/bin/python bench/bench_ops.py --finished 1000000 --pending 20000 --dead-every 10
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


def fill(path: Path, finished: int, pending: int, dead_every: int, now: float) -> None:
    db = sqlite3.connect(path)
    rows = []
    for i in range(finished):
        # Succeeded jobs spread over a week of retention, dead ones over 30 days (the
        # longer dead_retention): most dead jobs are older than any succeeded one.
        status = "dead" if i % dead_every == 0 else "succeeded"
        done = now - random.random() * (30 if status == "dead" else 7) * 86400
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


async def main(finished: int, pending: int, dead_every: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        store = SQLiteStore(path)
        await store.open()
        await store.close()
        now = time.time()
        fill(path, finished, pending, dead_every, now)
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
            # Dead jobs are kept longer than the others (dead_retention): a batch of
            # succeeded jobs due for pruning, and a prune with nothing due, must not
            # walk past the dead jobs still kept; then a batch that takes both.
            cases = [
                ("nothing due", now - 8 * 86400, now - 31 * 86400),
                ("succeeded due, every dead job kept", now - 6 * 86400, now - 30 * 86400),
                ("succeeded and dead due", now - 6 * 86400, now - 20 * 86400),
            ]
            for name, finished_before, dead_before in cases:
                start = time.perf_counter()
                deleted = await store.prune(
                    finished_before=finished_before, dead_before=dead_before,
                    workers_before=0, limit=BATCH,
                )  # fmt: skip
                took = time.perf_counter() - start
                print(f"prune, {name}: one batch of {deleted} jobs in {took * 1000:.1f} ms")
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--dead-every", type=int, default=50, help="one finished job in N is dead")
    args = parser.parse_args()
    asyncio.run(main(args.finished, args.pending, args.dead_every))
