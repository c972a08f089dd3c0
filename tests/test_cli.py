"""The ``asyncjobs`` command through its real entry points, in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import pytest
from click.testing import CliRunner

from asyncjobs import Jobs, JobStatus
from asyncjobs._cli import cli as cli_group
from asyncjobs._cli_output import table
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._outcomes import Outcome, OutcomeKind
from asyncjobs.testing import FakeClock

APP = """
import os
from asyncjobs import Jobs

jobs = Jobs(os.environ["CLI_TEST_DB_URL"], poll_interval=0.05)

@jobs.task(name="greet")
async def greet(name: str) -> str:
    return "hi " + name

@jobs.task(name="boom", retries=0, queue="risky")
async def boom() -> None:
    raise RuntimeError("kaboom")
"""

ENTRY_POINT = Path(sys.executable).with_name("asyncjobs")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cli_test_app.py").write_text(APP)
    return {
        **os.environ,
        # Ahead of the caller's own (a checkout under test): not instead of it, which
        # ran the installed asyncjobs.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "CLI_TEST_DB_URL": "sqlite:///" + str(tmp_path / "cli.db"),
        "ASYNCJOBS_APP": "cli_test_app:jobs",
    }


@pytest.fixture
async def app_jobs(env: dict[str, str]) -> AsyncIterator[Jobs]:
    """The same store as the app module, seen from the test: 1 succeeded, 1 dead, 1 queued."""
    jobs = Jobs(env["CLI_TEST_DB_URL"])

    @jobs.task(name="greet")
    async def greet(name: str) -> str:
        return "hi " + name

    @jobs.task(name="boom", retries=0, queue="risky")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    await jobs.enqueue(greet, "ada")
    await jobs.enqueue(boom)
    await jobs.drain()
    await jobs.enqueue(greet, "later")
    yield jobs
    await jobs.close()


def cli(env: dict[str, str], *args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "asyncjobs"] if module else [str(ENTRY_POINT)]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_list_json_prints_job_objects(env: dict[str, str], app_jobs: Jobs) -> None:
    listed: list[dict[str, Any]] = json.loads(ok(cli(env, "list", "--json")))
    assert [(j["task"], j["status"]) for j in listed] == [
        ("greet", "queued"),
        ("boom", "dead"),
        ("greet", "succeeded"),
    ]  # fmt: skip  (newest first)
    assert {"id", "task", "status", "queue", "attempts", "args", "error"} <= set(listed[0])
    assert listed[0]["args"] == ["later"]
    dead = json.loads(ok(cli(env, "list", "--status", "dead", "--queue", "risky", "--json")))
    assert [j["task"] for j in dead] == ["boom"]
    assert len(json.loads(ok(cli(env, "list", "--limit", "1", "--json")))) == 1


async def test_list_prints_a_table_for_people(env: dict[str, str], app_jobs: Jobs) -> None:
    lines = ok(cli(env, "list", "--task", "greet")).splitlines()
    assert lines[0].split() == [
        "id", "task", "queue", "status", "attempts", "enqueued", "at", "finished", "at",
    ]  # fmt: skip
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 4
    assert "succeeded" in lines[3]


@pytest.fixture
def fresh_app_module() -> Iterator[None]:
    """An in-process test imports ``cli_test_app`` on its own store, not another test's."""
    sys.modules.pop("cli_test_app", None)
    yield
    sys.modules.pop("cli_test_app", None)


@pytest.mark.usefixtures("fresh_app_module")
def test_list_reads_only_the_start_of_huge_arguments_and_results(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of arguments and result: ``list --json`` prints them as null, named under
    ``truncated`` with their stored size in bytes; ``show --json`` prints them whole. (In
    process: the subprocess tests run the installed command.)"""
    monkeypatch.setenv("CLI_TEST_DB_URL", env["CLI_TEST_DB_URL"])
    monkeypatch.syspath_prepend(str(tmp_path))

    async def seed() -> tuple[str, str]:
        jobs = Jobs(env["CLI_TEST_DB_URL"], max_payload_bytes=8 * 1024 * 1024)

        @jobs.task(name="greet")
        async def greet(name: str) -> str:
            return "hi " + name

        big = await jobs.enqueue(greet, "p" * 3_000_000)
        await jobs.drain()
        small = await jobs.enqueue(greet, "ada")
        await jobs.close()
        return big.id, small.id

    big_id, small_id = asyncio.run(seed())
    runner = CliRunner()

    def run_ok(*args: str) -> str:
        result = runner.invoke(cli_group, ["--app", "cli_test_app:jobs", *args])
        assert result.exit_code == 0, result.output
        return result.output

    listed_json = run_ok("list", "--json")
    assert len(listed_json) < 10_000
    listed = {job["id"]: job for job in json.loads(listed_json)}
    assert listed[small_id]["args"] == ["ada"]
    assert listed[small_id]["truncated"] == {}
    huge = listed[big_id]
    assert (huge["args"], huge["kwargs"], huge["result"]) == (None, None, None)
    assert huge["truncated"] == {"args": 3_000_025, "kwargs": 3_000_025, "result": 3_000_005}
    assert huge["status"] == "succeeded"
    assert len(run_ok("list")) < 1_000
    shown = json.loads(run_ok("show", big_id, "--json"))
    assert shown["args"] == ["p" * 3_000_000]
    assert shown["result"] == "hi " + "p" * 3_000_000


async def test_stats_json_and_table(env: dict[str, str], app_jobs: Jobs) -> None:
    stats = json.loads(ok(cli(env, "stats", "--json")))
    assert stats["totals"]["counts"]["dead"] == 1
    assert [q["queue"] for q in stats["queues"]] == ["default", "risky"]
    table = ok(cli(env, "stats", module=True))  # python -m asyncjobs works the same
    header, _, *rows = table.splitlines()
    assert header.split()[:4] == ["queue", "task", "waiting", "scheduled"]
    assert rows[0].split()[:2] == ["default", "greet"]


async def test_show_retry_cancel(env: dict[str, str], app_jobs: Jobs) -> None:
    (dead,) = await app_jobs.list(status="dead")
    shown = ok(cli(env, "show", dead.id))
    assert "RuntimeError: kaboom" in shown
    assert json.loads(ok(cli(env, "show", dead.id, "--json")))["status"] == "dead"
    assert "queued again" in ok(cli(env, "retry", dead.id))
    assert (await app_jobs.get(dead.id)).status == JobStatus.QUEUED  # type: ignore[union-attr]
    again = cli(env, "retry", dead.id)
    assert again.returncode == 1
    assert "not dead or cancelled" in again.stderr
    assert "cancelled" in ok(cli(env, "cancel", dead.id))
    assert cli(env, "cancel", dead.id).returncode == 1
    missing = cli(env, "show", "0" * 32)
    assert missing.returncode == 1
    assert "no job" in missing.stderr


async def test_retrying_a_chain_member_that_waits_again_says_it_waits(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """A chain member cancelled before it ran, retried, waits again for the member
    before it (not run yet): not "queued again"."""
    greet = app_jobs.registry["greet"]
    first, second = (await app_jobs.chain(greet.spec("a"), greet.spec("b"))).jobs
    assert await app_jobs.cancel(second.id)
    said = ok(cli(env, "retry", second.id)).strip()
    assert said == (
        f"job {second.id} retried: it waits again for the chain member before it to "
        "succeed (or, a batch's on_complete, for its members to finish)"
    )
    assert (await second.info()).status == JobStatus.WAITING
    assert (await first.info()).status == JobStatus.QUEUED


async def test_a_lone_surrogate_is_printed_escaped(env: dict[str, str], app_jobs: Jobs) -> None:
    job = await app_jobs.enqueue("greet", "caf\u00e9 \ud800")  # strict JSON keeps it
    shown = ok(cli(env, "show", job.id))
    assert '["caf\u00e9 \\ud800"]' in shown
    listed = json.loads(ok(cli(env, "list", "--json")))
    assert ["caf\u00e9 \ud800"] in [item["args"] for item in listed]


async def test_control_characters_reach_the_terminal_escaped(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """An escape sequence in an error message or a key must not rewrite the screen."""

    @app_jobs.task(name="remote", retries=0)
    async def remote() -> None:
        raise RuntimeError("503\r\x1b[2K\x1b[32mall good\x1b[0m\x1b]52;c;cm0gLXJmIH4K\x07")

    job = await app_jobs.enqueue(remote.options(idempotency_key="order-1\x1b]0;title\x07"))
    await app_jobs.drain()
    shown = ok(cli(env, "show", job.id))
    assert "\x1b" not in shown
    assert "\x07" not in shown
    assert "\\x1b[32mall good" in shown
    assert "order-1\\x1b]0;title\\x07" in shown
    assert "\x1b" not in ok(cli(env, "list"))


async def test_c1_controls_in_arguments_reach_the_terminal_escaped(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """JSON leaves DEL and the C1 controls raw; U+009B alone starts an escape sequence."""
    hostile = "\x9b2J\x9b31mall good\x9d0;pwned\x9c\x7f"
    job = await app_jobs.enqueue("greet", hostile)
    for shown in (ok(cli(env, "show", job.id)), ok(cli(env, "list", "--json"))):
        assert not [c for c in shown if "\x7f" <= c <= "\x9f"]
        assert "\\u009b2J" in shown
    listed = json.loads(ok(cli(env, "list", "--json")))
    assert [hostile] in [item["args"] for item in listed]  # still JSON, the same value


async def test_format_characters_reach_the_terminal_escaped(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """A right-to-left override (U+202E) in an error, a key or arguments turned around
    what the operator reads (a zero-width space hid in it): each is shown as its escape,
    as on the dashboard; the JSON output still holds the same value."""

    @app_jobs.task(name="spoof", retries=0)
    async def spoof(text: str) -> None:
        # Built, so that the line of the traceback does not read as the escapes shown.
        raise RuntimeError("refund " + chr(0x202E) + "0001$" + chr(0x200B) + " sent")

    job = await app_jobs.enqueue(spoof.options(idempotency_key="k\u202e"), "abc\u202edef")
    await app_jobs.drain()
    shown = ok(cli(env, "show", job.id))
    assert '["abc\\u202edef"]' in shown
    assert "refund \\u202e0001$\\u200b sent" in shown
    assert "k\\u202e" in shown
    as_json = ok(cli(env, "show", job.id, "--json"))
    listed = ok(cli(env, "list", "--json"))
    for printed in (shown, as_json, listed):
        assert "\u202e" not in printed
        assert "\u200b" not in printed
    assert json.loads(as_json)["args"] == ["abc\u202edef"]
    assert ["abc\u202edef"] in [item["args"] for item in json.loads(listed)]


async def test_retry_all_dead_and_purge(env: dict[str, str], app_jobs: Jobs) -> None:
    assert json.loads(ok(cli(env, "retry", "--all-dead", "--json"))) == {"retried": 1}
    assert await app_jobs.list(status="dead") == []
    assert cli(env, "retry").returncode == 2  # neither an id nor --all-dead
    assert json.loads(ok(cli(env, "purge", "--status", "succeeded", "--json"))) == {"purged": 1}
    assert "purged 0 job(s)" in ok(cli(env, "purge", "--older-than", "7d"))
    bad = cli(env, "purge", "--older-than", "soon")
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr
    assert "--older-than" in bad.stderr  # the error names the option
    assert cli(env, "purge").returncode == 2


async def test_purge_refuses_older_than_with_a_status_that_has_not_finished(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """``--older-than`` counts from when a job finished: ``--status queued --older-than
    1d`` was taken, and always purged 0 however old the queued jobs were."""
    for status in ("waiting", "scheduled", "queued"):
        result = cli(env, "purge", "--status", status, "--older-than", "1d")
        assert result.returncode == 2, status
        assert f"--older-than counts from when a job finished; {status} jobs" in result.stderr
    assert len(await app_jobs.list(status="queued")) == 1


def test_app_errors_are_clear(env: dict[str, str]) -> None:
    no_app = {k: v for k, v in env.items() if k != "ASYNCJOBS_APP"}
    result = cli(no_app, "stats")
    assert result.returncode == 2
    assert "--app" in result.stderr
    result = cli(env, "--app", "cli_test_app:nothing", "stats")
    assert result.returncode == 2
    assert "no attribute 'nothing'" in result.stderr
    result = cli(env, "--app", "cli_test_app:os", "stats")
    assert "not an asyncjobs.Jobs" in result.stderr


def test_a_wrong_app_given_to_worker_is_named_as_its_argument_not_as_app(
    env: dict[str, str],
) -> None:
    """``asyncjobs worker myapp:job`` names the argument typed, not an --app never given."""
    result = cli(env, "worker", "cli_test_app:nothing")
    assert result.returncode == 2
    assert "Invalid value for MODULE:ATTR: module 'cli_test_app' has no attr" in result.stderr
    assert "--app" not in result.stderr
    result = cli(env, "--app", "cli_test_app:nothing", "worker")
    assert "Invalid value for --app: module 'cli_test_app' has no attr" in result.stderr


def test_an_app_whose_own_import_fails_shows_where_not_a_wrong_app_path(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A module the app imports is missing: the traceback into the app, as for any
    error in it, not 'Invalid value for --app', which sent the user to check the path."""
    (tmp_path / "broken_app.py").write_text("import os\nimport a_dependency_not_installed\n")
    for command in (["--app", "broken_app:jobs", "stats"], ["worker", "broken_app:jobs"]):
        result = cli(env, *command)
        assert result.returncode == 1, command
        assert "Invalid value" not in result.stderr
        assert 'broken_app.py", line 2' in result.stderr
        assert "No module named 'a_dependency_not_installed'" in result.stderr
    (tmp_path / "stale_app.py").write_text("from os import a_name_since_removed\n")
    result = cli(env, "--app", "stale_app:jobs", "stats")
    assert result.returncode == 1
    assert "ImportError: cannot import name 'a_name_since_removed'" in result.stderr
    for missing in ("no_such_app", "no_such_package.app", "cli_test_app.nothing"):
        result = cli(env, "--app", f"{missing}:jobs", "stats")
        assert result.returncode == 2, missing
        assert f"Invalid value for --app: cannot import {missing!r}: No module" in result.stderr


async def started(process: anyio.abc.Process, jobs: Jobs, job_id: str) -> bytes:
    """The worker's stderr up to "asyncjobs worker running", once ``job_id`` runs there.
    A signal before the workers are ready reaches a worker still starting, which stops
    at once ("while starting"), not the drain these tests are about; that line comes
    once they are (a signal from then on drains, even before ``start()`` returned)."""
    assert process.stderr is not None
    stderr = b""
    async for chunk in process.stderr:
        stderr += chunk
        if b"asyncjobs worker running" in stderr:
            break
    else:
        raise AssertionError(f"the worker exited as it started: {stderr.decode()}")
    # Real time: the job runs in another process.
    while (info := await jobs.get(job_id)) and info.status != "running":
        assert process.returncode is None
        await jobs.clock.sleep(0.05)
    return stderr


async def test_worker_runs_jobs_until_sigterm(env: dict[str, str], app_jobs: Jobs) -> None:
    """``asyncjobs worker APP`` runs queued jobs, and drains and exits 0 on SIGTERM."""
    (queued,) = await app_jobs.list(status="queued")
    worker_env = {k: v for k, v in env.items() if k != "ASYNCJOBS_APP"}
    async with await anyio.open_process(
        [str(ENTRY_POINT), "worker", "cli_test_app:jobs"], env=worker_env
    ) as process:
        with anyio.fail_after(30):
            # Real time: the job runs in another process (app_jobs has the system clock).
            while (info := await app_jobs.get(queued.id)) and info.status != "succeeded":
                assert process.returncode is None
                await app_jobs.clock.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            await process.wait()
            assert process.stderr is not None
            stderr = b""
            async for chunk in process.stderr:
                stderr += chunk
    assert process.returncode == 0, stderr.decode()
    assert b"received SIGTERM" in stderr
    assert info is not None
    assert info.result == "hi later"


STUBBORN_APP = """
import asyncio
import os

import asyncjobs._slots
from asyncjobs import Jobs

asyncjobs._slots.CANCEL_GRACE = 0.2  # the test's patience, not the 5 s of a real worker

jobs = Jobs(os.environ["CLI_TEST_DB_URL"], poll_interval=0.05, shutdown_timeout=0.1)

@jobs.task(name="stubborn")
async def stubborn() -> None:
    never = asyncio.Event()
    while True:  # swallows every cancellation
        try:
            await never.wait()
        except asyncio.CancelledError:
            pass
"""


async def test_a_worker_exits_after_sigterm_though_a_job_swallows_every_cancellation(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The worker logged that it went on without such a job (left running, with its lease,
    to run again once that expires), then never exited: ``asyncio.run`` waited for the
    job's task for good. The process now exits; the job is neither lost nor succeeded."""
    (tmp_path / "stubborn_app.py").write_text(STUBBORN_APP)
    jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False)
    try:
        job = await jobs.enqueue("stubborn")
        async with await anyio.open_process(
            [str(ENTRY_POINT), "worker", "stubborn_app:jobs"], env=env
        ) as process:
            stderr = b""
            try:
                with anyio.fail_after(20):
                    stderr = await started(process, jobs, job.id)
                    process.send_signal(signal.SIGTERM)
                    await process.wait()
            finally:
                if process.returncode is None:  # else leaving the block waits for it
                    process.kill()
            assert process.stderr is not None
            async for chunk in process.stderr:
                stderr += chunk
        assert process.returncode == 0, stderr.decode()
        assert b"exiting without 1 task(s) that ignored their cancellation" in stderr
        assert b"Traceback" not in stderr  # its task is not collected with no event loop
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == ("running", 1)  # its lease expires: it runs again
    finally:
        await jobs.close()


SLOW_APP = """
import asyncio
import os

from asyncjobs import Jobs

jobs = Jobs(os.environ["CLI_TEST_DB_URL"], poll_interval=0.05, shutdown_timeout=600)

@jobs.task(name="slow")
async def slow() -> None:
    await asyncio.Event().wait()  # runs until cancelled
"""


async def test_a_second_signal_while_the_worker_drains_stops_it_at_once_and_loses_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The first SIGTERM drains (here up to shutdown_timeout=600 s); a second one was
    logged and ignored, so the worker could not be stopped short of SIGKILL (whose jobs
    wait out their leases). It now stops at once, as Celery's cold shutdown does: the
    running job is cancelled and given back, attempt unspent, and the exit is non-zero."""
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False)
    try:
        job = await jobs.enqueue("slow")
        async with await anyio.open_process(
            [str(ENTRY_POINT), "worker", "slow_app:jobs"], env=env
        ) as process:
            assert process.stderr is not None
            stderr = b""
            try:
                with anyio.fail_after(30):
                    stderr = await started(process, jobs, job.id)
                    process.send_signal(signal.SIGTERM)
                    async for chunk in process.stderr:
                        stderr += chunk
                        if b"received SIGTERM: draining" in stderr:
                            break
                    process.send_signal(signal.SIGINT)
                    await process.wait()
            finally:
                if process.returncode is None:  # else leaving the block waits for it
                    process.kill()
            async for chunk in process.stderr:
                stderr += chunk
        assert process.returncode == 1, stderr.decode()
        assert b"received SIGINT while draining: stopping at once" in stderr
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == ("queued", 0)  # given back, attempt unspent

        again = Jobs(env["CLI_TEST_DB_URL"], clock=FakeClock())

        @again.task(name="slow")
        async def slow() -> str:
            return "ran"

        try:
            await again.drain()
        finally:
            await again.close()
        assert await job.result(timeout=0) == "ran"
    finally:
        await jobs.close()


LOCKED_OUT_APP = """
import asyncio
import os

import asyncjobs._outbox
from asyncjobs import Jobs

asyncjobs._outbox.FINAL_WRITE_TIME = 60  # a drain would try the release this long

jobs = Jobs(os.environ["CLI_TEST_DB_URL"], poll_interval=0.05, shutdown_timeout=600)

@jobs.task(name="slow")
async def slow() -> None:
    await asyncio.Event().wait()  # runs until cancelled
"""


async def test_a_second_signal_stops_the_worker_promptly_while_another_process_holds_the_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Another process takes the file's write lock as the worker drains, then a second
    signal comes. The worker still waited for the store as a drain does (the release of
    the job it cancelled tried for ``FINAL_WRITE_TIME``, here 60 s; a claim under way
    for ``shutdown_timeout``). It now gives the store ``STOP_AT_ONCE_GRACE`` (1 s) and
    exits; the job it could not give back keeps its lease, and runs again once that
    expires, as after a crash."""
    (tmp_path / "locked_out_app.py").write_text(LOCKED_OUT_APP)
    jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False)
    holder = sqlite3.connect(tmp_path / "cli.db", isolation_level=None, check_same_thread=False)
    try:
        job = await jobs.enqueue("slow")
        async with await anyio.open_process(
            [str(ENTRY_POINT), "worker", "locked_out_app:jobs"], env=env
        ) as process:
            assert process.stderr is not None
            stderr = b""
            try:
                with anyio.fail_after(30):
                    stderr = await started(process, jobs, job.id)
                    process.send_signal(signal.SIGTERM)
                    async for chunk in process.stderr:
                        stderr += chunk
                        if b"received SIGTERM: draining" in stderr:
                            break
                holder.execute("BEGIN IMMEDIATE")  # the other process's write, under way
                process.send_signal(signal.SIGINT)
                with anyio.fail_after(10):  # the grace, a last try of each write, the exit
                    await process.wait()
            finally:
                if process.returncode is None:  # else leaving the block waits for it
                    process.kill()
                if holder.in_transaction:
                    holder.execute("ROLLBACK")
            async for chunk in process.stderr:
                stderr += chunk
        assert process.returncode == 1, stderr.decode()
        assert b"received SIGINT while draining: stopping at once" in stderr
        assert b"could not record the outcome (release) of job " + job.id.encode() in stderr
        info = await jobs.get(job.id)
        assert info is not None
        assert (info.status, info.attempts) == ("running", 1)  # to its lease

        clock = FakeClock()
        again = Jobs(env["CLI_TEST_DB_URL"], clock=clock)

        @again.task(name="slow")
        async def slow() -> str:
            return "ran"

        try:
            clock.advance(again.settings.visibility_timeout + 1)
            await again.drain()
        finally:
            await again.close()
        assert await job.result(timeout=0) == "ran"
        info = await jobs.get(job.id)
        assert info is not None
        assert info.attempts == 2  # the lease recovered, as after a crash
    finally:
        holder.close()
        await jobs.close()


def test_a_store_error_is_a_clean_message_not_a_traceback(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A store that cannot open (its path is a directory) gives one line and exit 1."""
    (tmp_path / "not-a-file.db").mkdir()
    broken = {**env, "CLI_TEST_DB_URL": "sqlite:///" + str(tmp_path / "not-a-file.db")}
    for command in ("list", "worker"):
        result = cli(broken, command)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "Error:" in result.stderr
        assert "not-a-file.db" in result.stderr


def test_a_worker_that_cannot_reach_postgres_says_so_and_exits(env: dict[str, str]) -> None:
    """Not "reconnecting in 0.1s" before exiting: the URL (password hidden) and why."""
    pytest.importorskip("asyncpg")
    unreachable = "postgresql://postgres:secret@127.0.0.1:1/test"  # nothing listens on port 1
    result = cli({**env, "CLI_TEST_DB_URL": unreachable}, "worker")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        "Error: PostgreSQL store could not connect to "
        "'postgresql://postgres:***@127.0.0.1:1/test' (open): ConnectionRefusedError"
    ) in result.stderr
    assert "reconnecting" not in result.stderr
    assert "secret" not in result.stderr


def test_a_setting_the_app_refuses_is_a_clean_message(env: dict[str, str]) -> None:
    """The app's ``Jobs(url)`` refusing its URL at import gives one line, not a traceback."""
    for url in ("sqlite:///", "redis://127.0.0.1/0"):
        result = cli({**env, "CLI_TEST_DB_URL": url}, "list")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "Error: importing 'cli_test_app' failed:" in result.stderr


def test_a_missing_sqlite_store_is_refused_not_created(env: dict[str, str], tmp_path: Path) -> None:
    """A mistyped path must not read as an empty store (nor leave a new file behind)."""
    missing = tmp_path / "typo" / "jobs.db"
    typo = {**env, "CLI_TEST_DB_URL": "sqlite:///" + str(missing)}
    for command in (["list"], ["stats"], ["purge", "--status", "dead"], ["retry", "--all-dead"]):
        result = cli(typo, *command)
        assert result.returncode == 1, command
        assert "no asyncjobs store at" in result.stderr
        assert str(missing) in result.stderr
    assert not missing.parent.exists()


def test_a_sqlite_file_without_a_store_is_refused_not_given_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A URL naming another database (the app's own, an empty file) read as an empty
    store, and left the job tables written into it."""
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    db.close()
    empty = tmp_path / "empty.db"
    empty.touch()
    for path in (other, empty):
        wrong = {**env, "CLI_TEST_DB_URL": "sqlite:///" + str(path)}
        for command in (["list"], ["stats"], ["purge", "--status", "dead"]):
            result = cli(wrong, *command)
            assert result.returncode == 1, command
            assert f"no asyncjobs store in {str(path)!r}" in result.stderr
    with sqlite3.connect(other) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master")]
    db.close()
    assert tables == ["users"]
    assert empty.stat().st_size == 0


async def test_a_postgres_schema_without_a_store_is_refused_not_given_one(
    env: dict[str, str], postgres_url: str
) -> None:
    """A URL whose search_path names a schema without asyncjobs' tables (the app's own,
    a new one) read as an empty store, and left the job tables written into it. The
    password is not shown; ``worker`` (as the app) still creates them."""
    asyncpg = pytest.importorskip("asyncpg")
    parts = urlsplit(postgres_url)
    netloc = f"{parts.username}:secret@{parts.hostname}:{parts.port}"
    with_password = urlunsplit(parts._replace(netloc=netloc))
    wrong = {**env, "CLI_TEST_DB_URL": with_password}
    for command in (["list"], ["stats"], ["purge", "--status", "dead"], ["retry", "--all-dead"]):
        result = cli(wrong, *command)
        assert result.returncode == 1, command
        assert "Traceback" not in result.stderr
        assert "no asyncjobs store in schema 'asyncjobs_test_" in result.stderr
        assert "secret" not in result.stderr
        assert ":***@" in result.stderr
    conn = await asyncpg.connect(postgres_url)
    try:
        tables = await conn.fetch("SELECT 1 FROM pg_tables WHERE schemaname = current_schema()")
    finally:
        await conn.close()
    assert tables == []
    jobs = Jobs(postgres_url, workers=False)
    await jobs.store.open()  # as the app and `asyncjobs worker` do: creates the tables
    await jobs.close()
    assert ok(cli(wrong, "list")).strip() == "no jobs"


async def test_cancelling_a_running_job_says_it_was_asked_to_stop(
    env: dict[str, str], app_jobs: Jobs
) -> None:
    """A running job is not cancelled yet: its worker stops it first (README)."""
    request = ClaimRequest(
        worker="elsewhere:1:w", tasks={"greet": TaskLimits(max_attempts=3)},
        queues=None, limit=1, lease=60,
    )  # fmt: skip
    (running,) = await app_jobs.store.claim(request, now=app_jobs.clock.now())
    said = ok(cli(env, "cancel", running.id))
    assert (
        said.strip()
        == f"job {running.id} asked to stop: it is cancelled once its worker has stopped it"
    )
    assert (await app_jobs.get(running.id)).status == JobStatus.RUNNING  # type: ignore[union-attr]
    again = cli(env, "cancel", "--json", running.id)
    assert again.returncode == 1
    assert json.loads(again.stdout) == {"id": running.id, "cancelled": False, "stopping": False}
    (dead,) = await app_jobs.list(status="dead")
    await app_jobs.retry(dead.id)
    queued = json.loads(ok(cli(env, "cancel", "--json", dead.id)))
    assert queued == {"id": dead.id, "cancelled": True, "stopping": False}


def test_a_number_just_under_1000_in_a_table_is_not_in_exponent_form() -> None:
    """A throughput of 999.7 jobs/s read "1e+03": ``.3g`` rounds it up to four digits."""
    text = table(["jobs/s 1m"], [[999.7], [999.4], [12.34], [1234.5]])
    assert text.splitlines()[2:] == ["     1000", "      999", "     12.3", "     1234"]


@pytest.mark.usefixtures("fresh_app_module")
def test_times_in_tables_say_they_are_utc(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``list`` and ``show`` print times in UTC and say so, as the dashboard does: bare,
    they read as local time to an operator anywhere else. (In process: the subprocess
    tests run the installed command.)"""
    monkeypatch.setenv("CLI_TEST_DB_URL", env["CLI_TEST_DB_URL"])
    monkeypatch.syspath_prepend(str(tmp_path))
    enqueued = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    async def seed() -> str:
        jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False, clock=FakeClock(start=enqueued))
        job = await jobs.enqueue("greet", "ada")
        await jobs.close()
        return job.id

    job_id = asyncio.run(seed())
    runner = CliRunner()
    listed = runner.invoke(cli_group, ["--app", "cli_test_app:jobs", "list"])
    assert listed.exit_code == 0, listed.output
    assert "2026-01-02 03:04:05 UTC" in listed.output
    shown = runner.invoke(cli_group, ["--app", "cli_test_app:jobs", "show", job_id])
    assert shown.exit_code == 0, shown.output
    (line,) = [line for line in shown.output.splitlines() if line.startswith("enqueued_at")]
    assert line.split(None, 1)[1] == "2026-01-02 03:04:05 UTC"


STATS_APP = """
import os
from datetime import UTC, datetime
from asyncjobs import Jobs
from asyncjobs.testing import FakeClock

jobs = Jobs(
    os.environ["CLI_TEST_DB_URL"],
    workers=False,
    clock=FakeClock(start=datetime(2026, 1, 2, 3, 30, tzinfo=UTC)),
)

@jobs.periodic(every=3600)
async def hourly() -> None: ...
"""


@pytest.mark.usefixtures("fresh_app_module")
def test_stats_tables_say_their_times_are_utc(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schedules' next run and the stuck jobs' lease expiry read as ``list`` and
    ``show`` write times, not as raw ISO strings (``2026-01-02T04:00:00+00:00``)."""
    monkeypatch.setenv("CLI_TEST_DB_URL", env["CLI_TEST_DB_URL"])
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cli_stats_app.py").write_text(STATS_APP)
    monkeypatch.delitem(sys.modules, "cli_stats_app", raising=False)

    async def seed() -> None:
        start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False, clock=FakeClock(start=start))
        await jobs.enqueue("greet", "ada")
        request = ClaimRequest(
            worker="gone:1:w", tasks={"greet": TaskLimits(max_attempts=3)},
            queues=None, limit=1, lease=60,
        )  # fmt: skip
        assert len(await jobs.store.claim(request, now=jobs.clock.now())) == 1
        await jobs.close()

    asyncio.run(seed())
    said = CliRunner().invoke(cli_group, ["--app", "cli_stats_app:jobs", "stats"])
    assert said.exit_code == 0, said.output
    schedules = said.output.split("\nschedules\n")[1].split("\n\n")[0]
    assert "2026-01-02 04:00:00 UTC" in schedules
    stuck = said.output.split("\nstuck (lease expired, waiting for recovery)\n")[1]
    assert "2026-01-02 03:05:05 UTC" in stuck
    assert "+00:00" not in said.output


@pytest.mark.usefixtures("fresh_app_module")
def test_cancel_of_a_job_that_finishes_first_does_not_say_cancelled(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running job asked to stop that its worker finishes before the command reads its
    status is reported as finished (exit 1), not as cancelled. (In process, so that the
    worker's finish can land between the two.)"""
    monkeypatch.setenv("CLI_TEST_DB_URL", env["CLI_TEST_DB_URL"])
    monkeypatch.syspath_prepend(str(tmp_path))
    worker = "elsewhere:1:w"

    async def seed() -> list[str]:
        jobs = Jobs(env["CLI_TEST_DB_URL"], workers=False)
        for name in ("ada", "bob"):
            await jobs.enqueue("greet", name)
        request = ClaimRequest(
            worker=worker, tasks={"greet": TaskLimits(max_attempts=3)},
            queues=None, limit=2, lease=60,
        )  # fmt: skip
        running = await jobs.store.claim(request, now=jobs.clock.now())
        await jobs.close()
        return [job.id for job in running]

    job_id, other_id = asyncio.run(seed())
    ask = Jobs.cancel

    async def ask_then_the_worker_finishes(self: Jobs, job_id: str) -> bool:
        asked = await ask(self, job_id)
        done = Outcome(job_id, worker, 1, OutcomeKind.SUCCEEDED, result='"hi ada"')
        assert await self.store.finish([done], now=self.clock.now()) == [job_id]
        return asked

    monkeypatch.setattr(Jobs, "cancel", ask_then_the_worker_finishes)
    runner = CliRunner()
    said = runner.invoke(cli_group, ["--app", "cli_test_app:jobs", "cancel", job_id])
    assert said.exit_code == 1
    assert "cancelled" not in said.stdout
    assert f"job {job_id} finished (succeeded) before it could be stopped" in said.output
    as_json = runner.invoke(cli_group, ["--app", "cli_test_app:jobs", "cancel", "--json", other_id])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"id": other_id, "cancelled": False, "stopping": False}


OPTIONAL_EXTRAS = ("asyncpg", "croniter", "jinja2", "prometheus_client", "starlette")

EXTRAS_PROBE = """
import importlib.util, sys
from asyncjobs.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
extras = {extras!r}
missing = [name for name in extras if importlib.util.find_spec(name) is None]
assert not missing, f"install the dev extras to run this test: {{missing}}"
print(",".join(name for name in extras if name in sys.modules))
"""


def loaded_extras(env: dict[str, str], *args: str) -> list[str]:
    """The optional extras in ``sys.modules`` after the command ran, in its process."""
    probe = EXTRAS_PROBE.format(extras=OPTIONAL_EXTRAS)
    result = subprocess.run(
        [sys.executable, "-c", probe, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return list(filter(None, result.stdout.splitlines()[-1].split(",")))


@pytest.mark.parametrize("args", [("--help",), ("list", "--json"), ("stats", "--json")])
async def test_a_command_imports_none_of_the_optional_extras(
    env: dict[str, str], app_jobs: Jobs, args: tuple[str, ...]
) -> None:
    """``--help``, and commands that read a SQLite store, load no optional extra (the
    dashboard's starlette and jinja2, prometheus_client, asyncpg, croniter): each would
    cost every command its import time. What needs one imports it when used."""
    assert loaded_extras(env, *args) == []
