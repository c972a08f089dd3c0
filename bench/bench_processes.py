"""Several processes on one SQLite file: what sharing the file costs.

Run: ``.venv/bin/python bench/bench_processes.py`` (``--help`` for sizes). Each round
starts P processes on a fresh file (1, 2 and 4 by default, alternating), each with
its workers running (``concurrency=20``) and ``--producers`` tasks that enqueue no-op
jobs as web requests would; the jobs are spread evenly over the processes. Once every
process is ready, the driver tells them to go and times until every job in the file
has succeeded.

Reported, median over the rounds:
- jobs per second, end to end (first enqueue to last job done), and its ratio to one
  process in the same run (the baseline): more processes share one write lock;
- each process's enqueue latency, p50 and p99 of all enqueues: an enqueue that finds
  the file locked by another process waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# -- one process (the child) -----------------------------------------------------------


def child(db: str, jobs_each: int, producers: int) -> None:
    from asyncjobs import Jobs

    jobs = Jobs("sqlite:///" + db, concurrency=20)

    @jobs.task(name="noop")
    async def noop(n: int) -> None:
        return None

    async def main() -> None:
        latencies: list[float] = []

        async def producer(count: int) -> None:
            for n in range(count):
                start = time.perf_counter()
                await jobs.enqueue(noop, n)
                latencies.append(time.perf_counter() - start)

        async with jobs:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # the driver's go
            share, extra = divmod(jobs_each, producers)
            await asyncio.gather(*(producer(share + (i < extra)) for i in range(producers)))
            print(json.dumps(latencies), flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # stop once every job is done

    asyncio.run(main())


# -- the driver ------------------------------------------------------------------------


def unfinished(db: str) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM asyncjobs_jobs WHERE status <> 'succeeded'"
        ).fetchone()
    return int(count)


def create(db: str) -> None:
    """Create the file's tables before the processes race to."""
    from asyncjobs import Jobs

    async def open_and_close() -> None:
        async with Jobs("sqlite:///" + db, workers=False) as jobs:
            await jobs.stats()

    asyncio.run(open_and_close())


def _send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None  # opened with stdin=PIPE
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _receive(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None  # opened with stdout=PIPE
    return proc.stdout.readline()


def one_round(directory: Path, processes: int, total: int, producers: int) -> dict[str, float]:
    db = str(directory / f"p{processes}-{time.perf_counter_ns()}.db")
    create(db)
    each = total // processes
    command = [sys.executable, __file__, "--child", db, "--jobs", str(each),
               "--producers", str(producers)]  # fmt: skip
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    try:
        if any(_receive(proc).strip() != "ready" for proc in children):
            raise SystemExit("a process did not start")
        start = time.perf_counter()
        for proc in children:
            _send(proc, "go")
        latencies = [s for proc in children for s in json.loads(_receive(proc))]
        while unfinished(db):
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        for proc in children:
            _send(proc, "stop")
        for proc in children:
            if proc.wait(timeout=60) != 0:
                raise SystemExit(f"a process exited with {proc.returncode}")
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
    latencies.sort()
    return {
        "jobs/s": each * processes / elapsed,
        "p50 ms": latencies[len(latencies) // 2] * 1e3,
        "p99 ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated; 1 first")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs a round, all processes")
    parser.add_argument("--producers", type=int, default=16, help="enqueuing tasks a process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.jobs, args.producers)
        return

    counts = [int(p) for p in args.processes.split(",")]
    results: dict[int, list[dict[str, float]]] = {p: [] for p in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for processes in counts:
                results[processes].append(
                    one_round(Path(tmp), processes, args.jobs, args.producers)
                )
    print(f"{args.jobs:,} no-op jobs a round, {args.producers} producers and concurrency 20 "
          f"a process, {args.rounds} rounds (medians)")  # fmt: skip
    base = statistics.median(r["jobs/s"] for r in results[counts[0]])
    for processes in counts:
        rate = statistics.median(r["jobs/s"] for r in results[processes])
        p50 = statistics.median(r["p50 ms"] for r in results[processes])
        p99 = statistics.median(r["p99 ms"] for r in results[processes])
        rounds = ", ".join(f"{r['jobs/s']:,.0f}" for r in results[processes])
        print(f"  {processes} process(es): {rate:8,.0f} jobs/s ({rate / base:.2f}x {counts[0]}), "
              f"enqueue p50 {p50:.2f} ms, p99 {p99:.2f} ms   rounds {rounds}")  # fmt: skip


if __name__ == "__main__":
    main()
