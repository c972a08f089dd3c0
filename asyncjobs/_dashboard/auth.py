"""Who may use the dashboard, and CSRF protection for its actions.

Authentication is mandatory: ``auth`` is either a callable ``request -> bool``
(or awaitable bool) that the app trusts, or a ``(username, password)`` tuple
checked as HTTP basic credentials in constant time. Basic auth limits guessing
(``lockout.py``): after 5 wrong credentials in a row from one client address, its
requests are answered 429 with ``Retry-After`` for 2 s, doubling with each further
failure up to 5 minutes; right credentials reset the count. A callable gets no such
limit: it decides alone.

Actions are POST forms carrying a token: the HMAC-SHA256 of a random per-browser
nonce (kept in an HttpOnly, SameSite=Lax cookie) under a key stored in the job
store, so every process serving the dashboard accepts the same tokens. A cross-site
page can neither read the cookie nor compute the HMAC without the key. Lax, not
Strict: a link followed from another site (an alert email) comes without a Strict
cookie, so its page would set a new one and every dashboard page already open would
fail its next action; a cross-site POST still comes without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

from asyncjobs._dashboard.lockout import Lockout, client_key, retry_after
from asyncjobs._errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from asyncjobs._clock import Clock
    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")

AuthCallable: TypeAlias = "Callable[[Request], bool | Awaitable[bool]]"
DashboardAuth: TypeAlias = "AuthCallable | tuple[str, str]"

CSRF_COOKIE = "asyncjobs_csrf"
CSRF_FIELD = "csrf_token"
CSRF_KEY_NAME = "dashboard_csrf_key"
_NONCE = re.compile(r"^[0-9a-f]{32}$")


class Authenticator:
    """Checks every request against the ``auth`` given to ``jobs.dashboard``."""

    def __init__(self, auth: object, clock: Clock) -> None:
        if auth is None:
            raise ConfigurationError(
                "jobs.dashboard() needs auth=: a (username, password) tuple for HTTP basic "
                "auth, or a callable request -> bool; it never serves without one"
            )
        self.clock = clock
        self.lockout = Lockout()
        self.basic: tuple[bytes, bytes] | None = None
        self.check: AuthCallable | None = None
        if isinstance(auth, tuple):
            if len(auth) != 2 or not all(isinstance(part, str) and part for part in auth):
                raise ConfigurationError(
                    "dashboard auth as a tuple must be (username, password), both non-empty"
                )
            if ":" in auth[0]:
                raise ConfigurationError(
                    "the dashboard's username cannot contain ':' (HTTP basic auth splits "
                    "the credentials at the first one, so it could never log in)"
                )
            self.basic = (auth[0].encode(), auth[1].encode())
        elif callable(auth):
            self.check = auth
        else:
            raise ConfigurationError(
                f"dashboard auth must be a (username, password) tuple or a callable, got {auth!r}"
            )

    async def refusal(self, request: Request) -> Response | None:
        """``None`` if ``request`` may use the dashboard, else the response refusing it."""
        if self.basic is None:
            return None if await self._callable_allows(request) else _forbidden()
        lockout = self.lockout
        client = None
        if lockout.active:  # someone failed lately; when nobody did, a login costs nothing
            client = client_key(request.scope)
            wait = lockout.wait(client, self.clock.now())
            if wait > 0:
                return _too_many(wait)
        verdict = self._basic_verdict(request.headers.get("authorization", ""))
        if verdict is True:
            if client is not None:
                lockout.succeeded(client)
            return None
        if verdict is False:  # a guess: count it
            lockout.failed(client_key(request.scope), self.clock.now())
        return _unauthorized()

    async def _callable_allows(self, request: Request) -> bool:
        assert self.check is not None  # noqa: S101 - set in __init__ when basic is None
        try:
            verdict = self.check(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            logger.exception("the dashboard's auth callable failed; refusing the request")
            return False
        return verdict is True

    def _basic_verdict(self, header: str) -> bool | None:
        """True for the right credentials, False for wrong ones, None for no credentials
        at all (no header, another scheme, not base64, no ':'): those cannot be a guess,
        so a browser's first request or another app's token never counts as a failure."""
        assert self.basic is not None  # noqa: S101 - only called for basic auth
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        user_ok = hmac.compare_digest(user, self.basic[0])
        password_ok = hmac.compare_digest(password, self.basic[1])
        return user_ok and password_ok


def _unauthorized() -> Response:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(
        "authentication required\n",
        status_code=401,
        headers={"WWW-Authenticate": 'Basic realm="asyncjobs", charset="UTF-8"'},
    )


def _forbidden() -> Response:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("forbidden\n", status_code=403)


def _too_many(wait: float) -> Response:
    from starlette.responses import PlainTextResponse

    seconds = retry_after(wait)
    return PlainTextResponse(
        f"too many failed logins: try again in {seconds} s\n",
        status_code=429,
        headers={"Retry-After": seconds},
    )


class Csrf:
    """Issues and checks CSRF tokens; the key is shared through the job store."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self._key: bytes | None = None

    async def key(self) -> bytes:
        if self._key is None:
            stored = await self.jobs.store.meta(CSRF_KEY_NAME, secrets.token_hex(32))
            self._key = bytes.fromhex(stored)
        return self._key

    @staticmethod
    def nonce(request: Request) -> str | None:
        """The browser's nonce from its cookie, if it has a well-formed one."""
        value = request.cookies.get(CSRF_COOKIE, "")
        return value if _NONCE.match(value) else None

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(16)

    async def token(self, nonce: str) -> str:
        return hmac.new(await self.key(), nonce.encode(), hashlib.sha256).hexdigest()

    async def valid(self, request: Request, token: str | None) -> bool:
        nonce = self.nonce(request)
        if nonce is None or not token:
            return False
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        # Bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 403).
        return hmac.compare_digest(token.encode(), (await self.token(nonce)).encode())
