"""The dashboard over HTTP (httpx + ASGI): auth, CSRF, escaping, ids, actions, paging."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dashboard_helpers import (
    EVIL,
    PASSWORD,
    USER,
    MakeJobs,
    Mix,
    build_mix,
    client_for,
    csrf_token,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from asyncjobs import ConfigurationError, Jobs, JobStatus
from asyncjobs._dashboard.app import LIST_PREVIEW, SHOWN_CHARS, _pretty
from asyncjobs._execution import MAX_ERROR_CHARS
from asyncjobs.stores import ClaimRequest, JobRow, Outcome, OutcomeKind, TaskLimits
from asyncjobs.stores._ops_rows import WorkerBeat
from asyncjobs.stores._sqlite import SQLiteStore
from asyncjobs.testing import FakeClock

AUTH = httpx.BasicAuth(USER, PASSWORD)


@pytest.fixture
async def mix(make_jobs: MakeJobs, clock: FakeClock) -> Mix:
    return await build_mix(make_jobs())


# -- authentication ---------------------------------------------------------------


def test_building_without_auth_is_refused(jobs: Jobs) -> None:
    with pytest.raises(ConfigurationError, match="needs auth"):
        jobs.dashboard()
    with pytest.raises(ConfigurationError, match="username, password"):
        jobs.dashboard(auth=("admin", ""))
    with pytest.raises(ConfigurationError, match="tuple or a callable"):
        jobs.dashboard(auth="admin:secret")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cannot contain ':'"):
        jobs.dashboard(auth=("ops:team", "secret"))  # could never log in


async def test_requests_without_or_with_wrong_credentials_are_refused(mix: Mix) -> None:
    async with client_for(mix.jobs) as client:
        for path in ("/", "/jobs", f"/jobs/{mix.dead_id}"):
            response = await client.get(path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Basic")
            assert "send_email" not in response.text
        for user, password in [
            (USER, "wrong"),
            ("root", PASSWORD),
            (USER, PASSWORD + "x"),
            ("", ""),
        ]:
            response = await client.get("/", auth=httpx.BasicAuth(user, password))
            assert response.status_code == 401
        garbled = await client.get("/", headers={"authorization": "Basic !!!not-base64"})
        assert garbled.status_code == 401
        token = await client.get("/", headers={"authorization": "Bearer abc"})
        assert token.status_code == 401
        refused = await client.post(f"/jobs/{mix.dead_id}/retry")
        assert refused.status_code == 401
        assert (await client.get("/", auth=AUTH)).status_code == 200
    assert (await mix.jobs.get(mix.dead_id)).status == JobStatus.DEAD  # type: ignore[union-attr]


async def test_a_callable_decides_sync_or_async(mix: Mix) -> None:
    def header_ok(request: Request) -> bool:
        return request.headers.get("x-admin") == "yes"

    async def async_ok(request: Request) -> bool:
        return request.headers.get("x-admin") == "yes"

    def broken(request: Request) -> bool:
        raise RuntimeError("auth backend down")

    for auth in (header_ok, async_ok):
        async with client_for(mix.jobs, auth=auth) as client:
            assert (await client.get("/")).status_code == 403
            assert (await client.get("/", headers={"x-admin": "yes"})).status_code == 200
    async with client_for(mix.jobs, auth=broken) as client:
        assert (await client.get("/", headers={"x-admin": "yes"})).status_code == 403


# -- CSRF -------------------------------------------------------------------------


async def test_posts_without_a_valid_csrf_token_are_refused(mix: Mix) -> None:
    async with client_for(mix.jobs, login=True) as client:
        page = await client.get(f"/jobs/{mix.dead_id}")
        token = csrf_token(page.text)
        assert "asyncjobs_csrf" in client.cookies
        url = f"/jobs/{mix.dead_id}/retry"
        assert (await client.post(url)).status_code == 403
        assert (await client.post(url, data={"csrf_token": "0" * 64})).status_code == 403
        assert (await client.post(url, data={"csrf_token": "é" * 64})).status_code == 403
        assert (await client.post(url, json={"csrf_token": token})).status_code == 403
        cross_site = await client.post(
            url, data={"csrf_token": token}, headers={"sec-fetch-site": "cross-site"}
        )
        assert cross_site.status_code == 403
        assert (await client.get(url)).status_code == 405
        assert (await client.post("/retry-dead", data={})).status_code == 403
    # A token is bound to the browser's cookie: another browser's token fails.
    async with client_for(mix.jobs, login=True) as other:
        await other.get("/")
        assert (await other.post(url, data={"csrf_token": token})).status_code == 403
    assert (await mix.jobs.get(mix.dead_id)).status == JobStatus.DEAD  # type: ignore[union-attr]


async def test_a_refused_post_without_the_cookie_does_not_set_one(mix: Mix) -> None:
    """A forged cross-site form arrives without the browser's cookie: its 403 page sets
    no new cookie, so the dashboard pages open in that browser keep their tokens."""
    async with client_for(mix.jobs, login=True) as client:
        token = csrf_token((await client.get("/")).text)
        nonce = client.cookies["asyncjobs_csrf"]
        client.cookies.clear()  # as a cross-site POST comes: without the SameSite cookie
        forged = await client.post(f"/jobs/{mix.dead_id}/retry", data={"csrf_token": "0" * 64})
        assert forged.status_code == 403
        assert "set-cookie" not in forged.headers
        client.cookies.set("asyncjobs_csrf", nonce)
        kept = await client.post(f"/jobs/{mix.dead_id}/retry", data={"csrf_token": token})
        assert kept.status_code == 303
    assert (await mix.jobs.get(mix.dead_id)).status == JobStatus.QUEUED  # type: ignore[union-attr]


async def test_tokens_are_shared_by_every_process_on_the_store(mix: Mix) -> None:
    """Two dashboards (two processes behind a load balancer) accept each other's tokens."""
    async with client_for(mix.jobs, login=True) as first:
        token = csrf_token((await first.get("/")).text)
        cookies = dict(first.cookies)
    async with client_for(mix.jobs, login=True, cookies=cookies) as second:
        response = await second.post(f"/jobs/{mix.dead_id}/retry", data={"csrf_token": token})
        assert response.status_code == 303
    assert (await mix.jobs.get(mix.dead_id)).status == JobStatus.QUEUED  # type: ignore[union-attr]


# -- escaping and ids -------------------------------------------------------------


async def test_script_in_an_argument_is_escaped_everywhere(mix: Mix) -> None:
    async with client_for(mix.jobs, login=True) as client:
        for path in (f"/jobs/{mix.evil_id}", "/jobs", "/jobs?status=queued"):
            html = (await client.get(path)).text
            assert "<script>" not in html
            assert "alert(" in html  # it is shown, as text
        page = (await client.get(f"/jobs/{mix.evil_id}")).text
        assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in page
        dead = (await client.get(f"/jobs/{mix.dead_id}")).text
        assert "flaky failed &lt;b&gt;7&lt;/b&gt;" in dead  # the traceback is escaped too
        assert "<b>7" not in dead
        response = await client.get("/jobs", params={"queue": EVIL})
        assert "<script>" not in response.text
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/..%2F..%2Fetc%2Fpasswd",
        "/jobs/%2e%2e",
        "/jobs/abc%00def",
        "/jobs/x'%20OR%20'1'='1",
        "/jobs/%3Cscript%3E",
        "/jobs/" + "a" * 65,
        "/jobs/%E2%80%AEabc",
        "/jobs/ab%20cd",
        "/jobs/abc%0A",  # a $ in the pattern would take the trailing newline
    ],
)
async def test_tricky_job_ids_are_refused(mix: Mix, path: str) -> None:
    async with client_for(mix.jobs, login=True) as client:
        response = await client.get(path)
        assert response.status_code == 404
        assert "<script>" not in response.text
        token = csrf_token((await client.get("/")).text)
        posted = await client.post(path + "/retry", data={"csrf_token": token})
        assert posted.status_code == 404


async def test_unknown_filters_and_cursors_are_rejected(mix: Mix) -> None:
    async with client_for(mix.jobs, login=True) as client:
        assert (await client.get("/jobs", params={"status": "bogus"})).status_code == 400
        assert (await client.get("/jobs", params={"before": "-1"})).status_code == 400
        assert (await client.get("/jobs", params={"before": "1e9"})).status_code == 400
        assert (await client.get("/jobs", params={"before": "\u00b2"})).status_code == 400
        assert (await client.get("/jobs", params={"queue": "q" * 201})).status_code == 400
        assert (await client.get("/jobs/" + "0" * 32)).status_code == 404
        assert (await client.post("/jobs/" + mix.dead_id + "/explode")).status_code == 404


# -- pages and actions ------------------------------------------------------------


async def test_pages_show_the_queues_and_a_job(mix: Mix) -> None:
    async with client_for(mix.jobs, login=True) as client:
        overview = (await client.get("/")).text
        assert 'id="queues"' in overview
        assert "send_email" in overview
        assert "Retry all 1 dead job(s)" in overview
        dead_list = (await client.get("/jobs", params={"status": "dead"})).text
        assert mix.dead_id[:12] in dead_list
        assert mix.queued_id[:12] not in dead_list
        email = (await client.get("/jobs", params={"queue": "email", "task": "send_email"})).text
        assert mix.queued_id[:12] in email
        assert mix.dead_id[:12] not in email
        job = (await client.get(f"/jobs/{mix.dead_id}")).text
        assert "ValueError" in job
        assert 'id="retry"' in job
        assert "1 of 1" in job
        done = (await client.get(f"/jobs/{mix.succeeded_id}")).text
        assert "sent to a@example.com" in done


async def test_retry_cancel_discard_and_retry_all_dead(mix: Mix) -> None:
    jobs = mix.jobs
    async with client_for(jobs, login=True) as client:
        token = csrf_token((await client.get("/")).text)
        form = {"csrf_token": token}
        retried = await client.post(f"/jobs/{mix.dead_id}/retry", data=form)
        assert retried.status_code == 303
        assert retried.headers["location"] == f"/jobs/{mix.dead_id}?done=retried"
        assert (await jobs.get(mix.dead_id)).status == JobStatus.QUEUED  # type: ignore[union-attr]
        page = await client.get(retried.headers["location"])
        assert "The job is queued again." in page.text
        assert (
            (await client.post(f"/jobs/{mix.dead_id}/retry", data=form))
            .headers["location"]
            .endswith("done=not-retried")
        )

        await client.post(f"/jobs/{mix.queued_id}/cancel", data=form)
        assert (await jobs.get(mix.queued_id)).status == JobStatus.CANCELLED  # type: ignore[union-attr]
        discarded = await client.post(f"/jobs/{mix.queued_id}/discard", data=form)
        assert discarded.headers["location"] == "/jobs?done=discarded"
        assert await jobs.get(mix.queued_id) is None
        assert "The job was deleted." in (await client.get(discarded.headers["location"])).text

        await jobs.cancel(mix.dead_id)
        await jobs.cancel(mix.evil_id)
        assert await jobs.list(status="dead") == []
        # Make two dead jobs to retry at once.
        for job_id in (mix.dead_id, mix.evil_id):
            await jobs.retry(job_id)
        await jobs.drain()
        assert len(await jobs.list(status="dead")) == 1  # flaky fails again; send_email succeeds
        response = await client.post("/retry-dead", data=form)
        assert response.status_code == 303
        assert await jobs.list(status="dead") == []
        listed = (await client.get(response.headers["location"])).text
        assert "Every dead job is queued again." in listed
        again = await client.post("/retry-dead", data=form)
        nothing = (await client.get(again.headers["location"])).text
        assert "There was no dead job to retry." in nothing


async def test_retrying_a_chain_member_that_waits_again_says_it_waits(mix: Mix) -> None:
    """A chain member cancelled before it ran, retried, waits again for the member
    before it (not run yet): the page says so, not that it is queued."""
    jobs = mix.jobs
    send_email = jobs.registry["send_email"]
    first, second = (await jobs.chain(send_email.spec("c@x"), send_email.spec("d@x"))).jobs
    assert await jobs.cancel(second.id)
    async with client_for(jobs, login=True) as client:
        form = {"csrf_token": csrf_token((await client.get("/")).text)}
        retried = await client.post(f"/jobs/{second.id}/retry", data=form)
        assert retried.headers["location"] == f"/jobs/{second.id}?done=retried-waiting"
        page = (await client.get(retried.headers["location"])).text
        assert "The job is queued again." not in page
        assert "waits again for the chain member before it" in page
    assert (await second.info()).status == JobStatus.WAITING
    assert (await first.info()).status == JobStatus.QUEUED


async def test_an_action_on_a_job_deleted_meanwhile_says_it_is_gone(mix: Mix) -> None:
    """Deleted in another tab (or pruned) since its page was shown: a discard, retry or
    cancel of it says it no longer exists, not that running jobs cannot be deleted (nor
    a 404 page that it never was enqueued). A running job still cannot be deleted."""
    jobs = mix.jobs
    request = ClaimRequest(
        worker="elsewhere:1:w", tasks={"send_email": TaskLimits(max_attempts=3)},
        queues=None, limit=1, lease=60,
    )  # fmt: skip
    (running,) = await jobs.store.claim(request, now=jobs.clock.now())
    async with client_for(jobs, login=True) as client:
        form = {"csrf_token": csrf_token((await client.get(f"/jobs/{mix.dead_id}")).text)}
        assert await jobs.discard(mix.dead_id)
        for action in ("discard", "retry", "cancel"):
            gone = await client.post(f"/jobs/{mix.dead_id}/{action}", data=form)
            assert gone.headers["location"] == "/jobs?done=gone", action
            page = await client.get(gone.headers["location"])
            assert page.status_code == 200
            assert "The job no longer exists: it was deleted meanwhile." in page.text
            assert "Running jobs cannot be deleted" not in page.text
        kept = await client.post(f"/jobs/{running.id}/discard", data=form)
        assert kept.headers["location"] == f"/jobs/{running.id}?done=not-discarded"
        page = await client.get(kept.headers["location"])
        assert "Running jobs cannot be deleted; cancel them first." in page.text


async def test_cancelling_a_job_running_elsewhere_says_it_is_stopping(mix: Mix) -> None:
    jobs = mix.jobs
    request = ClaimRequest(
        worker="elsewhere:1:w", tasks={"send_email": TaskLimits(max_attempts=3)},
        queues=None, limit=1, lease=60,
    )  # fmt: skip
    (claimed,) = await jobs.store.claim(request, now=jobs.clock.now())
    assert claimed.id == mix.queued_id
    async with client_for(jobs, login=True) as client:
        form = {"csrf_token": csrf_token((await client.get("/")).text)}
        asked = await client.post(f"/jobs/{mix.queued_id}/cancel", data=form)
        assert asked.headers["location"] == f"/jobs/{mix.queued_id}?done=stopping"
        page = (await client.get(asked.headers["location"])).text
        assert "asked to stop" in page
        assert (await jobs.get(mix.queued_id)).status == JobStatus.RUNNING  # type: ignore[union-attr]
        again = await client.post(f"/jobs/{mix.queued_id}/cancel", data=form)
        assert again.headers["location"].endswith("done=not-cancelled")


async def test_cancelling_a_job_that_finishes_before_it_is_stopped_does_not_say_cancelled(
    mix: Mix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job runs in another process, which finishes it (succeeded) right after the
    cancel asked it to stop: the page must not tell the operator it was cancelled."""
    jobs = mix.jobs
    request = ClaimRequest(
        worker="elsewhere:1:w", tasks={"send_email": TaskLimits(max_attempts=3)},
        queues=None, limit=1, lease=60,
    )  # fmt: skip
    (claimed,) = await jobs.store.claim(request, now=jobs.clock.now())
    cancel = jobs.store.cancel

    async def cancel_then_it_succeeds(job_ids: Any, *, now: float) -> builtins.list[str]:
        asked = await cancel(job_ids, now=now)
        done = Outcome(
            job_id=claimed.id, worker=claimed.worker or "", attempt=claimed.attempts,
            kind=OutcomeKind.SUCCEEDED, result='"sent"',
        )  # fmt: skip
        assert await jobs.store.finish([done], now=now) == [claimed.id]
        return asked

    monkeypatch.setattr(jobs.store, "cancel", cancel_then_it_succeeds)
    async with client_for(jobs, login=True) as client:
        form = {"csrf_token": csrf_token((await client.get("/")).text)}
        asked = await client.post(f"/jobs/{claimed.id}/cancel", data=form)
        assert asked.headers["location"] == f"/jobs/{claimed.id}?done=finished-first"
        page = (await client.get(asked.headers["location"])).text
        assert "The job was cancelled." not in page
        assert "finished before" in page
    assert (await jobs.get(claimed.id)).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]


async def test_a_lone_surrogate_in_arguments_or_result_is_shown_escaped(jobs: Jobs) -> None:
    @jobs.task(name="echo")
    async def echo(text: str) -> str:
        return text + "\udc80"

    job = await jobs.enqueue(echo, "caf\u00e9 \ud800")  # strict JSON keeps lone surrogates
    await jobs.drain()
    async with client_for(jobs, login=True) as client:
        page = await client.get(f"/jobs/{job.id}")
        assert page.status_code == 200
        assert "caf\u00e9 \\ud800" in page.text  # as JSON would write it
        assert "\\udc80" in page.text


async def test_the_list_shows_arguments_as_the_job_page_does_not_as_escapes(
    jobs: Jobs,
) -> None:
    """Quotes, ``&``, ``<`` and non-ASCII text read as themselves (escaped for HTML only),
    not as the ``\\u0027`` and ``\\u65e5`` escapes of Jinja's ``tojson``; a lone
    surrogate, a control or a format character (a right-to-left override, which would
    turn the rest of the cell around) still reads as its JSON escape."""
    await jobs.enqueue("send", "O'Brien & <Co>", "\u65e5\u672c \ud800\u202e\x85", note="x>y")
    async with client_for(jobs, login=True) as client:
        page = await client.get("/jobs")
    assert page.status_code == 200
    shown = "[&#34;O&#39;Brien &amp; &lt;Co&gt;&#34;, &#34;\u65e5\u672c \\ud800\\u202e\\u0085&#34;]"
    assert f"<code>{shown} {{&#34;note&#34;: &#34;x&gt;y&#34;}}</code>" in page.text
    assert "\\u0027" not in page.text
    assert "\\u65e5" not in page.text


async def test_the_list_cuts_long_arguments_short(jobs: Jobs) -> None:
    """Arguments the list reads whole (``LIST_PREVIEW``) are shown as JSON, cut short."""

    @jobs.task(name="big")
    async def big(blob: str, *, note: str = "") -> None: ...

    await jobs.enqueue(big, "x" * (LIST_PREVIEW - 100))
    await jobs.enqueue(big, "y", note="z" * (LIST_PREVIEW - 100))
    async with client_for(jobs, login=True) as client:
        page = await client.get("/jobs")
    assert page.status_code == 200
    assert "x" * 100 not in page.text
    assert "z" * 100 not in page.text
    assert "[&#34;xxxx" in page.text
    assert "[&#34;y&#34;] {&#34;note&#34;:..." in page.text


async def test_the_start_of_long_arguments_shows_their_text_not_its_escapes(jobs: Jobs) -> None:
    """Cut short, arguments are the start of their stored JSON, which writes every
    non-ASCII character as an escape (``\\u65e5``, an emoji as two): the list shows
    the characters, as it does for arguments it shows whole. Escapes of characters that
    do not print (a lone surrogate, a control) stay, and so does a backslash typed in."""
    text = "\\u0041 \u00e9\U0001f600\u202e\ud800 " + "\u65e5\u672c " * 400
    await jobs.enqueue("send", text)
    async with client_for(jobs, login=True) as client:
        page = await client.get("/jobs")
    assert page.status_code == 200
    assert "(truncated," in page.text
    shown = "{&#34;args&#34;:[&#34;\\\\u0041 \u00e9\U0001f600\\u202e\\ud800 \u65e5\u672c"
    assert shown in page.text
    assert "\\u65e5" not in page.text


async def test_the_list_reads_only_the_start_of_huge_arguments_and_results(
    make_jobs: MakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of arguments and of result: the list reads LIST_PREVIEW characters of
    each and shows the start of the arguments' JSON marked as cut; the job's page reads
    the whole job."""
    jobs = make_jobs(max_payload_bytes=8 * 1024 * 1024)

    @jobs.task(name="huge")
    async def huge(blob: str) -> str:
        return "r" * 5_000_000

    job = await jobs.enqueue(huge, "p" * 3_000_000)
    await jobs.drain()
    listed: list[JobRow] = []
    store_list = jobs.store.list

    async def spy(**kwargs: Any) -> list[JobRow]:
        rows = await store_list(**kwargs)
        listed.extend(rows)
        return rows

    monkeypatch.setattr(jobs.store, "list", spy)
    async with client_for(jobs, login=True) as client:
        page = await client.get("/jobs")
        job_page = await client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    (row,) = listed
    assert (len(row.payload), len(row.result or "")) == (LIST_PREVIEW, LIST_PREVIEW)
    assert len(page.content) < 20_000
    assert "{&#34;args&#34;:[&#34;pppp" in page.text  # the start of the stored JSON
    assert "p" * 100 not in page.text
    assert "(truncated, 3,000,025 bytes)" in page.text  # {"args":["p…"],"kwargs":{}}
    assert job_page.status_code == 200
    assert "r" * (SHOWN_CHARS - 10) in job_page.text
    assert "4,900,002 more characters" in job_page.text  # read whole, shown clipped
    info = await jobs.get(job.id)
    assert info is not None
    assert info.args == ["p" * 3_000_000]
    assert info.result == "r" * 5_000_000


class StoreOfBefore(SQLiteStore):
    """A store written before ``Store.list`` took ``preview``."""

    async def list(  # type: ignore[override]
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
        now: float,
    ) -> builtins.list[JobRow]:
        return await super().list(
            status=status, queue=queue, task=task, limit=limit, before_seq=before_seq, now=now
        )


async def test_a_store_written_before_previews_still_lists_jobs_whole(
    make_jobs: MakeJobs, db_url: str
) -> None:
    """The dashboard's list and the CLI's ask for previews only of a store that takes
    ``preview=``; one of your own from before reads its values whole, as it did."""
    jobs = make_jobs(store=StoreOfBefore(db_url.removeprefix("sqlite:///")))

    @jobs.task(name="echo")
    async def echo(text: str) -> str:
        return text

    job = await jobs.enqueue(echo, "x" * (LIST_PREVIEW * 2))
    await jobs.drain()
    async with client_for(jobs, login=True) as client:
        page = await client.get("/jobs")
    assert page.status_code == 200
    assert job.id[:12] in page.text
    assert "truncated" not in page.text  # read whole: nothing was cut
    rows, _ = await jobs._list_rows(None, None, None, 10, preview=0)
    assert [(r.id, r.result) for r in rows] == [(job.id, '"' + "x" * (LIST_PREVIEW * 2) + '"')]


async def test_a_job_page_cuts_a_huge_result_and_error_short(jobs: Jobs) -> None:
    """A result may be 64 MiB: the page shows the first SHOWN_CHARS of it."""

    @jobs.task(name="huge", retries=0)
    async def huge(n: int) -> str:
        if n:
            raise RuntimeError("e" * (SHOWN_CHARS + 5_000))
        return "r" * (SHOWN_CHARS + 7_000)

    done, failed = await jobs.enqueue(huge, 0), await jobs.enqueue(huge, 1)
    await jobs.drain()
    async with client_for(jobs, login=True) as client:
        result_page = (await client.get(f"/jobs/{done.id}")).text
        error_page = (await client.get(f"/jobs/{failed.id}")).text
    assert "r" * (SHOWN_CHARS - 10) in result_page
    assert "r" * (SHOWN_CHARS + 1) not in result_page
    assert "7,002 more characters" in result_page  # the two quotes of the JSON string
    # The error was already cut where it was stored (MAX_ERROR_CHARS): shown as stored.
    assert "characters cut ..." in error_page
    assert len(error_page) < 2 * MAX_ERROR_CHARS


async def test_a_job_page_shows_characters_that_do_not_print_as_escapes(jobs: Jobs) -> None:
    """A right-to-left override (U+202E) in arguments, a result, an error or a key turned
    around what the operator reads (a zero-width space hid in it): the job's page shows
    each as its escape, as the job list does; line breaks and tabs of an error stay."""

    @jobs.task(name="spoof", retries=0)
    async def spoof(text: str) -> str:
        if text == "fail":
            # Built, so that the line of the traceback does not read as the escapes shown.
            raise RuntimeError("refund " + chr(0x202E) + "0001$" + chr(0x200B) + "\n\tsent")
        return "ok\u202e"

    done = await jobs.enqueue(spoof.options(idempotency_key="k\u202e"), "abc\u202edef")
    failed = await jobs.enqueue(spoof, "fail")
    await jobs.drain()
    async with client_for(jobs, login=True) as client:
        done_page = (await client.get(f"/jobs/{done.id}")).text
        failed_page = (await client.get(f"/jobs/{failed.id}")).text
    for page in (done_page, failed_page):
        assert "\u202e" not in page
        assert "\u200b" not in page
    assert "&#34;abc\\u202edef&#34;" in done_page
    assert "&#34;ok\\u202e&#34;" in done_page
    assert "<code>k\\u202e</code>" in done_page
    assert "refund \\u202e0001$\\u200b\n\tsent" in failed_page


async def test_the_overview_shows_worker_ids_that_do_not_print_as_escapes(
    mix: Mix, clock: FakeClock
) -> None:
    """A worker's id starts with its host's name, which may hold a right-to-left override
    (U+202E): the overview's workers and stuck jobs showed it raw, turned around."""
    jobs, worker = mix.jobs, "host\u202e:1:w"
    beat = WorkerBeat(
        id=worker, host="host\u202e", pid=1, started_at=clock.now(), running=1,
        concurrency=1, queues=None,
    )  # fmt: skip
    await jobs.store.record_worker(beat, now=clock.now())
    request = ClaimRequest(
        worker=worker, tasks={"send_email": TaskLimits(max_attempts=3)},
        queues=None, limit=1, lease=60,
    )  # fmt: skip
    assert len(await jobs.store.claim(request, now=clock.now())) == 1
    clock.advance(61)  # its lease expired, not yet recovered: a stuck job
    async with client_for(jobs, login=True) as client:
        page = (await client.get("/")).text
    assert "Stuck jobs" in page
    assert "\u202e" not in page
    assert page.count("<code>host\\u202e:1:w</code>") == 2  # the worker, its stuck job


async def test_a_big_structured_result_is_indented_only_as_far_as_the_page_shows(
    jobs: Jobs,
) -> None:
    """The page indents JSON in Python: a 44 MB result of small objects (under the 64
    MiB limit) held the event loop 7 s for a page that shows its first SHOWN_CHARS."""

    @jobs.task(name="report")
    async def report(n: int) -> list[dict[str, Any]]:
        return [{"id": i, "ok": True} for i in range(n)]

    job = await jobs.enqueue(report, 30_000)
    await jobs.drain()
    async with client_for(jobs, login=True) as client:
        page = (await client.get(f"/jobs/{job.id}")).text
    assert "&#34;id&#34;: 0," in page
    assert "&#34;id&#34;: 29999" not in page
    assert "the rest is not shown (asyncjobs show ID --json)" in page

    read = 0

    class Items(list[Any]):
        def __iter__(self) -> Iterator[Any]:
            nonlocal read
            for item in super().__iter__():
                read += 1
                yield item

    shown = _pretty(Items({"id": i, "ok": True} for i in range(200_000)))
    assert read < 10_000  # about 2,500 items fill SHOWN_CHARS
    assert shown.startswith('[\n  {\n    "id": 0,\n    "ok": true\n  },')
    assert len(shown) < SHOWN_CHARS + 100
    assert _pretty([1, "\udc80"]) == '[\n  1,\n  "\\udc80"\n]'  # small: whole, as before


async def test_paging_through_a_long_list(jobs: Jobs) -> None:
    @jobs.task(name="many")
    async def many(n: int) -> None: ...

    for n in range(60):
        await jobs.enqueue(many, n)
    async with client_for(jobs, login=True) as client:
        first = (await client.get("/jobs")).text
        assert first.count('<tr>\n    <td><a href="/jobs/') == 50
        older = first.split('id="older" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        second = (await client.get(older)).text
        assert second.count('<tr>\n    <td><a href="/jobs/') == 10
        assert 'id="older"' not in second
        assert "newest" in second


async def test_mounted_under_a_prefix(mix: Mix) -> None:
    outer = Starlette(routes=[Mount("/admin/jobs", app=mix.jobs.dashboard(auth=(USER, PASSWORD)))])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", auth=AUTH) as client:
        page = await client.get(f"/admin/jobs/jobs/{mix.dead_id}")
        assert page.status_code == 200
        assert f'action="/admin/jobs/jobs/{mix.dead_id}/retry"' in page.text
        assert 'href="/admin/jobs/jobs?status=dead"' in page.text
        assert "Path=/admin/jobs" in page.headers["set-cookie"]
        response = await client.post(
            f"/admin/jobs/jobs/{mix.dead_id}/retry", data={"csrf_token": csrf_token(page.text)}
        )
        assert response.headers["location"] == f"/admin/jobs/jobs/{mix.dead_id}?done=retried"


async def test_mounted_under_a_prefix_that_is_not_ascii(mix: Mix) -> None:
    """The CSRF cookie's path is the prefix as the browser sends it (percent-encoded):
    written as text, it failed every first page with a UnicodeEncodeError (a 500)."""
    outer = Starlette(
        routes=[
            Mount("/\u0430\u0434\u043c\u0438\u043d", app=mix.jobs.dashboard(auth=(USER, PASSWORD)))
        ]
    )
    encoded = "/%D0%B0%D0%B4%D0%BC%D0%B8%D0%BD"
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", auth=AUTH) as client:
        page = await client.get(f"{encoded}/jobs/{mix.dead_id}")
        assert page.status_code == 200
        assert f"Path={encoded};" in page.headers["set-cookie"]
        response = await client.post(
            f"{encoded}/jobs/{mix.dead_id}/retry", data={"csrf_token": csrf_token(page.text)}
        )
        assert response.status_code == 303
        assert response.headers["location"] == f"{encoded}/jobs/{mix.dead_id}?done=retried"


def test_missing_starlette_names_the_extra(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name in ("starlette", "jinja2"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigurationError, match=r"asyncjobs\[dashboard\]"):
        jobs.dashboard(auth=(USER, PASSWORD))
