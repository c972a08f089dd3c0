"""Two worker processes share one SQLite file: claims are atomic, nothing runs twice,
and no "database is locked" reaches anyone."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from crash_processes import enqueue, status_counts
from worker_process import Worker, wait_for

pytestmark = pytest.mark.slow


def test_two_processes_run_2000_jobs_and_none_twice(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    enqueue(db, "record", [(-1,)])  # create the schema before the workers race to
    # 5 ms jobs: one process alone would take a second, well past the other's first
    # poll. No-op jobs could all be drained by one process before the other wakes (a
    # claim takes up to 40 of them), and this test is about the two sharing the work.
    workers = [Worker(str(db), db.parent, f"p{n}", "--work", "0.005") for n in range(2)]
    try:
        for worker in workers:
            worker.wait_ready()
        # Enqueued from a third connection while both workers claim.
        ids = enqueue(db, "record", [(i,) for i in range(1999)])
        wait_for(lambda: status_counts(db).get("succeeded", 0) == 2000, timeout=60)
        assert [worker.stop() for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    assert status_counts(db) == {"succeeded": 2000}
    per_process = [worker.run_ids() for worker in workers]
    runs = collections.Counter(per_process[0] + per_process[1])
    assert len(runs) == 2000
    assert set(ids) <= set(runs)
    assert max(runs.values()) == 1  # no job ran twice
    assert all(per_process)  # both processes took part
    for worker in workers:
        errors = worker.stderr.read_text()
        assert "locked" not in errors
        assert "Traceback" not in errors
