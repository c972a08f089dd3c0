"""What one durable job costs in CPU, without HTTP: where the HTTP gap lives.

Run: ``.venv/bin/python bench/bench_per_job.py`` (``--help`` for sizes). Two parts, each
against a baseline measured in the same run (rounds alternate):

1. In process, ``--producers`` tasks each loop on one call, as concurrent requests would:
   - ``background``: ``loop.create_task(job(n))`` and yield once (what Starlette's
     ``BackgroundTasks`` amounts to: the job runs in this process, nothing is stored);
   - ``enqueue-only``: ``await jobs.enqueue(job, n)`` with ``Jobs(workers=False)``;
   - ``enqueue+run``: the same with the workers running the jobs in this process.
   Reported: process CPU per job (all threads), and the extra over ``background``.
2. The store's own statements for one job in batches of ``--batch`` (a group commit of
   that many requests), on a plain ``sqlite3`` connection to a file with the real schema:
   the insert of jobs dispatched at once (running, ``RETURNING`` their seq), the write of
   their successes, and a claim that finds nothing. Baseline: the same rows inserted into
   a table with the same columns and no index. Two alternatives to the group commit's
   writes, each against them: the last batch's outcomes written in the next batch's
   insert transaction, and each insert in a transaction of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from asyncjobs import Jobs
from asyncjobs._models import new_job_id
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.stores._outcomes import Outcome, OutcomeKind
from asyncjobs.stores._sqlite_claim import _claim
from asyncjobs.stores._sqlite_finish import _finish
from asyncjobs.stores._sqlite_schema import migrate
from asyncjobs.stores._sqlite_sql import insert_jobs

# -- part 1: in process ----------------------------------------------------------------


class _Count:
    """Jobs run (or enqueued); ``done`` is set when the round's last one is counted."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.value = 0
        self.done = asyncio.Event()

    def add(self) -> None:
        self.value += 1
        if self.value == self.total:
            self.done.set()


async def in_process(mode: str, directory: Path, producers: int, per_producer: int) -> float:
    """Process CPU (µs) per job while ``producers`` tasks each make ``per_producer``
    calls in a loop, until the round's last job ran (``enqueue-only``: was enqueued)."""
    count = _Count(producers * per_producer)

    async def job(n: int) -> None:
        if mode != "enqueue-only":
            count.add()

    async def measure(produce: Callable[[], Awaitable[None]]) -> float:
        async def producer() -> None:
            for _ in range(per_producer):
                await produce()

        start = time.process_time()
        await asyncio.gather(*(producer() for _ in range(producers)))
        await count.done.wait()
        return (time.process_time() - start) / count.total * 1e6

    if mode == "background":
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def spawn() -> None:
            task = loop.create_task(job(1))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)  # the request suspends once

        return await measure(spawn)

    path = directory / f"{mode}-{time.perf_counter_ns()}.db"
    jobs = Jobs(f"sqlite:///{path}", concurrency=50, workers=mode == "enqueue+run")
    record = jobs.task(name="record")(job)

    async def enqueue() -> None:
        await jobs.enqueue(record, 1)
        if mode == "enqueue-only":
            count.add()

    async with jobs:
        return await measure(enqueue)


# -- part 2: the store's statements ------------------------------------------------------

_PLAIN = """CREATE TABLE plain (seq INTEGER PRIMARY KEY, id TEXT, task TEXT, queue TEXT,
    status TEXT, priority INTEGER, payload TEXT, options TEXT, max_attempts INTEGER,
    run_at REAL, enqueued_at REAL, idempotency_key TEXT, group_key TEXT, chain_next TEXT,
    batch_id TEXT, rate_key TEXT, attempts INTEGER, started_at REAL, lease_until REAL,
    worker TEXT)"""
_PLAIN_INSERT = "INSERT INTO plain VALUES (NULL" + ", ?" * 19 + ")"


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _insert_and_finish(
    db: sqlite3.Connection, new: list[NewJob], outcomes: list[Outcome], now: float
) -> None:
    insert_jobs(db, new, now)
    _finish(db, outcomes, now)


def statements(directory: Path, batch: int, batches: int) -> dict[str, float]:
    """µs per job of each statement, the commit included, and of the baseline."""
    db = _connect(directory / f"store-{time.perf_counter_ns()}.db")
    db.execute("BEGIN IMMEDIATE")
    migrate(db)
    db.execute(_PLAIN)
    db.execute("COMMIT")
    request = ClaimRequest(
        worker="w", tasks={"record": TaskLimits(max_attempts=4)}, queues=None, limit=50,
        lease=60.0, queue_concurrency={}, limiters={}, ahead=0,
    )  # fmt: skip
    spent = dict.fromkeys(
        ("plain insert", "insert", "finish", "empty claim", "insert+finish", "insert alone"), 0.0
    )

    def timed(name: str, write: Callable[..., object], *args: object) -> None:
        start = time.process_time()
        db.execute("BEGIN IMMEDIATE")
        write(*args)
        db.execute("COMMIT")
        spent[name] += time.process_time() - start

    pending: list[Outcome] = []  # "insert+finish": the last batch's outcomes
    for _ in range(batches):
        now = time.time()
        new = [
            NewJob(id=new_job_id(now), task="record", queue="default", payload='{"args":[1]}',
                   status="running", priority=0, run_at=now, max_attempts=4, worker="w",
                   lease=60)
            for _ in range(batch)
        ]  # fmt: skip
        plain = [(j.id, j.task, j.queue, j.status, 0, j.payload, None, 4, now, now, None, None,
                  None, None, None, 1, now, j.lease_end(now), j.worker) for j in new]  # fmt: skip
        timed("plain insert", db.executemany, _PLAIN_INSERT, plain)
        timed("insert", insert_jobs, db, new, now)
        outcomes = [
            Outcome(job_id=j.id, worker="w", attempt=1, kind=OutcomeKind.SUCCEEDED) for j in new
        ]
        timed("finish", _finish, db, outcomes, now)
        timed("empty claim", _claim, db, request, now)
        # The outcomes of the previous batch written in this batch's insert transaction,
        # as if they rode with the next group commit (against insert + finish above).
        later = [j._replace(id=new_job_id(now)) for j in new]
        timed("insert+finish", _insert_and_finish, db, later, pending, now)
        pending = [o._replace(job_id=j.id) for o, j in zip(outcomes, later, strict=True)]
        # Each enqueue committed alone: no group commit for a request to wait on.
        for job in (j._replace(id=new_job_id(now)) for j in new):
            timed("insert alone", insert_jobs, db, [job], now)
    db.close()
    per_job = {name: s / (batch * batches) * 1e6 for name, s in spent.items()}
    per_job["empty claim"] *= batch  # one claim per batch: report it per claim
    return per_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=40_000, help="jobs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    per_producer = args.jobs // args.producers

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        modes = ("background", "enqueue-only", "enqueue+run")
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                cpu[mode].append(
                    asyncio.run(in_process(mode, directory, args.producers, per_producer))
                )
        print(f"in process: {args.producers} producers, {per_producer * args.producers:,} "
              f"jobs a round, {args.rounds} rounds; process CPU per job (median)")  # fmt: skip
        base = statistics.median(cpu["background"])
        for mode in modes:
            value = statistics.median(cpu[mode])
            extra = "" if mode == "background" else f"  (+{value - base:.1f} over background)"
            rounds = ", ".join(f"{v:.1f}" for v in cpu[mode])
            print(f"  {mode:>12}: {value:6.1f} µs{extra}   rounds {rounds}")

        runs = [statements(directory, args.batch, args.batches) for _ in range(args.rounds)]
        print(f"\nthe store's statements, batches of {args.batch} ({args.batches:,} batches, "
              f"commit included, median of {args.rounds})")  # fmt: skip
        plain = statistics.median(r["plain insert"] for r in runs)
        print(f"  {'plain insert':>12}: {plain:6.2f} µs per job  (the baseline: no index)")
        for name in ("insert", "finish"):
            value = statistics.median(r[name] for r in runs)
            print(f"  {name:>12}: {value:6.2f} µs per job  ({value / plain:.1f}x the plain insert)")
        value = statistics.median(r["empty claim"] for r in runs)
        print(f"  {'empty claim':>12}: {value:6.2f} µs per claim")
        apart = statistics.median(r["insert"] + r["finish"] for r in runs)
        value = statistics.median(r["insert+finish"] for r in runs)
        print(f"  insert, and the last batch's finish, in one transaction: {value:6.2f} µs per "
              f"job ({value / apart:.2f}x the two apart, {apart:.2f} µs)")  # fmt: skip
        value = statistics.median(r["insert alone"] for r in runs)
        batched = statistics.median(r["insert"] for r in runs)
        print(f"  each insert in a transaction of its own: {value:6.2f} µs per job "
              f"({value / batched:.1f}x in batches)")  # fmt: skip


if __name__ == "__main__":
    main()
