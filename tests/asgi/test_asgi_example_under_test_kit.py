"""The README's testing recipe, applied to the shipped example app: the plugin's
``asyncjobs_isolate`` (a temporary store, a fake clock), then ``drain``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest


async def load_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolate: Any, **env: str
) -> tuple[Any, Any]:
    """The example app, imported afresh with ``env`` (its settings), and its ``Jobs`` on
    the plugin's temporary store and fake clock; its own tables made."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))  # the repo: examples/
    monkeypatch.setenv("APP_DB", str(tmp_path / "app.db"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "examples.starlette_app.app", raising=False)
    example = importlib.import_module("examples.starlette_app.app")
    monkeypatch.delitem(sys.modules, "examples.starlette_app.app")  # as before, after
    jobs = await isolate(example.jobs)
    async with example.lifespan(example.app):  # the app's own tables
        pass
    return example, jobs


async def test_drain_runs_the_example_apps_jobs_under_the_fake_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asyncjobs_isolate: Any
) -> None:
    """The example's tasks simulate a slow provider. Waiting on ``jobs.clock`` for it,
    under the test's fake clock, ``drain`` never returned: nobody advances the clock
    while the test awaits it. Their latency is real time."""
    example, jobs = await load_example(
        tmp_path, monkeypatch, asyncjobs_isolate, EMAIL_FAILURE_RATE="0", EMAIL_DELAY="0.01"
    )
    thumbnail = await example.make_thumbnail.enqueue("upload-1")
    email = await example.send_verification_email.enqueue(1, "ada@example.com")
    with anyio.fail_after(10):
        await jobs.drain()
    assert await thumbnail.result(timeout=1) == "upload-1-thumb.png"
    assert (await email.result(timeout=1)).startswith("msg-")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/signup", "not json"),
        ("/signup", '["ada@example.com"]'),
        ("/uploads", "not json"),
        ("/uploads", "{}"),
        ("/uploads", '{"user_id": "one"}'),
    ],
)
async def test_the_example_answers_a_malformed_body_with_422_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asyncjobs_isolate: Any, path: str, body: str
) -> None:
    """A newcomer trying the README's curl commands with a typo got a 500 and a
    traceback in the server's log; the example says what it wants instead."""
    example, jobs = await load_example(tmp_path, monkeypatch, asyncjobs_isolate)
    transport = httpx.ASGITransport(app=example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(path, content=body)
    assert response.status_code == 422, response.text
    assert "error" in response.json()
    assert await jobs.list() == []


async def test_the_example_retries_a_dead_job_and_tells_apart_an_unknown_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asyncjobs_isolate: Any
) -> None:
    """``POST /jobs/{id}/retry``: 202 for a dead job, 409 for one that is not dead or
    cancelled, and 404 for an id that names no job (as ``GET /jobs/{id}`` answers),
    not a 409 that reads as if the job existed."""
    example, jobs = await load_example(
        tmp_path, monkeypatch, asyncjobs_isolate, EMAIL_FAILURE_RATE="1", EMAIL_DELAY="0"
    )
    dead = await example.send_verification_email.options(retries=0).enqueue(1, "a@example.com")
    with anyio.fail_after(10):
        await jobs.drain()
    assert (await jobs.get(dead.id)).status == "dead"
    transport = httpx.ASGITransport(app=example.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        retried = await client.post(f"/jobs/{dead.id}/retry")
        again = await client.post(f"/jobs/{dead.id}/retry")  # queued now, not dead
        unknown = await client.post("/jobs/no-such-job/retry")
    assert (retried.status_code, retried.json()) == (202, {"retried": True})
    assert (again.status_code, again.json()) == (409, {"retried": False})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json() == {"error": "no such job"}
