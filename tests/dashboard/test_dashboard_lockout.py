"""Guessing the dashboard's basic-auth password: a client is locked out (429) after five
wrong logins, for a wait that doubles up to five minutes, measured on the fake clock."""

from __future__ import annotations

import base64
import logging

import httpx
import pytest
from dashboard_helpers import PASSWORD, USER
from starlette.requests import Request

from asyncjobs import Jobs
from asyncjobs._dashboard import lockout as lockout_module
from asyncjobs._dashboard.lockout import FORGET_AFTER, MAX_CLIENTS, Lockout
from asyncjobs._metrics import ASGIApp, Receive, Scope, Send
from asyncjobs.testing import FakeClock

RIGHT = httpx.BasicAuth(USER, PASSWORD)
WRONG = httpx.BasicAuth(USER, "guess")


def on(app: ASGIApp, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client of ``app`` connecting from ``address``."""
    transport = httpx.ASGITransport(app=app, client=(address, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def fail(app: ASGIApp, times: int, address: str = "127.0.0.1") -> None:
    """``times`` wrong logins, each still answered by the credential check (401)."""
    async with on(app, address) as client:
        for _ in range(times):
            assert (await client.get("/", auth=WRONG)).status_code == 401


async def test_five_wrong_logins_lock_the_client_out_with_429_and_retry_after(
    jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    app = jobs.dashboard(auth=(USER, PASSWORD))
    async with on(app) as client:
        # No credentials, another scheme, garbage: not guesses, never counted.
        for _ in range(10):
            assert (await client.get("/")).status_code == 401
            bearer = await client.get("/", headers={"authorization": "Bearer abc"})
            assert bearer.status_code == 401
            garbled = await client.get("/", headers={"authorization": "Basic !!!"})
            assert garbled.status_code == 401
        with caplog.at_level(logging.WARNING, logger="asyncjobs"):
            await fail(app, 5)
            for auth in (WRONG, httpx.BasicAuth("root", "toor"), None):
                locked = await client.get("/", auth=auth)
                assert locked.status_code == 429
                assert locked.headers["retry-after"] == "2"
                assert "www-authenticate" not in locked.headers
                assert locked.headers["x-frame-options"] == "DENY"
            posted = await client.post("/retry-dead", auth=WRONG)
            assert posted.status_code == 429
    (record,) = [r for r in caplog.records if "locked out" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "127.0.0.1" in record.getMessage()
    for secret in (USER, PASSWORD, "guess", "root", "toor"):
        assert secret not in record.getMessage()


async def test_the_right_password_waits_out_the_lock_then_resets_the_count(
    jobs: Jobs, clock: FakeClock
) -> None:
    app = jobs.dashboard(auth=(USER, PASSWORD))
    await fail(app, 5)
    async with on(app) as client:
        early = await client.get("/", auth=RIGHT)
        assert early.status_code == 429
        assert early.headers["retry-after"] == "2"
        clock.advance(1.5)
        later = await client.get("/", auth=RIGHT)
        assert later.status_code == 429
        assert later.headers["retry-after"] == "1"
        clock.advance(0.5)
        assert (await client.get("/", auth=RIGHT)).status_code == 200
    # The count starts again: four more free wrong logins, the fifth locks for 2 s again.
    await fail(app, 5)
    async with on(app) as client:
        locked = await client.get("/", auth=RIGHT)
        assert locked.headers["retry-after"] == "2"


async def test_each_failure_after_a_lock_doubles_it_up_to_five_minutes(
    jobs: Jobs, clock: FakeClock
) -> None:
    app = jobs.dashboard(auth=(USER, PASSWORD))
    await fail(app, 5)
    waits = []
    async with on(app) as client:
        for _ in range(11):
            locked = await client.get("/", auth=RIGHT)
            assert locked.status_code == 429
            waits.append(int(locked.headers["retry-after"]))
            clock.advance(waits[-1])
            assert (await client.get("/", auth=WRONG)).status_code == 401  # one guess, counted
    assert waits == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


async def test_other_clients_are_unaffected(jobs: Jobs) -> None:
    app = jobs.dashboard(auth=(USER, PASSWORD))
    await fail(app, 5, "203.0.113.7")
    async with on(app, "203.0.113.7") as locked:
        assert (await locked.get("/", auth=RIGHT)).status_code == 429
    async with on(app, "203.0.113.8") as other:
        assert (await other.get("/", auth=RIGHT)).status_code == 200
        assert (await other.get("/", auth=WRONG)).status_code == 401
    async with on(app, "203.0.113.7") as locked:
        assert (await locked.get("/", auth=RIGHT)).status_code == 429


async def test_ipv6_clients_count_by_their_64_network_and_mapped_ipv4_as_ipv4(
    jobs: Jobs,
) -> None:
    """One host holds a whole /64, so hopping addresses inside it does not help."""
    app = jobs.dashboard(auth=(USER, PASSWORD))
    for n in range(5):
        await fail(app, 1, f"2001:db8:1:2::{n + 1:x}")
    async with on(app, "2001:db8:1:2:ffff::9") as same_network:
        assert (await same_network.get("/", auth=RIGHT)).status_code == 429
    async with on(app, "2001:db8:1:3::1") as next_network:
        assert (await next_network.get("/", auth=RIGHT)).status_code == 200
    await fail(app, 5, "::ffff:198.51.100.4")
    async with on(app, "198.51.100.4") as same_host:
        assert (await same_host.get("/", auth=RIGHT)).status_code == 429
    async with on(app, "::ffff:198.51.100.5") as other_host:
        assert (await other_host.get("/", auth=RIGHT)).status_code == 200


async def test_without_a_client_address_every_request_shares_one_bucket(jobs: Jobs) -> None:
    """A server that gives no address (a Unix socket): guessing is still limited."""
    dashboard = jobs.dashboard(auth=(USER, PASSWORD))

    async def anonymous(scope: Scope, receive: Receive, send: Send) -> None:
        await dashboard({**scope, "client": None}, receive, send)

    await fail(anonymous, 5, "192.0.2.1")
    async with on(anonymous, "192.0.2.2") as client:
        assert (await client.get("/", auth=RIGHT)).status_code == 429
    async with on(dashboard, "192.0.2.2") as addressed:
        assert (await addressed.get("/", auth=RIGHT)).status_code == 200


async def test_many_addresses_push_the_least_recently_failed_out(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table is capped (here at 3 clients): a newcomer evicts the oldest entry."""
    monkeypatch.setattr(lockout_module, "MAX_CLIENTS", 3)
    app = jobs.dashboard(auth=(USER, PASSWORD))
    await fail(app, 5, "198.51.100.1")
    for n in range(2, 4):
        await fail(app, 1, f"198.51.100.{n}")
    async with on(app, "198.51.100.1") as first:
        assert (await first.get("/", auth=RIGHT)).status_code == 429  # still remembered
    await fail(app, 1, "198.51.100.4")
    async with on(app, "198.51.100.1") as first:
        assert (await first.get("/", auth=RIGHT)).status_code == 200  # pushed out


def test_the_table_stays_bounded_under_many_addresses() -> None:
    """At the real cap: twice as many addresses as it holds, each locked."""
    lockout = Lockout()
    now = 1_000.0
    for n in range(MAX_CLIENTS * 2 + 5):
        client = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        for _ in range(5):
            lockout.failed(client, now)
        now += 0.001
    assert len(lockout) == MAX_CLIENTS
    assert lockout.wait(client, now) > 0  # the newest is kept, locked
    assert lockout.wait("10.0.0.0", now) == 0  # the oldest went first
    # Clients quiet for FORGET_AFTER are dropped by the next failure, not kept for good.
    lockout.failed("192.0.2.1", now + FORGET_AFTER)
    assert len(lockout) == 1


async def test_a_callable_is_never_locked_out(jobs: Jobs) -> None:
    """The app's callable decides every request, however many it refused before."""
    right = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def only_right_basic(request: Request) -> bool:
        return request.headers.get("authorization") == "Basic " + right

    app = jobs.dashboard(auth=only_right_basic)
    async with on(app) as client:
        for _ in range(20):
            assert (await client.get("/", auth=WRONG)).status_code == 403
        assert (await client.get("/", auth=RIGHT)).status_code == 200


def test_a_host_that_is_no_address_counts_by_its_start_and_is_logged_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy may forward any text as the client's host: the key stays short, and the
    warning shows it escaped (no line breaks or terminal codes in the log)."""
    host = "evil\n\x1b[31m" + "x" * 10_000
    key = lockout_module.client_key({"client": (host, 1234)})
    assert key == host[: lockout_module.MAX_HOST]
    table = Lockout()
    with caplog.at_level(logging.WARNING, logger="asyncjobs"):
        for _ in range(lockout_module.LOCK_AFTER):
            table.failed(key, 0.0)
    (record,) = [r for r in caplog.records if "locked out" in r.getMessage()]
    assert "\n" not in record.getMessage()
    assert "\x1b" not in record.getMessage()


def test_a_clock_stepped_back_never_stretches_a_lock() -> None:
    """The dashboard's clock is wall time: set back an hour after a lockout (an NTP
    step), the client still waits no longer than its lock."""
    table = Lockout()
    for _ in range(lockout_module.LOCK_AFTER):
        table.failed("203.0.113.7", 10_000.0)
    assert table.wait("203.0.113.7", 10_000.0) == lockout_module.FIRST_LOCK
    assert table.wait("203.0.113.7", 10_000.0 - 3_600.0) == lockout_module.FIRST_LOCK
