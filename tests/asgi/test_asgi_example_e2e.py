"""End to end: the example app under a real uvicorn process, stopped with SIGTERM.

Real processes and real time: every wait is bounded and polls (``# noqa: TID251``).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout  # noqa: TID251 - waiting on a real process
    while not condition():
        if time.monotonic() > deadline:  # noqa: TID251 - waiting on a real process
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"uvicorn exited early:\n{self.log.read_text()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def status(self, job_id: str) -> str:
        return str(self.client.get(f"/jobs/{job_id}").json()["status"])

    def terminate(self, timeout: float) -> None:
        """SIGTERM; uvicorn must shut down gracefully (lifespan included) within ``timeout``."""
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        log = self.log.read_text()
        # uvicorn re-raises the signal it caught once shutdown is complete.
        assert code in (0, -signal.SIGTERM), log
        assert "Application shutdown complete" in log, log


@contextmanager
def example_server(tmp_path: Path, name: str, **env: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"{name}.log"
    environ = {**os.environ, "APP_DB": str(tmp_path / "app.db"), "EMAIL_RATE": "1000/s", **env}
    environ.pop("ASYNCJOBS_URL", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.starlette_app.app:app",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, port, log)
    try:
        wait_until(server.up, 20, "the example app to start")
        yield server
    finally:
        server.client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def signup(server: Server, email: str) -> httpx.Response:
    return server.client.post("/signup", json={"email": email})


def stored(tmp_path: Path) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """Each job's (status, attempts), and how many deliveries each job recorded."""
    with sqlite3.connect(tmp_path / "app.db") as db:
        jobs = {
            job_id: (status, attempts)
            for job_id, status, attempts in db.execute(
                "SELECT id, status, attempts FROM asyncjobs_jobs"
            )
        }
        deliveries = dict(
            db.execute("SELECT job_id, count(*) FROM deliveries GROUP BY job_id").fetchall()
        )
    return jobs, deliveries


def test_sigterm_lets_running_jobs_finish_within_shutdown_timeout(tmp_path: Path) -> None:
    with example_server(
        tmp_path, "run", EMAIL_FAILURE_RATE="0", EMAIL_DELAY="1.0", SHUTDOWN_TIMEOUT="10"
    ) as server:
        responses = [signup(server, f"user{i}@example.com") for i in range(6)]
        assert [r.status_code for r in responses] == [202] * 6
        assert signup(server, "user0@example.com").status_code == 409  # rolled back: no job
        job_ids = [r.json()["job_id"] for r in responses]
        wait_until(lambda: all(server.status(j) == "running" for j in job_ids), 10, "jobs to run")
        server.terminate(timeout=15)

    jobs, deliveries = stored(tmp_path)
    assert jobs == dict.fromkeys(job_ids, ("succeeded", 1))
    assert deliveries == dict.fromkeys(job_ids, 1)


def test_jobs_cut_off_by_a_short_shutdown_timeout_run_once_after_a_restart(
    tmp_path: Path,
) -> None:
    with example_server(
        tmp_path, "first", EMAIL_FAILURE_RATE="0", EMAIL_DELAY="30", SHUTDOWN_TIMEOUT="0.3"
    ) as server:
        job_ids = [signup(server, f"user{i}@example.com").json()["job_id"] for i in range(4)]
        wait_until(lambda: all(server.status(j) == "running" for j in job_ids), 10, "jobs to run")
        server.terminate(timeout=10)

    jobs, deliveries = stored(tmp_path)
    # Released without spending an attempt, nothing delivered.
    assert jobs == dict.fromkeys(job_ids, ("queued", 0))
    assert deliveries == {}

    with example_server(
        tmp_path, "second", EMAIL_FAILURE_RATE="0", EMAIL_DELAY="0.05", SHUTDOWN_TIMEOUT="10"
    ) as server:
        wait_until(
            lambda: all(server.status(j) == "succeeded" for j in job_ids), 15, "jobs to finish"
        )
        server.terminate(timeout=15)

    jobs, deliveries = stored(tmp_path)
    assert jobs == dict.fromkeys(job_ids, ("succeeded", 1))
    assert deliveries == dict.fromkeys(job_ids, 1)  # none lost, none twice


FAILING_APP = """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from asyncjobs import Jobs, JobsMiddleware

    jobs = Jobs("sqlite:///{path}")
    app = Starlette(middleware=[Middleware(JobsMiddleware, jobs=jobs)])
"""


FAILING_LIFESPAN_APP = """
    from starlette.applications import Starlette

    from asyncjobs import Jobs

    jobs = Jobs("sqlite:///{path}")
    app = Starlette(lifespan=jobs.lifespan)
"""


@pytest.mark.parametrize("app", [FAILING_APP, FAILING_LIFESPAN_APP], ids=["middleware", "lifespan"])
def test_server_refuses_to_start_when_the_store_cannot_be_opened(tmp_path: Path, app: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    (tmp_path / "failing_app.py").write_text(textwrap.dedent(app).format(path=blocker / "jobs.db"))
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "failing_app:app", "--app-dir", str(tmp_path),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Application startup failed" in result.stderr
    assert f"asyncjobs could not start: cannot open the SQLite store at {blocker}" in result.stderr


SLOW_APP = """
    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncjobs import Jobs, JobsMiddleware

    jobs = Jobs("sqlite:///{path}")

    @jobs.task(name="long", retries=0)
    async def long() -> None:
        await anyio.sleep(60)

    async def enqueue(request):
        return JSONResponse({{"id": (await jobs.enqueue("long")).id}})

    async def slow(request):
        await anyio.Path("{started}").touch()
        await anyio.sleep(60)
        return JSONResponse({{}})

    app = Starlette(
        routes=[Route("/enqueue", enqueue, methods=["POST"]), Route("/slow", slow)],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
"""


def test_a_forced_exit_still_gives_running_jobs_back_unspent(tmp_path: Path) -> None:
    """A second Ctrl-C while uvicorn waits for requests skips the lifespan shutdown; the
    event loop then cancels every task, the workers' too: they still release their jobs."""
    db = tmp_path / "jobs.db"
    started = tmp_path / "request-started"
    app = textwrap.dedent(SLOW_APP).format(path=db, started=started)
    (tmp_path / "slow_app.py").write_text(app)
    port, log = free_port(), tmp_path / "slow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "slow_app:app", "--app-dir", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, port, log)
    try:
        wait_until(lambda: "Uvicorn running on" in log.read_text(), 20, "the server to listen")
        job_id = server.client.post("/enqueue").json()["id"]

        def job() -> tuple[str, int]:
            with sqlite3.connect(db) as conn:
                row = conn.execute(
                    "SELECT status, attempts FROM asyncjobs_jobs WHERE id = ?", (job_id,)
                ).fetchone()
            return str(row[0]), int(row[1])

        wait_until(lambda: job()[0] == "running", 10, "the job to run")
        in_flight = subprocess.Popen(
            [sys.executable, "-c", f"import httpx; httpx.get('{server.url}/slow', timeout=60)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(started.exists, 10, "the request to be in flight")
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: "Waiting for connections" in log.read_text(), 10, "the wait")
            proc.send_signal(signal.SIGINT)  # "CTRL+C to force quit"
            proc.wait(timeout=20)
        finally:
            in_flight.kill()
            in_flight.wait()
    finally:
        server.client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Application shutdown" not in log.read_text()  # the lifespan shutdown was skipped
    assert job() == ("queued", 0), log.read_text()  # released, its one attempt unspent
