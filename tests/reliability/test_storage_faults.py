"""Storage faults: a full disk, a file locked by another process, a read-only file, a row
with a corrupt payload, PostgreSQL going away. Each gives a clear error or a visible dead
job; never a hung runner, a crash loop, or lost committed jobs.

These use real time (workers, leases, other processes); every wait is bounded.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import httpx
import pytest

from asyncjobs import Job, Jobs, JobStatus, StoreError
from asyncjobs.stores import SQLiteStore
from asyncjobs.testing import FakeClock, drain

pytestmark = pytest.mark.slow

BIG = "x" * 200_000  # needs ~50 new pages


def rows(path: Path, where: str = "1") -> int:
    with sqlite3.connect(path) as db:
        sql = "SELECT count(*) FROM asyncjobs_jobs WHERE " + where
        return int(db.execute(sql).fetchone()[0])


async def set_max_pages(store: SQLiteStore, pages: int | None) -> None:
    """Cap the file at its current size (``None``: lift the cap) on the store's writing
    connections: its thread's, and the event loop's for lone inserts (a full disk
    refuses every connection; this cap is per connection)."""

    def apply(db: sqlite3.Connection) -> None:
        if pages is None:
            db.execute("PRAGMA max_page_count = 1073741823")
            return
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (count,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {int(count) + pages}")

    await store._call(apply)
    if store._inline is not None:
        apply(store._inline._db)


async def wait_for(jobs: Jobs, job_id: str, status: JobStatus, seconds: float = 15) -> None:
    with anyio.fail_after(seconds):
        while True:
            info = await jobs.get(job_id)
            if info is not None and info.status == status:
                return
            await anyio.sleep(0.05)  # noqa: TID251 - polling real workers


# -- disk full -------------------------------------------------------------------------


async def test_disk_full_refuses_enqueue_clearly_and_the_runner_recovers(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    jobs = Jobs(str(path), store=store, visibility_timeout=1, poll_interval=0.05)

    @jobs.task(name="big_result")
    async def big_result(n: int, pad: str = "") -> str:
        return BIG + str(n)

    async with jobs:
        kept = await big_result.enqueue(0)
        await wait_for(jobs, kept.id, JobStatus.SUCCEEDED)
        await set_max_pages(store, 0)  # the disk is full

        before = rows(path)
        for _ in range(3):
            with pytest.raises(StoreError, match="full") as refused:
                await jobs.enqueue("big_result", int(BIG.count("x")), pad=BIG)
            assert isinstance(refused.value.__cause__, sqlite3.Error)
        assert rows(path) == before, "a refused enqueue left a row behind"

        # A small job still fits; its 200 KB result does not: the ack fails, the job is
        # not lost, and the runner keeps serving.
        small = await big_result.enqueue(1)
        await anyio.sleep(1.0)  # noqa: TID251 - let the ack fail at least once
        info = await small.info()
        assert info.status != JobStatus.SUCCEEDED
        assert jobs.started

        await set_max_pages(store, None)  # space freed
        await wait_for(jobs, small.id, JobStatus.SUCCEEDED)
        late = await jobs.enqueue("big_result", 2, pad=BIG)
        await wait_for(jobs, late.id, JobStatus.SUCCEEDED)
        assert (await kept.info()).status == JobStatus.SUCCEEDED
    await jobs.close()


# -- another process holds the write lock ------------------------------------------


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO asyncjobs_migrations VALUES (999999, 0)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None
    assert locker.stdout.readline().strip() == "locked"
    locker.stdout.close()
    return locker


async def test_enqueue_waits_out_a_short_write_lock_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), store=SQLiteStore(path, busy_timeout=0.5), workers=False)
    await jobs.enqueue("t", 0)
    locker = hold_write_lock(path, 0.8)
    try:
        with anyio.fail_after(10):
            job = await jobs.enqueue("t", 1)  # waits, then succeeds
        assert (await job.info()).args == [1]
    finally:
        locker.wait(10)
        await jobs.close()
    assert rows(path) == 2


async def test_a_long_write_lock_gives_a_clear_error_and_the_runner_survives(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path, busy_timeout=0.2)  # 5 tries: gives up after about 1 s
    jobs = Jobs(str(path), store=store, poll_interval=0.05, visibility_timeout=2)

    @jobs.task(name="echo")
    async def echo(n: int) -> int:
        return n

    async with jobs:
        first = await echo.enqueue(1)
        await wait_for(jobs, first.id, JobStatus.SUCCEEDED)
        locker = hold_write_lock(path, 4.0)
        try:
            with anyio.fail_after(10), pytest.raises(StoreError, match="locked"):
                await echo.enqueue(2)
            assert jobs.started, "the runner stopped while the file was locked"
        finally:
            await anyio.to_thread.run_sync(locker.wait, 10)
        second = await echo.enqueue(3)
        assert await second.result(timeout=15) == 3
    assert rows(path) == 2  # the refused job was never written
    await jobs.close()


# -- read-only file --------------------------------------------------------------------


def make_read_only(path: Path) -> None:
    """chmod for users; root ignores modes, so mark the file immutable (ext4) instead."""
    path.chmod(0o444)
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"running as root and chattr +i failed: {made.stderr!r}")


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
    path.chmod(0o644)


async def test_read_only_database_file_gives_a_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), workers=False)
    await jobs.enqueue("t", 1)
    await jobs.close()
    make_read_only(path)
    try:
        jobs = Jobs(str(path), workers=False)
        try:
            with anyio.fail_after(30), pytest.raises(StoreError) as refused:
                await jobs.enqueue("t", 2)
            message = str(refused.value)
            assert "readonly" in message or "read-only" in message, message
            assert str(path) in message
            assert [j.args for j in await jobs.list()] == [[1]]  # reading still works
        finally:
            await jobs.close()
        workers = Jobs(str(path))

        @workers.task(name="t")
        async def t(n: int) -> None: ...

        try:  # starting workers (which must write) fails at once, clearly
            with anyio.fail_after(30), pytest.raises(StoreError, match="readonly"):
                await workers.start()
            assert not workers.started
        finally:
            await workers.close()
    finally:
        make_writable(path)
    assert rows(path) == 1


async def test_a_read_only_folder_gives_a_store_error_that_names_it(tmp_path: Path) -> None:
    """A file closed by every process has no log beside it; in a folder this process
    cannot write to, SQLite cannot make one, and said only "unable to open database
    file" of a file that is there and readable."""
    folder = tmp_path / "jobs"
    path = folder / "jobs.db"
    jobs = Jobs(str(path), workers=False)
    await jobs.enqueue("t", 1)
    await jobs.close()
    make_read_only(folder)
    try:
        jobs = Jobs(str(path), workers=False)
        try:
            with anyio.fail_after(30), pytest.raises(StoreError) as refused:
                await jobs.enqueue("t", 2)
            message = str(refused.value)
            assert str(path) in message
            assert "jobs.db-wal" in message, message
            assert str(folder) in message.replace(str(path), ""), message
        finally:
            await jobs.close()
    finally:
        make_writable(folder)
        folder.chmod(0o755)  # a folder: searchable again
    assert rows(path) == 1


async def test_the_dashboard_still_shows_a_read_only_database(tmp_path: Path) -> None:
    """Its pages only read: a dashboard used before the file turned read-only (its
    CSRF key stored) shows them, as stats() and list() do, not a 500 on every page."""
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), workers=False)
    job = await jobs.enqueue("t", 1)
    auth = ("admin", "secret")
    transport = httpx.ASGITransport(app=jobs.dashboard(auth=auth))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", auth=auth) as client:
        assert (await client.get("/")).status_code == 200  # stores the CSRF key
    await jobs.close()
    make_read_only(path)
    try:
        jobs = Jobs(str(path), workers=False)
        try:
            transport = httpx.ASGITransport(app=jobs.dashboard(auth=auth))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://t", auth=auth
            ) as client:
                for page in ("/", "/jobs", f"/jobs/{job.id}"):
                    with anyio.fail_after(30):
                        response = await client.get(page)
                    assert response.status_code == 200, page
                assert job.id in response.text
        finally:
            await jobs.close()
    finally:
        make_writable(path)


# -- corrupt rows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("payload", "{not json"),
        ("payload", "[1, 2]"),
        ("payload", '{"args": 5}'),
        ("payload", b'{"args": [1]}'),  # a BLOB: SQLite keeps any type in any column
        ("options", "{broken"),
        ("options", "[]"),
    ],
)
async def test_a_corrupt_row_makes_the_job_dead_with_the_reason(
    tmp_path: Path, column: str, value: str | bytes
) -> None:
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), clock=FakeClock())

    @jobs.task(name="echo")
    async def echo(n: int) -> int:
        return n

    try:
        bad = await echo.enqueue(1)
        good = await echo.enqueue(2)
        with sqlite3.connect(path) as db:
            db.execute(f"UPDATE asyncjobs_jobs SET {column} = ? WHERE id = ?", (value, bad.id))
        await drain(jobs)
        info = await bad.info()
        assert info.status == JobStatus.DEAD
        assert info.error is not None
        assert "cannot be decoded" in info.error
        assert info.attempts == 1  # not retried: it can never decode
        assert await good.result(timeout=5) == 2
        assert len(await jobs.list()) == 2  # the corrupt row does not break listing
    finally:
        await jobs.close()


async def test_text_that_is_not_utf8_in_a_row_blocks_neither_its_queue_nor_the_listing(
    tmp_path: Path,
) -> None:
    """SQLite keeps whatever bytes another program wrote in a TEXT column. Reading them
    failed the whole claim (and every later one: the queue stopped) and every list."""
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), clock=FakeClock())

    @jobs.task(name="echo")
    async def echo(text: str) -> str:
        return text

    try:
        bad_payload = await echo.enqueue("caf")
        bad_error = await echo.enqueue("x")
        good = await echo.enqueue("ok")
        with sqlite3.connect(path) as db:
            sql = "UPDATE asyncjobs_jobs SET {} = CAST(? AS TEXT) WHERE id = ?"
            db.execute(sql.format("payload"), (b'{"args":["caf\xe9"]}', bad_payload.id))
            db.execute(sql.format("error"), (b"latin-1 \xe9", bad_error.id))
        db.close()
        await drain(jobs)
        assert await good.result(timeout=5) == "ok"
        info = await bad_payload.info()
        assert (info.status, info.attempts) == (JobStatus.DEAD, 1)  # not run with a guess
        assert "cannot be decoded" in (info.error or "")
        assert await bad_error.result(timeout=5) == "x"
        assert len(await jobs.list()) == 3
    finally:
        await jobs.close()


# -- PostgreSQL going away -------------------------------------------------------------


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_unreachable_postgres_gives_a_clear_store_error_quickly() -> None:
    pytest.importorskip("asyncpg")
    jobs = Jobs("postgresql://asyncjobs@127.0.0.1:9/none", workers=False)
    try:
        with anyio.fail_after(60), pytest.raises(StoreError) as refused:
            await jobs.enqueue("t", 1)
        assert "PostgreSQL" in str(refused.value)
    finally:
        await jobs.close()


async def result_through_outages(job: Job[int]) -> int:
    """``job.result`` polls the store: while it reconnects, polling may raise StoreError."""
    with anyio.fail_after(30):
        while True:
            try:
                return await job.result(timeout=30)
            except StoreError:
                await anyio.sleep(0.2)  # noqa: TID251 - waiting out the reconnect backoff


@pytest.fixture
def pg_app_url(postgres_url: str) -> tuple[str, str]:
    name = f"asyncjobs_rel_{uuid.uuid4().hex[:10]}"
    return with_query(postgres_url, application_name=name), name


async def test_postgres_connections_cut_mid_run_lose_nothing(
    pg_app_url: tuple[str, str], postgres_url: str
) -> None:
    import asyncpg

    url, name = pg_app_url
    jobs = Jobs(url, poll_interval=0.05, visibility_timeout=2)

    @jobs.task(name="echo")
    async def echo(n: int) -> int:
        return n

    admin = await asyncpg.connect(postgres_url)
    try:
        async with jobs:
            before = [await echo.enqueue(i) for i in range(20)]
            cut = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                name,
            )
            assert cut >= 1
            after: list[Job[int]] = []
            refusals: list[str] = []
            for i in range(20, 40):
                with anyio.fail_after(30):
                    try:
                        after.append(await echo.enqueue(i))
                    except StoreError as error:  # allowed: clear, and the job is not stored
                        refusals.append(str(error))
            assert all("PostgreSQL" in r for r in refusals), refusals
            assert jobs.started
            for job in [*before, *after]:
                assert await result_through_outages(job) in range(40)
    finally:
        await admin.close()
        await jobs.close()
