"""JobsMiddleware and jobs.lifespan under Starlette's and FastAPI's TestClient (runs lifespan)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from asyncjobs import Jobs, JobsMiddleware, JobStatus, StoreError
from asyncjobs._asgi import Receive, Scope, Send
from asyncjobs.testing import FakeClock, drain


def make_jobs(tmp_path: Path) -> Jobs:
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), shutdown_timeout=5)

    @jobs.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    return jobs


async def enqueue_and_wait(request: StarletteRequest) -> JSONResponse:
    jobs: Jobs = request.state.jobs
    job = await jobs.enqueue("double", int(request.path_params["x"]))
    return JSONResponse({"id": job.id, "result": await job.result(timeout=5)})


ROUTES = [Route("/double/{x}", enqueue_and_wait, methods=["POST"])]


def stored_status(tmp_path: Path, job_id: str) -> str:
    import sqlite3

    with sqlite3.connect(tmp_path / "jobs.db") as db:
        row = db.execute("SELECT status FROM asyncjobs_jobs WHERE id = ?", (job_id,)).fetchone()
    (status,) = row
    return str(status)


def running(jobs: Jobs) -> bool:
    """Whether workers run (a call, so mypy does not narrow the property)."""
    return jobs.started


def recording(app: Any, sent: list[dict[str, Any]]) -> Any:
    """``app``, with the lifespan messages it sends the server appended to ``sent``."""

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Any) -> None:
            if scope["type"] == "lifespan":
                sent.append(dict(message))
            await send(message)

        await app(scope, receive, recording_send)

    return recorded


def test_starlette_middleware_runs_workers_for_the_app_lifetime(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    app = Starlette(routes=ROUTES, middleware=[Middleware(JobsMiddleware, jobs=jobs)])
    assert not running(jobs)
    with TestClient(app) as client:
        assert running(jobs)
        response = client.post("/double/21")
        assert response.status_code == 200
        assert response.json()["result"] == 42
    assert not running(jobs)
    assert stored_status(tmp_path, response.json()["id"]) == JobStatus.SUCCEEDED


def test_app_lifespan_starts_before_the_workers_and_stops_after_them(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    events: list[tuple[str, bool]] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append(("app startup", jobs.started))
        yield {"greeting": "hello"}
        events.append(("app shutdown", jobs.started))

    async def greet(request: StarletteRequest) -> PlainTextResponse:
        assert request.state.jobs is jobs
        return PlainTextResponse(request.state.greeting)

    app = Starlette(
        routes=[*ROUTES, Route("/greet", greet)],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
        lifespan=lifespan,
    )
    with TestClient(app) as client:
        events.append(("serving", jobs.started))
        assert client.get("/greet").text == "hello"
        assert client.post("/double/2").json()["result"] == 4
    assert events == [("app startup", False), ("serving", True), ("app shutdown", False)]


def test_fastapi_app_with_lifespan_gets_jobs_on_request_state(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    shut_down = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shut_down.append(True)

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(JobsMiddleware, jobs=jobs)

    @app.post("/double/{x}")
    async def double(x: int, request: Request) -> dict[str, Any]:
        job = await request.state.jobs.enqueue("double", x)
        return {"result": await job.result(timeout=5)}

    with TestClient(app) as client:
        assert running(jobs)
        assert client.post("/double/5").json() == {"result": 10}
    assert shut_down == [True]
    assert not running(jobs)


def test_fastapi_app_without_lifespan(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    app = FastAPI()
    app.add_middleware(JobsMiddleware, jobs=jobs)

    @app.post("/double/{x}")
    async def double(x: int, request: Request) -> dict[str, Any]:
        job = await request.state.jobs.enqueue("double", x)
        return {"result": await job.result(timeout=5)}

    with TestClient(app) as client:
        assert client.post("/double/8").json() == {"result": 16}
    assert not running(jobs)


def test_app_that_does_not_speak_lifespan_still_completes_startup_and_shutdown(
    tmp_path: Path,
) -> None:
    jobs = make_jobs(tmp_path)
    seen: list[str] = []

    async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"this app only serves http, not {scope['type']}")
        seen.append(type(scope["state"]["jobs"]).__name__)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with TestClient(JobsMiddleware(bare_app, jobs=jobs)) as client:
        assert running(jobs)
        assert client.get("/").status_code == 204
    assert not running(jobs)
    assert seen == ["Jobs"]


async def test_requests_get_jobs_on_state_even_without_a_lifespan_run(tmp_path: Path) -> None:
    """Without lifespan (httpx's ASGITransport) the store opens lazily on enqueue."""
    jobs = make_jobs(tmp_path)

    async def enqueue(request: StarletteRequest) -> JSONResponse:
        job = await request.state.jobs.enqueue("double", 1)
        return JSONResponse({"id": job.id})

    app = Starlette(
        routes=[Route("/", enqueue, methods=["POST"])],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            job_id = (await client.post("/")).json()["id"]
        assert not running(jobs)
        info = await jobs.get(job_id)
        assert info is not None
        assert info.status == JobStatus.QUEUED
    finally:
        await jobs.close()


def test_unwritable_store_fails_startup_with_a_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    jobs = Jobs("sqlite:///" + str(blocker / "jobs.db"))
    messages: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never reached")

    spy = recording(JobsMiddleware(app, jobs=jobs), messages)
    with pytest.raises(StoreError, match="cannot open the SQLite store"), TestClient(spy):
        pass
    assert [m["type"] for m in messages] == ["lifespan.startup.failed"]
    assert messages[0]["message"].startswith("asyncjobs could not start: cannot open the SQLite")
    assert str(blocker) in messages[0]["message"]
    assert not running(jobs)


def test_an_app_shutdown_failing_after_asyncjobs_could_not_start_is_reported_too(
    tmp_path: Path,
) -> None:
    """The app's shutdown runs since asyncjobs could not start; its failure was lost."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    jobs = Jobs("sqlite:///" + str(blocker / "jobs.db"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        raise RuntimeError("closing the connection pool failed")

    app = Starlette(middleware=[Middleware(JobsMiddleware, jobs=jobs)], lifespan=lifespan)
    sent: list[dict[str, Any]] = []
    with pytest.raises(StoreError, match="cannot open"), TestClient(recording(app, sent)):
        pass
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    message = sent[0]["message"]
    assert message.startswith("asyncjobs could not start: cannot open the SQLite store")
    assert "; then the app's shutdown failed: " in message
    assert "closing the connection pool failed" in message


UNREACHABLE = "postgresql://postgres:secret@127.0.0.1:1/test"  # nothing listens on port 1
COULD_NOT_CONNECT = (
    "PostgreSQL store could not connect to 'postgresql://postgres:***@127.0.0.1:1/test' "
    "(open): ConnectionRefusedError"
)


async def test_unreachable_postgres_fails_startup_naming_the_url_and_no_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Startup fails and the process exits: nothing will reconnect, so the message says
    it could not connect, where (the password hidden) and why, and promises nothing."""
    pytest.importorskip("asyncpg")
    jobs = Jobs(UNREACHABLE)
    try:
        with pytest.raises(StoreError) as refused:
            async with jobs.lifespan():
                raise AssertionError("never reached")
    finally:
        await jobs.close()
    assert str(refused.value).startswith(COULD_NOT_CONNECT)
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "asyncjobs._asgi"]
    assert logged == f"asyncjobs could not start: {refused.value}"
    for text in (logged, str(refused.value)):
        assert "reconnecting" not in text
        assert "secret" not in text


def test_app_startup_failure_is_reported_and_workers_never_start(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        missing = ["0002_users.sql"]
        if missing:
            raise RuntimeError("database migrations are missing")
        yield

    app = Starlette(middleware=[Middleware(JobsMiddleware, jobs=jobs)], lifespan=lifespan)
    with pytest.raises(RuntimeError, match="migrations are missing"), TestClient(app):
        pass
    assert not running(jobs)


def test_a_raw_app_raising_in_its_startup_fails_the_startup(tmp_path: Path) -> None:
    """A raw ASGI app (not Starlette, which sends startup.failed itself) that took the
    startup message and then raised was taken for an app without lifespan: the
    workers started and the server served an app whose startup had failed."""
    jobs = make_jobs(tmp_path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            raise RuntimeError("the database is unreachable")

    sent: list[dict[str, Any]] = []
    with (
        pytest.raises(RuntimeError, match="database is unreachable"),
        TestClient(recording(JobsMiddleware(app, jobs=jobs), sent)),
    ):
        pass
    assert not running(jobs)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "the database is unreachable" in sent[0]["message"]


def test_app_shutdown_failure_is_raised_once_the_jobs_are_stopped_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Starlette raises it without the middleware, so a test client shows it too."""
    jobs = make_jobs(tmp_path)
    events: list[str] = []
    close_store = jobs.store.close

    async def recording_close() -> None:
        events.append("store closed")
        await close_store()

    monkeypatch.setattr(jobs.store, "close", recording_close)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        events.append(f"app shutdown, workers running: {jobs.started}")
        raise RuntimeError("flushing the cache failed")

    app = Starlette(
        routes=ROUTES, middleware=[Middleware(JobsMiddleware, jobs=jobs)], lifespan=lifespan
    )
    sent: list[dict[str, Any]] = []
    failed = pytest.raises(RuntimeError, match="flushing the cache failed")
    with failed, TestClient(recording(app, sent)) as client:
        assert client.post("/double/2").json()["result"] == 4
    assert events == ["app shutdown, workers running: False", "store closed"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "flushing the cache failed" in sent[-1]["message"]


def test_an_app_lifespan_that_crashes_while_serving_is_reported_at_shutdown(
    tmp_path: Path,
) -> None:
    jobs = make_jobs(tmp_path)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            raise RuntimeError("the cache refresher died")

    sent: list[dict[str, Any]] = []
    middleware = JobsMiddleware(app, jobs=jobs)
    with (
        pytest.raises(RuntimeError, match="cache refresher died"),
        TestClient(recording(middleware, sent)),
    ):
        pass
    assert not running(jobs)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "the cache refresher died" in sent[-1]["message"]


def test_workers_that_crash_while_the_app_serves_say_so_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The app served on, its jobs queued up with no worker, and nothing said so until
    the server's shutdown (``stop()`` raising the crash): the log now says it when the
    workers stop."""
    jobs = make_jobs(tmp_path)
    crash = anyio.Event()

    async def heartbeat_loop(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await crash.wait()
        raise StoreError("the store went away")

    jobs.runner.heartbeat_loop = heartbeat_loop  # type: ignore[method-assign]
    app = Starlette(routes=ROUTES, middleware=[Middleware(JobsMiddleware, jobs=jobs)])

    async def crash_the_workers() -> None:
        host = jobs._host
        assert host is not None
        crash.set()
        await asyncio.wait({host})

    with TestClient(app) as client:
        assert client.portal is not None
        client.portal.call(crash_the_workers)
        (logged,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert logged.getMessage().startswith("the asyncjobs workers crashed: ")
        assert logged.exc_info is not None
        assert "the store went away" in caplog.text
    # The server is still told at shutdown (lifespan.shutdown.failed).
    assert "stopping the asyncjobs workers failed" in caplog.text


def test_jobs_lifespan_for_apps_that_compose_their_own(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    app = Starlette(routes=ROUTES, lifespan=jobs.lifespan)
    with TestClient(app) as client:
        assert running(jobs)
        assert client.post("/double/4").json()["result"] == 8
    assert not running(jobs)


def test_jobs_lifespan_nested_in_an_app_lifespan(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with jobs.lifespan(app) as state:
            yield {**state, "name": "demo"}

    async def name(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse(request.state.name)

    app = Starlette(routes=[*ROUTES, Route("/name", name)], lifespan=lifespan)
    with TestClient(app) as client:
        assert client.get("/name").text == "demo"
        assert client.post("/double/3").json()["result"] == 6
    assert not running(jobs)


def test_two_mounted_apps_sharing_one_jobs_keep_its_workers_until_the_last_stops(
    tmp_path: Path,
) -> None:
    """Starlette runs no mounted app's lifespan: the parent's runs theirs. Each entered
    ``jobs.lifespan``; the first to end stopped the workers and closed the store while
    the other app still served (and its shutdown could still be enqueueing). The
    workers now stop at the last exit."""
    jobs = make_jobs(tmp_path)
    api = Starlette(routes=ROUTES, lifespan=jobs.lifespan)
    admin = Starlette(lifespan=jobs.lifespan)
    seen: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with api.router.lifespan_context(api) as state:
            async with admin.router.lifespan_context(admin):
                yield dict(state or {})
            seen.append(running(jobs))  # the admin app has stopped; the api goes on
            job = await jobs.enqueue("double", 5)  # the api's shutdown enqueues a job
            seen.append(await job.result(timeout=5) == 10)
        seen.append(running(jobs))

    app = Starlette(routes=[Mount("/api", api), Mount("/admin", admin)], lifespan=lifespan)
    with TestClient(app) as client:
        assert client.post("/api/double/4").json()["result"] == 8
    assert seen == [True, True, False]


def test_a_jobs_under_its_middleware_and_in_the_apps_lifespan_stops_before_the_apps_shutdown(
    tmp_path: Path,
) -> None:
    """Both entered (the README shows them as alternatives): it starts once. The
    middleware still stops the workers before the app's shutdown, whose resources (here
    those its lifespan opens inside ``jobs.lifespan``) a job may use; the store closes
    once both have ended."""
    jobs = make_jobs(tmp_path)
    events: list[tuple[str, bool]] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with jobs.lifespan(app) as state:
            events.append(("app startup", running(jobs)))
            yield state
            events.append(("app shutdown", running(jobs)))
        events.append(("app lifespan ended", running(jobs)))

    app = Starlette(
        routes=ROUTES, middleware=[Middleware(JobsMiddleware, jobs=jobs)], lifespan=lifespan
    )
    with TestClient(app) as client:
        assert client.post("/double/4").json()["result"] == 8
    assert events == [
        ("app startup", True),
        ("app shutdown", False),
        ("app lifespan ended", False),
    ]
    assert not running(jobs)
    assert jobs._entries == 0


@asynccontextmanager
async def asgi_lifespan(app: Any) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan in this event loop (a TestClient runs its own)."""
    to_app, inbox = anyio.create_memory_object_stream[dict[str, Any]](2)
    sent: list[str] = []
    answered = anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        answered.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with to_app, inbox, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, inbox.receive, send)
        await to_app.send({"type": "lifespan.startup"})
        await answered.wait()
        assert sent == ["lifespan.startup.complete"]
        yield
        await to_app.send({"type": "lifespan.shutdown"})
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_a_jobs_under_its_middleware_and_another_apps_lifespan_runs_until_both_end(
    tmp_path: Path,
) -> None:
    """An app under JobsMiddleware, and beside it another app's ``jobs.lifespan`` that
    outlives it: the middleware's shutdown leaves the workers to the other."""
    jobs = make_jobs(tmp_path)
    app = Starlette(routes=ROUTES, middleware=[Middleware(JobsMiddleware, jobs=jobs)])
    with anyio.fail_after(10):
        async with jobs.lifespan():  # the other app's
            async with asgi_lifespan(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    assert (await client.post("/double/4")).json()["result"] == 8
            assert running(jobs)
            assert await (await jobs.enqueue("double", 5)).result(timeout=5) == 10
        assert not running(jobs)


def test_requests_without_a_lifespan_warn_once_that_no_worker_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``uvicorn --lifespan off`` (or a mounted sub-app): jobs would only queue up."""
    jobs = make_jobs(tmp_path)
    app = Starlette(
        routes=[Route("/", lambda request: PlainTextResponse("hi"))],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
    client = TestClient(app)  # not as a context manager: no lifespan
    with caplog.at_level(logging.WARNING, logger="asyncjobs"):
        assert client.get("/").text == "hi"
        assert client.get("/").text == "hi"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "workers are not running" in warnings[0]
    assert "--lifespan off" in warnings[0]


def test_no_lifespan_warning_when_the_lifespan_ran_or_the_process_only_enqueues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = [Route("/", lambda request: PlainTextResponse("hi"))]
    jobs = make_jobs(tmp_path)
    app = Starlette(routes=routes, middleware=[Middleware(JobsMiddleware, jobs=jobs)])
    web = Jobs("sqlite:///" + str(tmp_path / "web.db"), workers=False)
    enqueue_only = Starlette(routes=routes, middleware=[Middleware(JobsMiddleware, jobs=web)])
    with caplog.at_level(logging.WARNING, logger="asyncjobs"):
        with TestClient(app) as client:
            assert client.get("/").text == "hi"
        assert TestClient(enqueue_only).get("/").text == "hi"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_no_lifespan_warning_for_a_test_that_drives_the_jobs_on_a_fake_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's way to test an endpoint (httpx's ASGITransport, which sends no
    lifespan; the jobs run by drain on a fake clock) is not told that no worker runs."""
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), clock=FakeClock())

    @jobs.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    async def endpoint(request: StarletteRequest) -> JSONResponse:
        job = await request.state.jobs.enqueue(double, 2)
        return JSONResponse({"id": job.id})

    app = Starlette(
        routes=[Route("/", endpoint, methods=["POST"])],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
    try:
        with caplog.at_level(logging.WARNING, logger="asyncjobs"):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                job_id = (await client.post("/")).json()["id"]
            await drain(jobs)
        assert await jobs.get(job_id) is not None
        assert (await double.jobs.get(job_id)).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await jobs.close()
