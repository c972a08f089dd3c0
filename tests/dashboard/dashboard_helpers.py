"""Dashboard test helpers: a known mix of jobs, and what a browser would do."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from asyncjobs import Jobs
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

USER, PASSWORD = "admin", "s3cret-pässword"
EVIL = "<script>alert('owned')</script>"
CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


@dataclass
class Mix:
    jobs: Jobs
    dead_id: str
    queued_id: str
    evil_id: str
    succeeded_id: str


async def build_mix(jobs: Jobs) -> Mix:
    """One dead job, one succeeded, one queued, and one whose arguments are ``<script>``."""

    @jobs.task(name="send_email", queue="email")
    async def send_email(address: str, **extra: Any) -> str:
        return "sent to " + address

    @jobs.task(name="flaky", retries=0)
    async def flaky(n: int) -> None:
        raise ValueError(f"flaky failed <b>{n}</b>")

    succeeded = await jobs.enqueue(send_email, "a@example.com")
    dead = await jobs.enqueue(flaky, 7)
    await drain(jobs)
    queued = await jobs.enqueue(send_email, "b@example.com")
    evil = await jobs.enqueue("send_email", EVIL, note=EVIL)
    return Mix(jobs, dead.id, queued.id, evil.id, succeeded.id)


def client_for(
    jobs: Jobs, *, auth: object = (USER, PASSWORD), login: bool = False, **kwargs: Any
) -> httpx.AsyncClient:
    """An HTTP client on ``jobs.dashboard(auth=auth)``; ``login`` sends the right credentials."""
    app = jobs.dashboard(auth=auth)  # type: ignore[arg-type]
    if login:
        kwargs["auth"] = httpx.BasicAuth(USER, PASSWORD)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", **kwargs
    )


def csrf_token(html: str) -> str:
    match = CSRF.search(html)
    assert match is not None, "no CSRF token in the page"
    return match.group(1)


async def seed_showcase(jobs: Jobs, clock: FakeClock) -> Mix:
    """A realistic few minutes of traffic (for the browser test and the screenshot).

    ``clock`` should start a minute or two in the past; tasks advance it to take time
    (one job at a time with ``concurrency=1``).
    """

    @jobs.task(name="send_email", queue="email")
    async def send_email(address: str, **extra: Any) -> str:
        clock.advance(0.35)
        return "sent to " + address

    @jobs.task(name="resize_image", queue="media")
    async def resize_image(image_id: int) -> dict[str, int]:
        clock.advance(1.2 + (image_id % 5) * 0.3)
        return {"image_id": image_id, "width": 640}

    @jobs.task(name="charge_card", queue="billing", retries=0)
    async def charge_card(order_id: int) -> None:
        clock.advance(0.8)
        if order_id % 7 == 0:
            raise RuntimeError(f"payment gateway timed out for order {order_id}")

    @jobs.task(name="nightly_report", queue="reports")
    async def nightly_report() -> None: ...

    for n in range(30):
        await jobs.enqueue(send_email, f"user{n}@example.com")
    for n in range(12):
        await jobs.enqueue(resize_image, n)
    for n in range(1, 16):
        await jobs.enqueue(charge_card, n)
    await drain(jobs)
    clock.advance(20)
    evil = await jobs.enqueue(send_email, EVIL, note=EVIL)
    queued = await jobs.enqueue(resize_image, 99)
    for n in range(3):
        await jobs.enqueue(send_email, f"late{n}@example.com")
    await jobs.enqueue(nightly_report.options(delay=6 * 3600))
    dead = (await jobs.list(status="dead", task="charge_card"))[-1]
    succeeded = (await jobs.list(status="succeeded", task="send_email", limit=1))[0]
    return Mix(jobs, dead.id, queued.id, evil.id, succeeded.id)
