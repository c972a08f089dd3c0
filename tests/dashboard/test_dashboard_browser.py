"""The dashboard in a real headless Chromium (Playwright) against a real uvicorn server.

Needs Debian's chromium at /usr/bin/chromium (``.ci/run`` installs it); skips
otherwise. Set ``ASYNCJOBS_UPDATE_SCREENSHOT=1`` to refresh docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from dashboard_helpers import PASSWORD, USER, Mix, seed_showcase

from asyncjobs import Jobs, JobStatus
from asyncjobs._clock import SystemClock
from asyncjobs.testing import FakeClock

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
PREFIX = "/admin/jobs"

SERVER_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from asyncjobs import Jobs

jobs = Jobs(os.environ["DASHBOARD_TEST_DB_URL"], workers=False)


async def home(request):
    return PlainTextResponse("the app")

app = Starlette(routes=[
    Route("/", home),
    Mount("/admin/jobs", app=jobs.dashboard(auth=(os.environ["DASHBOARD_USER"],
                                                  os.environ["DASHBOARD_PASSWORD"]))),
])
"""

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt install chromium)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def seeded(tmp_path: Path) -> AsyncIterator[Mix]:
    real = SystemClock()
    clock = FakeClock(start=real.now() - 75)
    jobs = Jobs("sqlite:///" + str(tmp_path / "dash.db"), clock=clock, concurrency=1)
    mix = await seed_showcase(jobs, clock)
    clock.advance(max(real.now() - clock.now(), 0))
    await jobs.runner.record_beat()  # a worker process, seen just now
    yield mix
    await jobs.close()


@pytest.fixture
async def server(tmp_path: Path, seeded: Mix) -> AsyncIterator[str]:
    """uvicorn serving the dashboard mounted at /admin/jobs; yields the base URL."""
    (tmp_path / "dash_app.py").write_text(SERVER_APP)
    port = free_port()
    env = {
        **os.environ,
        # Ahead of the caller's own (a checkout under test): not instead of it, which
        # ran the installed asyncjobs.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "DASHBOARD_TEST_DB_URL": "sqlite:///" + str(tmp_path / "dash.db"),
        "DASHBOARD_USER": USER,
        "DASHBOARD_PASSWORD": PASSWORD,
    }
    command = [sys.executable, "-m", "uvicorn", "dash_app:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    async with await anyio.open_process(command, env=env, stdout=subprocess.DEVNULL) as process:
        try:
            with anyio.fail_after(20):
                async with httpx.AsyncClient() as client:
                    while True:
                        assert process.returncode is None, "uvicorn exited"
                        try:
                            await client.get(base + "/")
                            break
                        except httpx.TransportError:
                            await SystemClock().sleep(0.05)  # a real server starting up
            yield base
        finally:
            process.terminate()
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def test_dashboard_in_a_real_browser(server: str, seeded: Mix, tmp_path: Path) -> None:
    jobs = seeded.jobs
    dashboard = server + PREFIX
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            # Unauthenticated: refused.
            anonymous = await browser.new_context()
            page = await anonymous.new_page()
            with pytest.raises(playwright_api.Error, match="AUTH"):
                await page.goto(dashboard + "/")  # the browser gets a 401 it cannot answer
            refused = await anonymous.request.get(dashboard + "/")
            assert refused.status == 401
            assert "charge_card" not in await refused.text()
            await anonymous.close()

            context = await browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport={"width": 1440, "height": 900},
            )
            page = await context.new_page()
            page.set_default_timeout(15_000)
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: dialogs.append(dialog.message))

            # The overview renders the queues.
            response = await page.goto(dashboard + "/")
            assert response is not None
            assert response.status == 200
            queues = page.locator("#queues")
            await queues.wait_for()
            assert "charge_card" in await queues.inner_text()
            assert "resize_image" in await queues.inner_text()
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("ASYNCJOBS_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)

            # A dead job is retried by a click.
            await page.click("text=Dead")
            await page.click(f'a[href="{PREFIX}/jobs/{seeded.dead_id}"]')
            assert "payment gateway timed out" in await page.locator("#error").inner_text()
            await page.click("#retry")
            await page.locator("#notice").wait_for()
            assert await page.locator("#status").inner_text() == "queued"
            row = await jobs.store.get(seeded.dead_id)  # (this test's clock lags the server's)
            assert row is not None
            assert row.status == "queued"

            # A job argument holding <script> is shown as text and never runs.
            await page.goto(f"{dashboard}/jobs/{seeded.evil_id}")
            assert "<script>alert('owned')</script>" in await page.locator("#args").inner_text()
            assert await page.locator("#args script").count() == 0
            assert dialogs == []

            # A forged cross-site form post (no CSRF token) is refused.
            (other_dead,) = [j for j in await jobs.list(status="dead") if j.id != seeded.dead_id][
                :1
            ]
            attacker = await context.new_page()
            await attacker.set_content(
                f'<form method="post" action="{dashboard}/jobs/{other_dead.id}/retry">'
                '<button id="go">win a prize</button></form>'
            )
            async with attacker.expect_navigation() as navigation:
                await attacker.click("#go")
            forged = await navigation.value
            assert forged is not None
            assert forged.status == 403
            assert "CSRF" in await attacker.content()
            info = await jobs.get(other_dead.id)
            assert info is not None
            assert info.status == JobStatus.DEAD
            await context.close()
        finally:
            await browser.close()


async def test_a_link_from_another_site_keeps_open_pages_working(server: str, seeded: Mix) -> None:
    """A link to the dashboard in an alert email or a chat message is a cross-site
    navigation, which a SameSite=Strict cookie does not go with: the page it opened
    set a new CSRF cookie, and every dashboard page already open refused its next
    action (403, "reload the page")."""
    dashboard = server + PREFIX
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD}
            )
            context.set_default_timeout(15_000)
            already_open = await context.new_page()
            await already_open.goto(f"{dashboard}/jobs/{seeded.dead_id}")
            chat = await context.new_page()
            await chat.set_content(
                f'<a id="alert" href="{dashboard}/jobs/{seeded.queued_id}">a job failed</a>'
            )
            async with chat.expect_navigation():
                await chat.click("#alert")
            assert await chat.locator("#status").inner_text() == "queued"

            async with already_open.expect_navigation():
                await already_open.click("#retry")
            assert "CSRF" not in await already_open.content()
            assert await already_open.locator("#status").inner_text() == "queued"
            row = await seeded.jobs.store.get(seeded.dead_id)
            assert row is not None
            assert row.status == "queued"
            await context.close()
        finally:
            await browser.close()
