"""A Starlette app with durable background jobs: see README.md next to this file.

Run it (from the repository root, after ``pip install -e '.[dev]'``)::

    uvicorn examples.starlette_app.app:app

Settings (environment variables):

- ``APP_DB``: the SQLite file holding the app's users *and* its jobs (``example.db``)
- ``EMAIL_FAILURE_RATE``: share of calls the fake email provider fails (``0.3``)
- ``EMAIL_DELAY``: seconds each fake email call takes (``0.5``)
- ``EMAIL_RATE``: the provider's rate limit (``"5/s"``)
- ``SHUTDOWN_TIMEOUT``: seconds running jobs get on shutdown (``10``)
- ``DASHBOARD_USER`` / ``DASHBOARD_PASSWORD``: HTTP basic credentials for the
  dashboard at ``/admin/jobs`` (``admin`` / ``change-me``; set your own)
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asyncjobs import JobInfo, Jobs, JobsMiddleware, JobStatus, current_job

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

DB_PATH = Path(os.environ.get("APP_DB", "example.db")).resolve()
EMAIL_FAILURE_RATE = float(os.environ.get("EMAIL_FAILURE_RATE", "0.3"))
EMAIL_DELAY = float(os.environ.get("EMAIL_DELAY", "0.5"))
EMAIL_RATE = os.environ.get("EMAIL_RATE", "5/s")

# One SQLite file for the app's tables and the jobs, so a signup and its email job
# commit (or roll back) together.
jobs = Jobs(
    "sqlite:///" + str(DB_PATH),
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "10")),
    # The default, spelled out: retry n waits a random 0 to 2**(n-1) s (full jitter),
    # so the retries of a failed email show in the log within 1, 2, 4, 8 s.
    backoff_base=1.0,
)
jobs.limiter("email-provider", EMAIL_RATE)  # the provider's quota, across all processes


# -- a fake email provider: slow, and fails a share of calls ----------------------------


class ProviderError(Exception):
    """The fake provider's 503."""


async def fake_provider_send(address: str, subject: str) -> str:
    # A remote call's latency is real time, not the jobs' clock: under a test's
    # FakeClock nobody would advance it while drain() runs the job.
    await anyio.sleep(EMAIL_DELAY)  # noqa: TID251
    if random.random() < EMAIL_FAILURE_RATE:  # noqa: S311 - a simulation, not security
        raise ProviderError(f"503 from the email provider while sending to {address}")
    return f"msg-{random.randrange(10**9)}"  # noqa: S311


async def record(kind: str, detail: str) -> None:
    """Log each completed job in the app's own table (the tests count these rows)."""
    job = current_job()
    async with aiosqlite.connect(DB_PATH, timeout=10) as db:
        await db.execute(
            "INSERT INTO deliveries (job_id, kind, detail, attempt) VALUES (?, ?, ?, ?)",
            (job.id, kind, detail, job.attempt),
        )
        await db.commit()


# -- tasks --------------------------------------------------------------------------------


@jobs.task(queue="email", retries=4, limiter="email-provider")
async def send_verification_email(user_id: int, address: str) -> str:
    message_id = await fake_provider_send(address, "Please verify your address")
    await record("verification", address)
    return message_id


@jobs.task(queue="media")
async def make_thumbnail(upload_id: str) -> str:
    await anyio.sleep(EMAIL_DELAY)  # noqa: TID251 - the work's own time, as above
    await record("thumbnail", upload_id)
    return f"{upload_id}-thumb.png"


@jobs.task(queue="media")
async def scan_upload(upload_id: str) -> None:
    await record("scan", upload_id)


@jobs.task(queue="email", retries=4, limiter="email-provider")
async def notify_upload_ready(user_id: int, upload_id: str) -> str:
    message_id = await fake_provider_send(f"user-{user_id}@example.com", "Your upload is ready")
    await record("notify", upload_id)
    return message_id


@jobs.cron("0 3 * * *", timezone="UTC")
async def nightly_cleanup() -> int:
    """Every night: delete unverified users older than a week, purge old dead jobs."""
    async with aiosqlite.connect(DB_PATH, timeout=10) as db:
        cursor = await db.execute(
            "DELETE FROM users WHERE verified = 0 AND created_at < unixepoch() - 7 * 86400"
        )
        await db.commit()
    await jobs.purge(status="dead", older_than=30 * 86400)
    return cursor.rowcount


# -- HTTP ---------------------------------------------------------------------------------


async def json_object(request: Request) -> dict[str, Any] | None:
    """The request's body as a JSON object, or None when it is not one (a typo in a
    curl command gets a 422 saying what to send, not a 500)."""
    try:
        data = await request.json()
    except ValueError:  # not JSON, or not UTF-8
        return None
    return data if isinstance(data, dict) else None


async def signup(request: Request) -> JSONResponse:
    """Create the user and enqueue the verification email in one transaction."""
    data = await json_object(request)
    email = "" if data is None else str(data.get("email", "")).strip().lower()
    if "@" not in email:
        return JSONResponse(
            {"error": 'give an email address: {"email": "ada@example.com"}'}, status_code=422
        )
    jobs: Jobs = request.state.jobs
    async with aiosqlite.connect(DB_PATH, isolation_level=None, timeout=10) as db:
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with jobs.transaction(db):
                cursor = await db.execute(
                    "INSERT INTO users (email, created_at) VALUES (?, unixepoch()) RETURNING id",
                    (email,),
                )
                row = await cursor.fetchone()
                assert row is not None  # noqa: S101 - RETURNING gives the row
                user_id = int(row[0])
                job = await send_verification_email.enqueue(user_id, address=email)
        except sqlite3.IntegrityError:
            await db.execute("ROLLBACK")  # no user, and no email job either
            return JSONResponse({"error": f"{email} has already signed up"}, status_code=409)
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
    return JSONResponse({"user_id": user_id, "job_id": job.id}, status_code=202)


async def upload(request: Request) -> JSONResponse:
    """An upload runs scan -> thumbnail -> notify, each step once the previous succeeded."""
    data = await json_object(request)
    user_id = None if data is None else data.get("user_id")
    if not isinstance(user_id, int) or isinstance(user_id, bool):
        return JSONResponse({"error": 'give a user id: {"user_id": 1}'}, status_code=422)
    upload_id = f"upload-{random.randrange(10**9)}"  # noqa: S311
    chain = await request.state.jobs.chain(
        scan_upload.spec(upload_id),
        make_thumbnail.spec(upload_id),
        notify_upload_ready.spec(user_id, upload_id),
    )
    return JSONResponse(
        {"upload_id": upload_id, "job_ids": [job.id for job in chain.jobs]}, status_code=202
    )


def job_json(info: JobInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "task": info.task,
        "queue": info.queue,
        "status": str(info.status),
        "attempts": info.attempts,
        "max_attempts": info.max_attempts,
        "run_at": info.run_at.isoformat(),
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "result": info.result,
        "error": info.error.strip().splitlines()[-1] if info.error else None,
    }


async def job_status(request: Request) -> JSONResponse:
    info = await request.state.jobs.get(request.path_params["job_id"])
    if info is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse(job_json(info))


async def list_jobs(request: Request) -> JSONResponse:
    """``GET /jobs?status=dead`` lists the dead letters (newest first)."""
    status = request.query_params.get("status")
    if status is not None and status not in set(JobStatus):
        return JSONResponse({"error": f"unknown status {status!r}"}, status_code=422)
    infos = await request.state.jobs.list(status=status, limit=50)
    return JSONResponse([job_json(info) for info in infos])


async def retry_job(request: Request) -> JSONResponse:
    """``POST /jobs/{id}/retry`` puts a dead (or cancelled) job back in the queue."""
    jobs, job_id = request.state.jobs, request.path_params["job_id"]
    if await jobs.retry(job_id):
        return JSONResponse({"retried": True}, status_code=202)
    if await jobs.get(job_id) is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse({"retried": False}, status_code=409)  # not dead or cancelled


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "workers": request.state.jobs.started})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The app's own setup: its tables. JobsMiddleware starts the workers after this."""
    DB_PATH.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(DB_PATH) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(
            """
            CREATE TABLE IF NOT EXISTS users (
                id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE,
                verified INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS deliveries (
                id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, kind TEXT NOT NULL,
                detail TEXT NOT NULL, attempt INTEGER NOT NULL);
            """
        )
        await db.commit()
    yield


app = Starlette(
    routes=[
        Route("/signup", signup, methods=["POST"]),
        Route("/uploads", upload, methods=["POST"]),
        Route("/jobs", list_jobs),
        Route("/jobs/{job_id}", job_status),
        Route("/jobs/{job_id}/retry", retry_job, methods=["POST"]),
        Route("/health", health),
        # Operations: the dashboard (HTTP basic auth, CSRF-protected actions) and
        # Prometheus metrics, both read from the store so every process agrees.
        Mount(
            "/admin/jobs",
            jobs.dashboard(
                auth=(
                    os.environ.get("DASHBOARD_USER", "admin"),
                    os.environ.get("DASHBOARD_PASSWORD", "change-me"),
                )
            ),
        ),
        Mount("/metrics", jobs.metrics_app()),
    ],
    middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    lifespan=lifespan,
)
