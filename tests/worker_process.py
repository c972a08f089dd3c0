"""A real worker process (``tests/crash/crash_worker.py``) on any store, for the crash,
multi-process and PostgreSQL tests. Each run of task ``record`` appends its job id to
the process's own runs file (line-buffered, so it survives kill -9)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

WORKER = Path(__file__).parent / "crash" / "crash_worker.py"


class Worker:
    def __init__(self, store: str, folder: Path, name: str, *extra: str) -> None:
        self.runs = folder / f"{name}.runs"
        self.ready = folder / f"{name}.ready"
        self.stop_file = folder / f"{name}.stop"
        self.stderr = folder / f"{name}.stderr"
        for path in (self.ready, self.stop_file):
            path.unlink(missing_ok=True)
        with self.stderr.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), store, "--runs", str(self.runs),
                 "--ready", str(self.ready), "--stop", str(self.stop_file), *extra],
                stderr=err,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 15) -> None:
        wait_for(lambda: self.ready.exists() or self.process.poll() is not None, timeout)
        assert self.process.poll() is None, self.stderr.read_text()

    def stop(self, timeout: float = 15) -> int:
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
