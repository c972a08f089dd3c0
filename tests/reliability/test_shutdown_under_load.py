"""SIGTERM during a burst of enqueues: every enqueue that returned is durable, every one
that raised said so clearly, and the process shuts down in bounded time.

A real subprocess runs workers plus eight producers enqueuing as fast as they can and
logs each id whose enqueue returned (flushed per line); the test SIGTERMs it mid-burst.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROC = Path(__file__).with_name("reliability_proc.py")
CLEAR = {"StoreError", "NotSerializable", "PayloadTooLarge", "ConfigurationError"}


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("burst_seconds", [0.3, 1.0, 2.5])
def test_sigterm_mid_burst_keeps_every_returned_enqueue(
    tmp_path: Path, burst_seconds: float
) -> None:
    db = tmp_path / "jobs.db"
    log = tmp_path / "ids.log"
    process = subprocess.Popen(
        [sys.executable, str(PROC), "burst", str(db), str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(burst_seconds)  # letting the real burst run
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0  # shutdown_timeout is 2 s; 30 s only guards a hang
        stderr = process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    lines = read_log(log)
    assert lines[-1] == "closed", "the process did not close its Jobs"
    returned = [line.split()[1] for line in lines if line.startswith("ok ")]
    errors = [line for line in lines if line.startswith("error ")]
    assert len(returned) > 50, "the burst did not get going"
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM asyncjobs_jobs")}
        running = conn.execute(
            "SELECT count(*) FROM asyncjobs_jobs WHERE status = 'running'"
        ).fetchone()[0]
    conn.close()
    lost = [job_id for job_id in returned if job_id not in stored]
    assert lost == [], f"{len(lost)} enqueues returned but their jobs are not stored"
    assert len(set(returned)) == len(returned)
    for error in errors:
        assert error.split()[1] in CLEAR, f"unclear enqueue error: {error}"
    assert running == 0, "jobs cut off by shutdown must be released, not left running"
    assert "Traceback" not in stderr, stderr[-3000:]
    print(
        f"shutdown after {burst_seconds}s: {len(returned)} returned, {len(errors)} refused, 0 lost"
    )
