"""Hostile values in the CLI's filters and job ids: an exact (empty) answer or a clear
error, never a traceback, never a change to the store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from asyncjobs import Jobs
from asyncjobs._cli import cli

HOSTILE = [
    "' OR '1'='1",
    "default' --",
    "<script>alert(1)</script>",
    "%",
    "_",
    "*",
    "../../etc/passwd",
    "",
    " default",
    "x" * 5000,
    "\x00",
    "\u202e",
    "default; DELETE FROM asyncjobs_jobs",
]

APP = """
from asyncjobs import Jobs
jobs = Jobs({url!r})

@jobs.task(name="greet")
async def greet(name: str) -> str:
    return "hi " + name
"""


def snapshot(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, status FROM asyncjobs_jobs ORDER BY id").fetchall()
    db.close()
    return [(str(a), str(b)) for a, b in rows]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "cli.db"
    (tmp_path / "hostile_cli_app.py").write_text(APP.format(url=str(db)))
    monkeypatch.syspath_prepend(str(tmp_path))

    async def seed() -> None:
        jobs = Jobs(str(db), workers=False)
        for name in ("a", "b"):
            await jobs.enqueue("greet", name)
        await jobs.close()

    asyncio.run(seed())
    return db


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(cli, ["--app", "hostile_cli_app:jobs", *args])
    exception = None if isinstance(result.exception, SystemExit) else result.exception
    return result.exit_code, result.output, exception


@pytest.mark.parametrize("option", ["--queue", "--task"])
def test_list_filters_with_hostile_values_match_nothing_or_refuse_clearly(
    app: Path, option: str
) -> None:
    before = snapshot(app)
    for value in HOSTILE:
        code, output, exception = invoke("list", option, value, "--json")
        assert exception is None, f"{option} {value[:40]!r} raised {exception!r}"
        if code == 0:
            assert json.loads(output) == [], (option, value[:40])
        else:
            assert code in (1, 2)
            assert "Error" in output or "error" in output, output
            assert "Traceback" not in output
    assert snapshot(app) == before


@pytest.mark.parametrize("command", ["show", "retry", "cancel"])
def test_hostile_job_ids_find_nothing_and_change_nothing(app: Path, command: str) -> None:
    before = snapshot(app)
    for value in [*HOSTILE[:-1], before[0][0] + "' OR '1'='1", before[0][0] + "%"]:
        if not value:
            continue
        code, output, exception = invoke(command, value)
        assert exception is None, f"{command} {value[:40]!r} raised {exception!r}"
        assert code != 0 or "not" in output.lower() or "no " in output.lower(), output
        assert "Traceback" not in output
    assert snapshot(app) == before
