"""Chaos soak: a producer and two workers share one store while a driver kill -9s a random
worker every 0.4-0.8 s (at least 20 kills) and restarts it.

At the end every enqueued job has succeeded, and every job that ran more than once was
interrupted by a kill: each earlier run happened in a process that was then killed.
Runs on SQLite, and on PostgreSQL when ``ASYNCJOBS_TEST_POSTGRES_DSN`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from asyncjobs import Jobs

pytestmark = pytest.mark.slow

PROC = Path(__file__).with_name("reliability_proc.py")
SOAK_SECONDS = 16.0
MIN_KILLS = 20


@dataclass
class Soak:
    url: str
    folder: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    errors: BinaryIO | None = None

    @property
    def events(self) -> Path:
        return self.folder / "events"

    @property
    def stop_file(self) -> Path:
        return self.folder / "stop"

    def start_worker(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(PROC), "worker", self.url, str(self.events), str(self.stop_file)],
            stdout=subprocess.DEVNULL,
            stderr=self.errors,
        )

    def kill(self, index: int) -> None:
        process = self.workers[index]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.killed.add(process.pid)
        self.workers[index] = self.start_worker()

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.kill()
            process.wait(10)
        if self.errors is not None:
            self.errors.close()


def runs(events: Path) -> dict[str, list[tuple[str, int, int]]]:
    """job id -> [(kind, attempt, pid)] from every worker's event log."""
    found: dict[str, list[tuple[str, int, int]]] = collections.defaultdict(list)
    for log in events.glob("*.log"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:  # a line cut by kill -9 has fewer parts
                kind, job_id, attempt, pid = parts
                found[job_id].append((kind, int(attempt), int(pid)))
    return found


def statuses_sqlite(url: str, ids: list[str]) -> dict[str, str]:
    with sqlite3.connect(url) as db:
        rows = db.execute("SELECT id, status FROM asyncjobs_jobs").fetchall()
    db.close()
    return {job_id: status for job_id, status in rows if job_id in set(ids)}


async def statuses_postgres(url: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, status FROM asyncjobs_jobs")
    finally:
        await conn.close()
    return {r["id"]: r["status"] for r in rows}


@pytest.fixture(params=["sqlite", "postgres"])
def soak_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "chaos.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


async def create_schema(url: str) -> None:
    jobs = Jobs(url, workers=False)
    await jobs.store.open()  # once, before the processes race for it
    await jobs.close()


def statuses(url: str, ids: list[str]) -> dict[str, str]:
    if url.startswith("postgres"):
        return asyncio.run(statuses_postgres(url))
    return statuses_sqlite(url, ids)


def test_kill_9_a_random_worker_again_and_again_loses_nothing(
    soak_url: str, tmp_path: Path
) -> None:
    asyncio.run(create_schema(soak_url))

    soak = Soak(soak_url, tmp_path, errors=(tmp_path / "workers.err").open("ab"))
    soak.events.mkdir()
    ids_file = tmp_path / "ids.log"
    rng = random.Random(9)
    producer = subprocess.Popen(
        [sys.executable, str(PROC), "producer", soak_url, str(ids_file), str(SOAK_SECONDS)],
    )
    try:
        soak.workers = [soak.start_worker(), soak.start_worker()]
        deadline = time.monotonic() + SOAK_SECONDS  # noqa: TID251 - real processes
        kills = 0
        while time.monotonic() < deadline or kills < MIN_KILLS:  # noqa: TID251
            time.sleep(rng.uniform(0.4, 0.8))  # real processes, real time
            soak.kill(rng.randrange(2))
            kills += 1
        assert producer.wait(60) == 0
        produced = ids_file.read_text().splitlines()
        ids = [line for line in produced if not line.startswith("error ")]
        for line in produced:  # the store may refuse an enqueue, clearly, during an outage
            assert not line.startswith("error ") or line.split()[1] == "StoreError", line
        assert len(ids) > 200, "the producer did not get going"

        finished: dict[str, str] = {}
        end = time.monotonic() + 40  # noqa: TID251 - real processes
        while time.monotonic() < end:  # noqa: TID251
            finished = statuses(soak_url, ids)
            if sum(1 for i in ids if finished.get(i) == "succeeded") == len(ids):
                break
            time.sleep(0.2)  # waiting for real workers to drain
        soak.stop_file.touch()
        for process in soak.workers:
            assert process.wait(30) == 0
    finally:
        soak.close()
        if producer.poll() is None:
            producer.kill()
        producer.wait(10)

    not_done = {i: finished.get(i) for i in ids if finished.get(i) != "succeeded"}
    assert not_done == {}, f"{len(not_done)} of {len(ids)} jobs did not succeed: {not_done}"

    history = runs(soak.events)
    assert set(ids) <= set(history), "a job succeeded without a recorded run"
    interrupted = 0
    for job_id in ids:
        starts = [(attempt, pid) for kind, attempt, pid in history[job_id] if kind == "start"]
        done = {(attempt, pid) for kind, attempt, pid in history[job_id] if kind == "done"}
        if len(starts) > 1:
            # every run but the last was cut off by a kill of its process
            for attempt, pid in sorted(starts)[:-1]:
                assert pid in soak.killed, (
                    f"job {job_id} ran again after attempt {attempt} in pid {pid}, "
                    f"which was never killed: {history[job_id]}"
                )
                interrupted += (attempt, pid) not in done
    report: dict[str, Any] = {
        "kills": kills,
        "jobs": len(ids),
        "reruns": sum(1 for i in ids if len(history[i]) > 2),
        "reruns_without_completion": interrupted,
    }
    print(f"chaos {'postgres' if soak_url.startswith('postgres') else 'sqlite'}: {report}")
    assert "Traceback" not in (tmp_path / "workers.err").read_text()
    assert kills >= MIN_KILLS
