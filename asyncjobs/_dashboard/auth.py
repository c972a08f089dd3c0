"""Who may use the dashboard, and CSRF protection for its actions.

Authentication is mandatory: ``auth`` is either a callable ``request -> bool``
(or awaitable bool) that the app trusts, or a ``(username, password)`` tuple
checked as HTTP basic credentials in constant time.

Actions are POST forms carrying a token: the HMAC-SHA256 of a random per-browser
nonce (kept in an HttpOnly, SameSite=Strict cookie) under a key stored in the job
store, so every process serving the dashboard accepts the same tokens. A cross-site
page can neither read the cookie nor compute the HMAC without the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

from asyncjobs._errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from asyncjobs._jobs import Jobs

AuthCallable: TypeAlias = "Callable[[Request], bool | Awaitable[bool]]"
DashboardAuth: TypeAlias = "AuthCallable | tuple[str, str]"

CSRF_COOKIE = "asyncjobs_csrf"
CSRF_FIELD = "csrf_token"
CSRF_KEY_NAME = "dashboard_csrf_key"
_NONCE = re.compile(r"^[0-9a-f]{32}$")


class Authenticator:
    """Checks every request against the ``auth`` given to ``jobs.dashboard``."""

    def __init__(self, auth: object) -> None:
        if auth is None:
            raise ConfigurationError(
                "jobs.dashboard() needs auth=: a (username, password) tuple for HTTP basic "
                "auth, or a callable request -> bool; it never serves without one"
            )
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

    async def allowed(self, request: Request) -> bool:
        if self.basic is not None:
            return self._basic_ok(request.headers.get("authorization", ""))
        assert self.check is not None  # noqa: S101 - set in __init__ when basic is None
        verdict = self.check(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict is True

    def _basic_ok(self, header: str) -> bool:
        assert self.basic is not None  # noqa: S101 - only called for basic auth
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(user, self.basic[0])
        password_ok = hmac.compare_digest(password, self.basic[1])
        return bool(sep) and user_ok and password_ok

    def denied(self) -> Response:
        from starlette.responses import PlainTextResponse

        if self.basic is not None:
            return PlainTextResponse(
                "authentication required\n",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="asyncjobs", charset="UTF-8"'},
            )
        return PlainTextResponse("forbidden\n", status_code=403)


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
