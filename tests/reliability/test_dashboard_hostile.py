"""Hostile requests to ``jobs.dashboard(auth=...)``: none gets through.

Every route, without credentials and with wrong or malformed ones; POSTs without (or
with forged) CSRF tokens; script and SQL in every parameter; path tricks in job ids.
After each batch the store is exactly as before (same ids, same statuses).
"""

from __future__ import annotations

import base64
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from asyncjobs import Jobs
from asyncjobs._metrics import ASGIApp
from asyncjobs.testing import FakeClock, drain

USER, PASSWORD = "ops", "correct horse battery staple"
SCRIPT = "<script>alert(1)</script>"
SQL = "' OR '1'='1'; DROP TABLE asyncjobs_jobs; --"
HOSTILE = [
    SCRIPT,
    SQL,
    '"><img src=x onerror=alert(1)>',
    "%00",
    "../../etc/passwd",
    "queued' --",
    "x" * 5000,
    "\u202egnp.exe",
]
ROUTES_GET = ["/", "/jobs", "/jobs/{id}"]
ROUTES_POST = ["/jobs/{id}/retry", "/jobs/{id}/cancel", "/jobs/{id}/discard", "/retry-dead"]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


GOOD = basic(USER, PASSWORD)
BAD_CREDENTIALS = [
    {},
    basic(USER, "wrong"),
    basic("admin", PASSWORD),
    basic(USER, PASSWORD + " "),
    basic(USER, ""),
    basic("", ""),
    {"authorization": "Basic"},
    {"authorization": "Basic !!!notbase64"},
    {"authorization": "Bearer " + PASSWORD},
    {"authorization": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    {"authorization": "Basic " + base64.b64encode(USER.encode()).decode()},
    {"authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}:x".encode()).decode()},
]


def snapshot(path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, status, attempts FROM asyncjobs_jobs ORDER BY id").fetchall()
    db.close()
    return [(str(a), str(b), int(c)) for a, b, c in rows]


@pytest.fixture
async def mix(tmp_path: Path) -> AsyncIterator[tuple[Jobs, Path, dict[str, str]]]:
    """A store with one dead, one queued and one succeeded job, plus a hostile payload."""
    path = tmp_path / "jobs.db"
    jobs = Jobs(str(path), clock=FakeClock())

    @jobs.task(name="ok")
    async def ok(text: str) -> str:
        return text

    @jobs.task(name="fail", retries=0)
    async def fail() -> None:
        raise ValueError(SCRIPT)

    ids = {"succeeded": (await ok.enqueue(SCRIPT)).id, "dead": (await fail.enqueue()).id}
    await drain(jobs)
    ids["queued"] = (await ok.enqueue(SQL)).id
    try:
        yield jobs, path, ids
    finally:
        await jobs.close()


def client(jobs: Jobs, app: ASGIApp | None = None, address: str = "127.0.0.1") -> httpx.AsyncClient:
    app = app or jobs.dashboard(auth=(USER, PASSWORD))
    transport = httpx.ASGITransport(app=app, client=(address, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://dash")


async def test_every_route_refuses_missing_wrong_and_malformed_credentials(
    mix: tuple[Jobs, Path, dict[str, str]],
) -> None:
    """Each request from its own address: one address is locked out (429) after five
    wrong logins, before its credentials are checked (tests/dashboard/test_dashboard_lockout.py)."""
    jobs, path, ids = mix
    before = snapshot(path)
    app = jobs.dashboard(auth=(USER, PASSWORD))
    tried = 0
    for headers in BAD_CREDENTIALS:
        for route in ROUTES_GET + ROUTES_POST:
            url = route.format(id=ids["dead"])
            method = "GET" if route in ROUTES_GET else "POST"
            async with client(jobs, app, address=f"10.0.0.{tried}") as http:
                response = await http.request(method, url, headers=headers)
            assert response.status_code == 401, (headers, route, response.status_code)
            assert ids["dead"] not in response.text
            assert SCRIPT not in response.text
            tried += 1
    assert tried == len(BAD_CREDENTIALS) * 7
    assert snapshot(path) == before


async def test_posts_without_a_valid_csrf_token_change_nothing(
    mix: tuple[Jobs, Path, dict[str, str]],
) -> None:
    jobs, path, ids = mix
    before = snapshot(path)
    async with client(jobs) as http:
        page = await http.get(f"/jobs/{ids['dead']}", headers=GOOD)
        assert page.status_code == 200
        found = CSRF.search(page.text)
        assert found is not None, "the job page has no CSRF token"
        real = found.group(1)
        forged = [
            None,
            "",
            "0" * len(real),
            real[:-1] + ("0" if real[-1] != "0" else "1"),
            real.upper(),
            SQL,
            SCRIPT,
        ]
        for route in ROUTES_POST:
            url = route.format(id=ids["dead"])
            for token in forged:
                form = {} if token is None else {"csrf_token": token}
                response = await http.post(url, data=form, headers=GOOD)
                assert response.status_code == 403, (route, token, response.status_code)
                # and from a client that never loaded the page (a cross-site POST)
                async with client(jobs) as other:
                    response = await other.post(url, data=form, headers=GOOD)
                assert response.status_code == 403, (route, token, response.status_code)
            # the real token in a body that is not a form, or too large, is refused too
            for body, kind in (
                (f'{{"csrf_token": "{real}"}}', "application/json"),
                ("csrf_token=" + real + "&x=" + "a" * 20_000, "application/x-www-form-urlencoded"),
            ):
                response = await http.post(
                    url, content=body, headers={**GOOD, "content-type": kind}
                )
                assert response.status_code == 403, (route, kind)
    assert snapshot(path) == before


async def test_script_and_sql_in_every_parameter_are_inert(
    mix: tuple[Jobs, Path, dict[str, str]],
) -> None:
    jobs, path, ids = mix
    before = snapshot(path)
    async with client(jobs) as http:
        for value in HOSTILE:
            for name in ("status", "queue", "task", "before", "done", "page", "csrf_token"):
                response = await http.get("/jobs", params={name: value}, headers=GOOD)
                assert response.status_code in (200, 400), (name, value, response.status_code)
                assert SCRIPT not in response.text
                assert "onerror=alert" not in response.text.replace("onerror=alert(1)&gt;", "")
                if name in ("queue", "task") and response.status_code == 200:
                    # a filter that matches nothing lists nothing (no injected OR 1=1)
                    assert not any(job_id in response.text for job_id in ids.values())
            for job_id in (ids["succeeded"], ids["dead"]):
                response = await http.get(f"/jobs/{job_id}", params={"done": value}, headers=GOOD)
                assert response.status_code == 200
                assert SCRIPT not in response.text  # the stored <script> argument is escaped
        overview = await http.get("/", headers=GOOD)
        assert overview.status_code == 200
        assert SCRIPT not in overview.text
    assert snapshot(path) == before


def same_origin(response: httpx.Response) -> bool:
    """A redirect that stays on the dashboard (never an open redirect)."""
    location = response.headers.get("location", "")
    return response.status_code in (307, 308) and (
        location.startswith("http://dash/") or (location.startswith("/") and "//" not in location)
    )


PATH_TRICKS = [  # (plain ../ segments are resolved by the client before they are sent)
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2f",
    "..%252F",
    "{dead}%2Fretry",
    "{dead}%00",
    "{dead}'%20OR%20'1'='1",
    "{dead}%20",
    "%2F%2Fevil.example",
    "/evil.example",
    "%20{dead}",
    "x" * 10_000,
    "%",
    "{dead};DROP TABLE asyncjobs_jobs",
    "<script>",
]


async def test_path_tricks_in_job_ids_find_nothing_and_change_nothing(
    mix: tuple[Jobs, Path, dict[str, str]],
) -> None:
    jobs, path, ids = mix
    before = snapshot(path)
    async with client(jobs) as http:
        page = await http.get(f"/jobs/{ids['dead']}", headers=GOOD)
        found = CSRF.search(page.text)
        assert found is not None
        form = {"csrf_token": found.group(1)}
        for trick in PATH_TRICKS:
            job_id = trick.format(dead=ids["dead"], queued=ids["queued"])
            response = await http.get(f"/jobs/{job_id}", headers=GOOD)
            if response.status_code in (307, 308):  # the router drops a trailing slash
                assert same_origin(response), response.headers["location"]
            else:
                assert response.status_code in (404, 400, 405), (job_id[:80], response.status_code)
            assert ids["dead"] not in response.text or trick.startswith("{dead}")
            for action in ("retry", "cancel", "discard"):
                response = await http.post(f"/jobs/{job_id}/{action}", data=form, headers=GOOD)
                assert response.status_code in (403, 404, 400, 405) or same_origin(response), (
                    job_id[:80],
                    action,
                    response.status_code,
                )
    assert snapshot(path) == before
    # and the real job is still reachable the normal way
    async with client(jobs) as http:
        assert (await http.get(f"/jobs/{ids['dead']}", headers=GOOD)).status_code == 200
