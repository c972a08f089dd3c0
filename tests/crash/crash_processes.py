"""Helpers for worker processes on one SQLite file (the processes: ``worker_process``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio

from asyncjobs import Jobs, JobSpec


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
