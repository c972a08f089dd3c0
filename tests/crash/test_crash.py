"""Crash tests with real processes: kill -9 mid-run, and a poison pill.

They wait in real time (bounded): a killed worker's lease has to expire, so the
workers use a 2 s visibility timeout.
"""

from __future__ import annotations

import collections
import signal
import sqlite3
from pathlib import Path

import pytest
from crash_processes import enqueue, status_counts
from worker_process import Worker, wait_for

pytestmark = pytest.mark.slow


def test_kill_9_mid_run_then_restart_and_every_job_completes(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    ids = enqueue(db, "record", [(i,) for i in range(300)])
    first = Worker(str(db), db.parent, "first", "--visibility-timeout", "2", "--work", "0.005")
    try:
        first.wait_ready()
        wait_for(lambda: len(first.run_ids()) >= 60, timeout=15)
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(10) == -signal.SIGKILL
    finally:
        first.kill()
    counts = status_counts(db)
    assert counts.get("succeeded", 0) < 300  # killed in the middle
    in_flight = counts.get("running", 0)

    second = Worker(str(db), db.parent, "second", "--visibility-timeout", "2", "--work", "0.005")
    try:
        wait_for(lambda: status_counts(db).get("succeeded", 0) == 300, timeout=20)
        assert second.stop() == 0
    finally:
        second.kill()
    assert status_counts(db) == {"succeeded": 300}
    runs = collections.Counter(first.run_ids() + second.run_ids())
    assert set(runs) == set(ids)
    # Only jobs cut off by the kill may have run twice, and none more than that.
    assert max(runs.values()) <= 2
    assert sum(1 for n in runs.values() if n == 2) <= in_flight
    with sqlite3.connect(db) as conn:
        attempts = dict(conn.execute("SELECT id, attempts FROM asyncjobs_jobs").fetchall())
    conn.close()
    assert sum(1 for n in attempts.values() if n == 2) == in_flight
    assert set(attempts.values()) <= {1, 2}
    assert "Traceback" not in second.stderr.read_text()


def test_kill_9_with_jobs_dispatched_locally_then_restart_runs_each_one(
    tmp_path: Path,
) -> None:
    """Jobs a worker enqueued itself go straight to its free slots, inserted running
    (no claim); after kill -9 their leases expire and another worker runs them."""
    db = tmp_path / "jobs.db"
    first = Worker(
        str(db), db.parent, "first", "--visibility-timeout", "2", "--work", "2",
        "--concurrency", "20", "--enqueue", "40",
    )  # fmt: skip
    try:
        first.wait_ready()
        ids = (db.parent / "first.ready").read_text().split()
        assert len(ids) == 40
        with sqlite3.connect(db) as conn:
            # Dispatched at enqueue: started in the insert itself, at its very time.
            running, dispatched = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE started_at = enqueued_at) "
                "FROM asyncjobs_jobs WHERE status = 'running'"
            ).fetchone()
        conn.close()
        assert dispatched == 20  # every free slot; the others were claimed ahead or wait
        assert running >= 20
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(10) == -signal.SIGKILL
    finally:
        first.kill()
    counts = status_counts(db)
    assert (counts["succeeded"], counts["running"] + counts.get("queued", 0)) == (1, 40)

    second = Worker(str(db), db.parent, "second", "--visibility-timeout", "2")
    try:
        wait_for(lambda: status_counts(db).get("succeeded", 0) == 41, timeout=20)
        assert second.stop() == 0
    finally:
        second.kill()
    assert status_counts(db) == {"succeeded": 41}  # and the ping
    assert set(first.run_ids() + second.run_ids()) == set(ids)
    assert "Traceback" not in second.stderr.read_text()


def test_a_task_that_kills_its_process_every_time_ends_dead(tmp_path: Path) -> None:
    """The attempt counter rises at claim, so a poison pill cannot loop forever."""
    db = tmp_path / "jobs.db"
    (job_id,) = enqueue(db, "poison", [()])
    workers: list[Worker] = []
    try:
        for n in range(3):  # retries=2: three attempts, each kills its worker
            worker = Worker(str(db), db.parent, f"w{n}", "--visibility-timeout", "1")
            workers.append(worker)
            assert worker.process.wait(15) == 3
        last = Worker(str(db), db.parent, "last", "--visibility-timeout", "1")
        workers.append(last)
        wait_for(lambda: status_counts(db) == {"dead": 1}, timeout=15)
        assert last.stop() == 0
    finally:
        for worker in workers:
            worker.kill()
    with sqlite3.connect(db) as conn:
        attempts, error = conn.execute(
            "SELECT attempts, error FROM asyncjobs_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    conn.close()
    assert attempts == 3
    assert "lease expired" in error
    assert sum(len(w.run_ids()) for w in workers) == 3
