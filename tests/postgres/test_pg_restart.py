"""PostgreSQL restarts under load and nothing is lost.

The test starts a PostgreSQL server of its own (``initdb`` into a temporary
directory, on a free port) and restarts that one, so it cuts no other test's
connections and can run beside them. It needs the PostgreSQL server binaries
(``initdb``, ``pg_ctl``); as root it runs them as the ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from asyncjobs import Jobs
from asyncjobs._errors import StoreError

pytestmark = pytest.mark.slow

JOBS = 1500


def server_bin() -> Path | None:
    """The newest directory holding ``initdb`` and ``pg_ctl``: on PATH, or Debian's."""
    on_path = shutil.which("initdb")
    found = [Path(on_path).parent] if on_path else []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [d.name for d in debian.iterdir() if d.name.isdigit()]
        found += [debian / v / "bin" for v in sorted(versions, key=int, reverse=True)]
    return next((d for d in found if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


def as_server_user() -> list[str]:
    """``initdb`` refuses root: run the server binaries as ``postgres`` there."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root with no `postgres` user to run a server as")
    return ["runuser", "-u", "postgres", "--"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A throwaway PostgreSQL server: trust auth on 127.0.0.1, no fsync."""

    def __init__(self, bindir: Path, home: Path) -> None:
        self.bindir, self.home, self.port = bindir, home, free_port()
        self.prefix = as_server_user()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *argv: str, check: bool = True) -> None:
        subprocess.run(
            [*self.prefix, str(self.bindir / argv[0]), *argv[1:]],
            check=check,
            capture_output=True,
            timeout=60,
        )

    def initdb(self) -> None:
        self.run("initdb", "-D", str(self.home / "data"), "-U", "postgres", "--auth=trust",
                 "--no-sync", "--encoding=UTF8", "--no-locale")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off"
        data, log = str(self.home / "data"), str(self.home / "server.log")
        self.run("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")

    def stop(self, check: bool = True) -> None:
        self.run("pg_ctl", "-D", str(self.home / "data"), "-m", "fast", "-w", "stop", check=check)


@pytest.fixture
def server() -> Iterator[Server]:
    bindir = server_bin()
    if bindir is None:
        pytest.skip("restarts a PostgreSQL server of its own: needs initdb and pg_ctl")
    home = Path(tempfile.mkdtemp(prefix="asyncjobs-pg-"))  # not tmp_path: `postgres` reads it
    try:
        if os.geteuid() == 0:
            shutil.chown(home, "postgres", "postgres")
        server = Server(bindir, home)
        server.initdb()
        server.start()
        try:
            yield server
        finally:
            server.stop(check=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def succeeded(url: str, ids: set[str]) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM asyncjobs_jobs WHERE status = 'succeeded' "
                "AND id = ANY($1::text[])",
                list(ids),
            )
        )
    finally:
        await conn.close()


async def test_a_server_restart_under_load_loses_nothing(server: Server) -> None:
    ran: set[int] = set()
    jobs = Jobs(server.url, concurrency=10, poll_interval=0.2, visibility_timeout=5)

    @jobs.task(name="record")
    async def record(i: int) -> None:
        ran.add(i)

    enqueued: set[str] = set()
    errors: list[StoreError] = []
    down = anyio.Event()
    back = anyio.Event()

    async def produce() -> None:
        i = 0
        while i < JOBS:
            try:
                job = await jobs.enqueue(record, i)
            except StoreError as error:  # the server is down: try again shortly
                errors.append(error)
                await anyio.sleep(0.05)  # noqa: TID251 - riding out a real outage
                continue
            enqueued.add(job.id)
            i += 1
            if i % 10 == 0:
                await anyio.sleep(0.01)  # noqa: TID251 - a steady stream, not one burst
            if i == JOBS // 3:
                down.set()

    async def restart() -> None:
        await down.wait()
        await anyio.to_thread.run_sync(server.stop)
        await anyio.sleep(1.0)  # noqa: TID251 - keep the server down for a moment
        await anyio.to_thread.run_sync(server.start)
        back.set()

    try:
        async with jobs:
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce)
                    tg.start_soon(restart)
                while True:
                    if await succeeded(server.url, enqueued) == len(enqueued):
                        break
                    await anyio.sleep(0.2)  # noqa: TID251 - waiting on real workers
    finally:
        if not back.is_set():
            await anyio.to_thread.run_sync(server.start)
        await jobs.close()
    assert len(enqueued) == JOBS
    assert ran == set(range(JOBS))
    assert errors, "enqueue never saw the server down"
    assert all("unreachable" in str(e) for e in errors), errors[0]
