"""Dashboard pages (overview, job lists, one job) and actions (retry, cancel, discard)."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from asyncjobs._codec import visible
from asyncjobs._dashboard.auth import CSRF_COOKIE, CSRF_FIELD, Authenticator, Csrf
from asyncjobs._errors import RetryRefused
from asyncjobs._models import FINISHED, JobStatus, info_from_row
from asyncjobs._queries import list_rows
from asyncjobs._settings import is_name
from asyncjobs._stats import human_duration
from asyncjobs.stores import Preview

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs
    from asyncjobs._metrics import Message, Receive, Scope, Send

logger = logging.getLogger("asyncjobs")

PAGE_SIZE = 50
LIST_PREVIEW = 1_000
"""The most of each job's payload, result and error the job list reads (characters,
``Store.list(preview=...)``): a result may be 64 MiB, and the list shows 80 characters
of the arguments. Longer arguments are shown as the start of their stored JSON text."""
JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # fullmatch: a $ takes a trailing newline
"""Job ids are URL-safe tokens (uuid hex); anything else is refused before the store."""
MAX_FORM_BYTES = 16 * 1024
STATUSES = [s.value for s in JobStatus]
NOTICES = {
    "retried": "The job is queued again.",
    "retried-waiting": "The job was retried: it waits again for the chain member before it "
    "to succeed (or, a batch's on_complete, for its members to finish).",
    "not-retried": "Only dead or cancelled jobs can be retried.",
    "result-gone": "Not retried: this chain member takes the result of the job before it, "
    "which is no longer stored and never passed it one. Enqueue its task again with that "
    "result, or retry the chain from its first job.",
    "cancelled": "The job was cancelled.",
    "stopping": "The job was asked to stop: it is cancelled once its worker has stopped it "
    "(at the worker's next heartbeat).",
    "not-cancelled": "The job had already finished, or was already asked to stop.",
    "finished-first": "The job was asked to stop, but it finished before its worker stopped it.",
    "discarded": "The job was deleted.",
    "not-discarded": "Running jobs cannot be deleted; cancel them first.",
    "gone": "The job no longer exists: it was deleted meanwhile.",
    "retried-dead": "Every dead job is queued again.",
    "retried-none": "There was no dead job to retry.",
}
_CANCEL_NOTICE: dict[JobStatus | None, str] = {
    JobStatus.RUNNING: "stopping",
    JobStatus.CANCELLED: "cancelled",
}
"""The notice of a cancel, by the job's status read after it (else ``finished-first``)."""
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class Dashboard:
    """The dashboard's ASGI app: authentication first, then the Starlette routes."""

    def __init__(self, jobs: Jobs, auth: Authenticator) -> None:
        self.jobs = jobs
        self.auth = auth
        self.csrf = Csrf(jobs)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("asyncjobs._dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(
            ago=_ago,
            when=_when,
            pretty=_pretty,
            clip=_clip,
            inline=_inline,
            unescaped=_unescaped,
            visible=visible,
        )
        self.app = Starlette(
            routes=[
                Route("/", self.overview, methods=["GET"]),
                Route("/jobs", self.job_list, methods=["GET"]),
                Route("/jobs/{job_id}", self.job_page, methods=["GET"]),
                Route("/jobs/{job_id}/{action}", self.job_action, methods=["POST"]),
                Route("/retry-dead", self.retry_dead, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = await self.auth.refusal(Request(scope, receive))
        if refusal is not None:
            await refusal(scope, receive, send_secure)
            return
        await self.app(scope, receive, send_secure)

    # -- pages -----------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        stats = await self.jobs.stats()
        return await self.render(request, "overview.html", stats=stats, statuses=STATUSES)

    async def job_list(self, request: Request) -> Response:
        query = request.query_params
        status = query.get("status") or None
        queue = query.get("queue") or None
        task = query.get("task") or None
        before_text = query.get("before") or None
        if status is not None and status not in STATUSES:
            return await self.message(request, 400, f"Unknown status {status!r}.")
        if any(v is not None and not is_name(v) for v in (queue, task)):
            return await self.message(
                request,
                400,
                "Queue and task names are printable text of at most 200 characters.",
            )
        before = None
        if before_text is not None:
            if not _CURSOR.fullmatch(before_text):
                return await self.message(request, 400, "Bad page cursor.")
            before = int(before_text)
        now = self.jobs.clock.now()
        rows = await list_rows(
            self.jobs.store,
            preview=LIST_PREVIEW,
            status=status,
            queue=queue,
            task=task,
            limit=PAGE_SIZE + 1,
            before_seq=before,
            now=now,
        )
        page = rows[:PAGE_SIZE]
        return await self.render(
            request,
            "jobs.html",
            # With the payload when it was cut short: its arguments no longer parse.
            jobs=[
                (info_from_row(row, now), row.payload if isinstance(row.payload, Preview) else None)
                for row in page
            ],
            status=status,
            queue=queue,
            task=task,
            paged=before is not None,
            next_before=page[-1].seq if len(rows) > PAGE_SIZE else None,
            statuses=STATUSES,
            notice=NOTICES.get(query.get("done", "")),
        )

    async def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not JOB_ID.fullmatch(job_id):
            return await self.message(request, 404, "No such job.")
        info = await self.jobs.get(job_id)
        if info is None:
            return await self.message(request, 404, "No such job (never enqueued, or pruned).")
        return await self.render(
            request,
            "job.html",
            job=info,
            finished=info.status in FINISHED,
            retryable=info.status in (JobStatus.DEAD, JobStatus.CANCELLED),
            notice=NOTICES.get(request.query_params.get("done", "")),
        )

    # -- actions ---------------------------------------------------------------------

    async def job_action(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        action = request.path_params["action"]
        if not JOB_ID.fullmatch(job_id) or action not in ("retry", "cancel", "discard"):
            return await self.message(request, 404, "No such job or action.")
        refused = await self.check_csrf(request)
        if refused is not None:
            return refused
        if action == "retry":
            try:
                done = "retried" if await self.jobs.retry(job_id) else "not-retried"
            except RetryRefused:
                done = "result-gone"
            if done == "retried":
                # A chain member that never ran (or a batch's on_complete) waits again.
                info = await self.jobs.get(job_id)
                if info is not None and info.status is JobStatus.WAITING:
                    done = "retried-waiting"
        elif action == "cancel":
            done = "not-cancelled"
            if await self.jobs.cancel(job_id):
                info = await self.jobs.get(job_id)
                status = None if info is None else info.status
                # Asked to stop while it ran, it may have ended on its own before its
                # worker saw that (succeeded, dead): as the CLI's cancel says.
                done = _CANCEL_NOTICE.get(status, "finished-first")
        elif await self.jobs.discard(job_id):  # Jobs.discard logs it
            return self.redirect(request, "/jobs", done="discarded")
        else:
            done = "not-discarded"
        if done.startswith("not-") and await self.jobs.get(job_id) is None:
            # Deleted (in another tab, or pruned) since its page was shown: say that, on
            # the list, rather than why an existing job refuses the action (or a 404).
            done = "gone"
        logger.info("dashboard action %s on job %s: %s", action, job_id, done,
                    extra={"job_id": job_id})  # fmt: skip
        if done == "gone":
            return self.redirect(request, "/jobs", done=done)
        return self.redirect(request, f"/jobs/{job_id}", done=done)

    async def retry_dead(self, request: Request) -> Response:
        refused = await self.check_csrf(request)
        if refused is not None:
            return refused
        count = await self.jobs.retry_dead()
        logger.info("dashboard: retried %d dead job(s)", count)
        return self.redirect(
            request, "/jobs", status="queued", done="retried-dead" if count else "retried-none"
        )

    async def check_csrf(self, request: Request) -> Response | None:
        form = await _read_form(request)
        if form is None or not await self.csrf.valid(request, form.get(CSRF_FIELD)):
            return await self.message(
                request, 403, "Missing or invalid CSRF token: reload the page and try again."
            )
        return None

    # -- rendering -------------------------------------------------------------------

    async def render(
        self, request: Request, template: str, *, status_code: int = 200, **context: Any
    ) -> Response:
        prefix = str(request.scope.get("root_path", "")).rstrip("/")
        nonce = self.csrf.nonce(request)
        new_nonce = nonce is None
        if nonce is None:
            nonce = self.csrf.new_nonce()

        def url(path: str, **params: object) -> str:
            query = {k: v for k, v in params.items() if v is not None and v != ""}
            return prefix + path + ("?" + urlencode(query) if query else "")

        html = self.templates.get_template(template).render(
            url=url,
            csrf_field=CSRF_FIELD,
            csrf_token=await self.csrf.token(nonce),
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        # A page a browser asked for sets a cookie it lacked; a POST without one (another
        # site's forged form) must not replace the cookie of the pages open in it.
        if new_nonce and request.method in ("GET", "HEAD"):
            response.set_cookie(
                CSRF_COOKIE,
                nonce,
                # As the browser sends the path (percent-encoded): a mount at a path of
                # any other character would never match, or not fit in a header at all.
                path=quote(prefix) or "/",
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
            )
        return response

    async def message(self, request: Request, status_code: int, text: str) -> Response:
        return await self.render(request, "message.html", status_code=status_code, text=text)

    def redirect(self, request: Request, path: str, **params: str) -> Response:
        prefix = str(request.scope.get("root_path", "")).rstrip("/")
        query = "?" + urlencode(params) if params else ""
        return RedirectResponse(prefix + path + query, status_code=303)


async def _read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form body (small, no files); None if it is anything else."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in parsed.items()}


def _ago(seconds: float | None) -> str:
    return human_duration(seconds, missing="\u2013")


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_CURSOR = re.compile(r"[0-9]{1,18}")  # ASCII digits: str.isdigit() takes "²" too


SHOWN_CHARS = 100_000
"""The most of one value (arguments, result, error) a job's page shows: a result may
be 64 MiB, more than a browser will lay out. ``asyncjobs show ID --json`` has it all."""


_KEPT = "\n\t"
"""The characters that do not print a ``<pre>`` shows as they are: the line breaks and
tabs of indented JSON and of a traceback."""


def _clip(text: str) -> str:
    """The start of ``text`` that the page shows (``SHOWN_CHARS``), a character that
    does not print written as its escape (``visible``), as in the job list."""
    if len(text) <= SHOWN_CHARS:
        return visible(text, keep=_KEPT)
    hidden = len(text) - SHOWN_CHARS
    shown = visible(text[:SHOWN_CHARS], keep=_KEPT)
    return f"{shown}\n\u2026 {hidden:,} more characters (asyncjobs show ID --json)"


def _inline(value: object) -> str:
    """``value`` as JSON on one line, for the job list: as the job's page writes it
    (Jinja's ``tojson`` writes ``'``, ``&``, ``<``, ``>`` and non-ASCII text as ``\\u``
    escapes, which autoescaping makes unneeded); a plain string, escaped by the page.
    A character that does not print stays a ``\\u`` escape (``visible``), as in
    ``_unescaped``: a right-to-left override would turn the rest of the cell around."""
    return visible(json.dumps(value, ensure_ascii=False, sort_keys=True))


_JSON_ESCAPE = re.compile(
    r"\\(?:u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|u([0-9a-f]{4})|.)", re.I | re.S
)
"""An escape in JSON text, read from the left (so ``\\\\u0041`` is an escaped backslash
and then text): a surrogate pair, another ``\\u`` escape, or any other."""


def _unescaped(text: str) -> str:
    """The start of a stored JSON value (cut short, so it no longer parses) with the
    ``\\u`` escapes of printable characters written as those characters: the store's
    JSON escapes every non-ASCII one (``ensure_ascii``), and ``_inline`` writes a whole
    value without them. An escape cut in two, a lone surrogate, a control or a format
    character (a right-to-left override) stays escaped."""

    def character(match: re.Match[str]) -> str:
        high, low, code = match.groups()
        if high is not None:
            char = chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
        elif code is not None:
            char = chr(int(code, 16))
        else:
            return match.group()
        return char if char.isprintable() and not 0xD800 <= ord(char) <= 0xDFFF else match.group()

    return _JSON_ESCAPE.sub(character, text)


def _pretty(value: object) -> str:
    """``value`` as indented JSON, encoded only as far as the page shows it: ``json``
    indents in Python, seconds for tens of megabytes of small objects. A value cut
    short does not say how much more there is (that would take encoding it all). A
    character that does not print is written as its escape (``visible``)."""
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False, sort_keys=True)
    chunks = encoder.iterencode(value)
    text: list[str] = []
    length = 0
    for chunk in chunks:
        text.append(chunk)
        length += len(chunk)
        # Past what is shown, with more to come (after one long string, often none).
        if length > SHOWN_CHARS and next(chunks, None) is not None:
            shown = visible("".join(text)[:SHOWN_CHARS], keep=_KEPT)
            return f"{shown}\n\u2026 the rest is not shown (asyncjobs show ID --json)"
    return _clip("".join(text))
