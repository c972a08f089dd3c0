"""The README's examples run as written (they are what a newcomer copies first).

The first runs as a script of its own; the others assume names defined around them
(the tasks a chain runs, an app's routes), which each test defines before running the
block as it stands in the README, top-level ``await`` and all.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncjobs
from asyncjobs import Jobs, JobSpec, JobStatus, RateLimit
from asyncjobs.stores._sqlite_connections import _SYNCHRONOUS
from asyncjobs.testing import drain

README = Path(__file__).parent.parent / "README.md"

pytest_plugins = ["pytester"]

MakeJobs = Callable[..., Jobs]


def python_block(heading: str, text: str | None = None) -> str:
    """The first ```python block under the README heading ``heading`` (## or ###)."""
    section = re.split(rf"\n#+ {re.escape(heading)}\n", text or README.read_text(), maxsplit=1)
    assert len(section) == 2, f"no heading {heading!r} in the README"
    match = re.search(r"```python\n(.*?)```", section[1], re.DOTALL)
    assert match is not None, f"no python block under {heading!r}"
    return match.group(1)


async def run_block(source: str, names: dict[str, Any]) -> dict[str, Any]:
    """Run a README block in ``names`` (top-level ``await`` allowed); return them."""
    names.setdefault("__name__", "readme")  # the module its tasks are named after
    code = compile(source, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    pending = eval(code, names)
    if pending is not None:
        await pending
    return names


def test_the_use_it_example_runs_and_its_job_succeeds(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_block("Use it") + "\nimport asyncio\n\nasyncio.run(main())\n")
    env = {k: v for k, v in os.environ.items() if k != "ASYNCJOBS_URL"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # Jobs() opens ./asyncjobs.db
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "JobInfo(" in done.stdout
    assert "status=<JobStatus.SCHEDULED" in done.stdout  # the delayed one, printed


def test_python_block_finds_a_block_under_a_heading_of_either_level() -> None:
    text = "# t\n\n## A\n\n```python\na = 1\n```\n\n### B\n\n```python\nb = 2\n```\n"
    assert python_block("A", text) == "a = 1\n"
    assert python_block("B", text) == "b = 2\n"
    with pytest.raises(AssertionError, match="no heading"):
        python_block("C", text)


def test_every_name_a_readme_block_imports_is_used_in_it() -> None:
    """Copied into a file, the "Use it" block imported ``Retry`` and never used it, which
    ruff (F401) reports in the newcomer's project."""
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL):
        tree = ast.parse(block)
        imported = {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert imported - used == set(), block.splitlines()[0]


def test_the_module_map_names_every_module() -> None:
    """ "Working on asyncjobs" maps the code for a newcomer; it left out modules twice
    (eight, then ``stores/_statuses.py``). Each is named, or matched by a pattern
    (``*_sql.py``); a folder none of whose modules is named may be named instead
    (``_dashboard/``)."""
    section = README.read_text().split("\n## Working on asyncjobs\n")[1].split("\n## ")[0]
    named = set(re.findall(r"`([^`\s]+)`", section))
    package = Path(asyncjobs.__file__).parent
    modules = [path for path in sorted(package.rglob("*.py")) if path.name != "__init__.py"]

    def is_named(path: Path) -> bool:
        return any(fnmatch(path.name, name) for name in named)

    listed = {path.parent for path in modules if is_named(path)}
    missing = [
        str(path.relative_to(package))
        for path in modules
        if not is_named(path) and (path.parent in listed or f"{path.parent.name}/" not in named)
    ]
    assert missing == []


def test_the_settings_name_every_synchronous_level_the_store_takes() -> None:
    """SQLiteStore (and so ``Jobs(synchronous=)``) took "extra" too, which the README's
    settings left out: each level it takes is named there, with what it does."""
    section = README.read_text().split("\n### Settings\n")[1].split("\n## ")[0]
    missing = [level for level in _SYNCHRONOUS if f'"{level.lower()}"' not in section]
    assert missing == []


async def test_the_scheduling_and_workflows_example_runs(jobs: Jobs) -> None:
    @jobs.task
    async def encode(video_id: int) -> str:
        return f"video-{video_id}.mp4"

    @jobs.task
    async def thumbnail(video_id: int) -> str:
        return f"video-{video_id}.png"

    @jobs.task
    async def notify(user_id: int) -> None:
        pass

    @jobs.task
    async def send_report(user_id: int) -> None:
        pass

    counts: list[object] = []

    @jobs.task
    async def report_done(batch: object = None) -> None:
        counts.append(batch)

    names = await run_block(
        python_block("Scheduling and workflows"),
        {
            "jobs": jobs,
            "timedelta": timedelta,
            "encode": encode,
            "thumbnail": thumbnail,
            "notify": notify,
            "send_report": send_report,
            "report_done": report_done,
            "video_id": 7,
            "user_id": 42,
            "user_ids": [1, 2, 3],
        },
    )
    await drain(jobs)
    assert await names["chain"].status() == JobStatus.SUCCEEDED
    assert (await names["batch"].progress()).done == 3
    done = {"id": names["batch"].id, "total": 3, "succeeded": 3, "dead": 0, "cancelled": 0}
    assert counts == [done]
    schedules = {s.task: s for s in jobs.schedules()}
    nightly = schedules["readme.nightly_report"].next_run_at.astimezone(ZoneInfo("Europe/Rome"))
    assert (nightly.hour, nightly.minute) == (2, 0)
    assert schedules["readme.clear_expired_sessions"].every == 300


async def test_the_flow_control_example_runs(jobs: Jobs) -> None:
    names = await run_block(python_block("Flow control"), {"jobs": jobs, "RateLimit": RateLimit})
    await drain(jobs)
    (info,) = await jobs.list()
    assert (info.task, info.group, info.status) == ("readme.send", "user:42", "succeeded")
    assert names["send"].limiter == "resend"


async def test_the_enqueue_by_name_spec_in_flow_control_runs(jobs: Jobs) -> None:
    line = (
        'await jobs.enqueue(JobSpec(task="send", args=("a@example.com",))'
        '.with_options(queue="email"))'
    )
    assert f"`{line}`" in README.read_text()
    await run_block(line, {"jobs": jobs, "JobSpec": JobSpec})
    (info,) = await jobs.list()
    assert (info.task, info.queue, info.args) == ("send", "email", ["a@example.com"])


async def test_the_web_apps_example_enqueues_from_a_request(jobs: Jobs) -> None:
    @jobs.task
    async def send_verification_email(user_id: int, address: str) -> None:
        pass

    names = await run_block(
        python_block("Web apps"),
        {
            "jobs": jobs,
            "routes": [],
            "send_verification_email": send_verification_email,
            "user": SimpleNamespace(id=42, email="a@example.com"),
            "JSONResponse": JSONResponse,
        },
    )
    app: Starlette = names["app"]
    app.router.routes.append(Route("/signup", names["signup"], methods=["POST"]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/signup")
    assert (response.status_code, response.json()) == (202, {"id": 42})
    await drain(jobs)
    (info,) = await jobs.list()
    assert (info.args, info.kwargs) == ([42], {"address": "a@example.com"})
    assert info.status == JobStatus.SUCCEEDED


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_the_transactional_enqueue_example_stores_user_and_job_together(
    make_jobs: MakeJobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    monkeypatch.chdir(tmp_path)  # the block opens "app.db", the store's file
    jobs = make_jobs(str(tmp_path / "app.db"))

    @jobs.task
    async def send_verification_email(user_id: int, address: str) -> None:
        pass

    async with aiosqlite.connect(tmp_path / "app.db") as db:
        await db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        await db.commit()
    block = python_block("Transactional enqueue (the outbox pattern)")
    assert 'await db.execute("COMMIT")' in block
    await run_block(
        block.replace('"COMMIT"', f'"{end}"'),
        {
            "jobs": jobs,
            "aiosqlite": aiosqlite,
            "email": "a@example.com",
            "send_verification_email": send_verification_email,
        },
    )
    async with aiosqlite.connect(tmp_path / "app.db") as db:
        users = [tuple(row) for row in await db.execute_fetchall("SELECT id, email FROM users")]
    stored = await jobs.list()
    if end == "COMMIT":
        assert users == [(1, "a@example.com")]
        assert [(i.args, i.kwargs) for i in stored] == [([1], {"address": "a@example.com"})]
    else:
        assert (users, stored) == ([], [])


TESTED_APP = """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncjobs import Jobs, JobsMiddleware

    jobs = Jobs("sqlite:///app-jobs.db")  # the app's real store; the test never opens it
    sent: list[str] = []

    @jobs.task(queue="email")
    async def send_welcome(address: str) -> None:
        sent.append(address)

    async def signup(request: Request) -> JSONResponse:
        data = await request.json()
        await request.state.jobs.enqueue(send_welcome, address=data["email"])
        return JSONResponse({}, status_code=202)

    app = Starlette(
        routes=[Route("/signup", signup, methods=["POST"])],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
"""


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_the_testing_example_runs_as_written_in_a_project_of_its_own(
    pytester: pytest.Pytester, mode: str
) -> None:
    """Pasted into a new project, whose pytest-asyncio runs in its default (strict) mode,
    the block's test failed: "async def functions are not natively supported". In
    strict mode as written; in auto mode with the fixture decorator its comment gives."""
    block = python_block("Testing your app")
    if mode == "auto":
        assert "@pytest_asyncio.fixture " in block
        block = block.replace("@pytest_asyncio.fixture ", "@pytest.fixture ")
    pytester.makeini(f"[pytest]\nasyncio_mode = {mode}\n")
    pytester.makepyfile(myapp=textwrap.dedent(TESTED_APP), test_myapp=block)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"
    )
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "app-jobs.db").exists(), "the app's real store was touched"


async def test_the_operations_example_mounts_the_dashboard_and_metrics(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBS_PASSWORD", "s3cret")
    app = Starlette()
    names = await run_block(python_block("Operations"), {"jobs": jobs, "app": app, "os": os})
    assert names["stats"]["totals"]["counts"]["queued"] == 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/admin/jobs/")).status_code == 401
        page = await client.get("/admin/jobs/", auth=("admin", "s3cret"))
        assert page.status_code == 200
        assert "asyncjobs_jobs" in (await client.get("/metrics/")).text
