"""Start and watch real worker processes (tests/crash/crash_worker.py) on one SQLite file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from asyncjobs import Jobs, JobSpec

WORKER = Path(__file__).with_name("crash_worker.py")


class Worker:
    def __init__(self, db: Path, name: str, *extra: str) -> None:
        self.runs = db.parent / f"{name}.runs"
        self.ready = db.parent / f"{name}.ready"
        self.stop_file = db.parent / f"{name}.stop"
        self.stderr = db.parent / f"{name}.stderr"
        for path in (self.ready, self.stop_file):
            path.unlink(missing_ok=True)
        with self.stderr.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), str(db), "--runs", str(self.runs),
                 "--ready", str(self.ready), "--stop", str(self.stop_file), *extra],
                stderr=err,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 15) -> None:
        wait_for(lambda: self.ready.exists() or self.process.poll() is not None, timeout)
        assert self.process.poll() is None, self.stderr.read_text()

    def stop(self, timeout: float = 10) -> int:
        self.stop_file.touch()
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def run_ids(self) -> list[str]:
        return self.runs.read_text().split() if self.runs.exists() else []


def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout  # noqa: TID251 - waiting on real processes
    while not check():
        if time.monotonic() > deadline:  # noqa: TID251 - waiting on real processes
            raise TimeoutError(f"gave up after {timeout}s")
        time.sleep(0.02)


def status_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute("SELECT status, count(*) FROM asyncjobs_jobs GROUP BY status")
        counts = dict(rows.fetchall())
    conn.close()
    return counts


def enqueue(db: Path, task: str, args: list[tuple[object, ...]]) -> list[str]:
    """Enqueue jobs by task name from this (test) process, in batches of 200."""

    async def go() -> list[str]:
        jobs = Jobs(str(db), workers=False)
        ids: list[str] = []
        try:
            for start in range(0, len(args), 200):
                specs: list[JobSpec[object]] = [
                    JobSpec(task=task, args=a) for a in args[start : start + 200]
                ]
                ids += [job.id for job in await jobs.enqueue_many(specs)]
        finally:
            await jobs.close()
        return ids

    return anyio.run(go)
