"""Stores: where jobs live. ``open_store(url)`` picks one by the URL's scheme."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from asyncjobs._errors import ConfigurationError
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._job_rows import JobRow, NewJob
from asyncjobs.stores._outcomes import Outcome, OutcomeKind, Recovered
from asyncjobs.stores._protocol import Preview, Store
from asyncjobs.stores._sqlite import SQLiteStore

__all__ = [
    "ClaimRequest",
    "JobRow",
    "NewJob",
    "Outcome",
    "OutcomeKind",
    "PostgresStore",
    "Preview",
    "Recovered",
    "SQLiteStore",
    "Store",
    "TaskLimits",
    "default_url",
    "open_store",
    "redacted",
    "sqlite_path",
]

DEFAULT_URL = "sqlite:///asyncjobs.db"


def default_url() -> str:
    """``$ASYNCJOBS_URL`` if set, else ``./asyncjobs.db``. The one place it is read."""
    return os.environ.get("ASYNCJOBS_URL") or DEFAULT_URL


def _secret(parameter: str) -> bool:
    """A URL parameter that holds a secret: ``password``, ``sslpassword`` (a client
    key's passphrase) and the like."""
    return "password" in parameter.lower()


_SECRET_PARAMETER = re.compile(
    r"([?&;][^=&#?;]*password[^=&#?;]*=)[^&]*(?:&[^&=]*(?=&|$))*", re.IGNORECASE
)
"""A parameter such as ``password=`` or ``sslpassword=`` (``_secret``) and its value,
up to the next ``&`` that starts a parameter: a ``#`` or ``&`` typed unescaped in the
value would otherwise leave the rest of the password shown as a fragment or as a
parameter with no ``=`` (which no driver reads as one). One written after a ``;`` (as
JDBC URLs do) is as secret, though drivers read it as part of the value before."""


def redacted(url: str) -> str:
    """``url`` for messages and logs: its password (in the user info, or a parameter
    such as ``password`` or ``sslpassword``) replaced by ``***``.

    A password in user info that urllib reads soundly (one ``@``, a port that is a
    number) is hidden first, as read: ``&``, ``;`` and ``=`` are allowed there as
    written and start no parameter. Secret parameters are hidden next, wherever they
    appear. The user info is then taken to run to the URL's last ``@``: a password
    typed with a ``/``, ``?`` or ``#`` not percent-encoded (not a valid URL, but typed
    all the same) would otherwise read as the host, port or path, and be shown. An
    ``@`` in another parameter's value then hides more than the password: never less.
    Last, a port that is no number and the fragment (which no driver reads) are hidden:
    either may be a password's tail."""
    shown = _hide_secrets(_hide_sound_password(url))
    return _hide_fragment(_hide_unread_port(shown, had_at="@" in url))


def _hide_sound_password(url: str) -> str:
    """``url`` with the password of its user info hidden, if urllib reads its host and
    port, and exactly one ``@`` ends the user info; else ``url`` as it is."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return url
    userinfo, at, host = parts.netloc.rpartition("@")
    scheme, sep, rest = url.partition("://")
    if not (sep and at and ":" in userinfo and "@" not in userinfo):
        return url
    if not rest.startswith(parts.netloc):  # pragma: no cover - urllib keeps it as written
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{rest[len(parts.netloc) :]}"


def _hide_unread_port(url: str, *, had_at: bool) -> str:
    """``url`` with a port that is no number hidden, when the host has no user info
    left but the URL had an ``@``: a password typed with ``?password=`` or
    ``&password=`` in it, whose tail and ``@`` the parameter pattern took, leaves its
    head where the port is read."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    host, colon, port = parts.netloc.partition(":")
    if not had_at or "@" in parts.netloc or host.startswith("[") or not colon:
        return url
    if port.isdigit() or not port:
        return url
    return url.replace(parts.netloc, f"{host}:***", 1)


def _hide_fragment(url: str) -> str:
    """No driver reads a URL's fragment, and what follows a ``#`` typed in a password
    may be the rest of it: shown as ``#***``."""
    base, hash_mark, _ = url.partition("#")
    return base + "#***" if hash_mark else url


def _hide_secrets(url: str) -> str:
    """``redacted`` but for its last steps: the secret parameters, and the password of
    user info that runs to the URL's last ``@``."""
    url = _SECRET_PARAMETER.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if sep and at and colon and not any(c in user for c in "/?#"):
        url = f"{scheme}://{user}:***@{after}"
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket: show the scheme and host alone
        scheme, _, rest = url.partition("://")
        user, at, host = rest.rpartition("@")
        return f"{scheme}://{'***@' if at else ''}{host.split('/')[0].split('?')[0]}"
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = user.split(":", 1)[0] + ":***@" + host
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if netloc == parts.netloc and not any(_secret(key) for key, _ in pairs):
        return url  # nothing to hide (and sqlite://// URLs stay as written)
    # A secret's name cut at an "=", which was percent-encoded: its value was in it.
    query = [
        (key.partition("=")[0], "***") if _secret(key) else (key, value) for key, value in pairs
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL or plain path names; None for other schemes."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise ConfigurationError(
                f"cannot read SQLite URL {url!r}: use sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        return Path(rest[1:])
    if "://" in url:
        return None
    if not url:
        raise ConfigurationError("the store URL is empty")
    scheme, colon, _ = url.partition(":")
    if colon and scheme.lower() in ("sqlite", "postgresql", "postgres"):
        # A URL typed with one slash, not a file to create (its password in the path);
        # not quoted: without its "://", redacted() cannot find the password in it.
        raise ConfigurationError(
            f"cannot read the {scheme}: store URL: write {scheme}://... (two slashes)"
        )
    return Path(url)


def open_store(url: str, **options: Any) -> Store:
    """A store for ``url``: ``sqlite:///file.db``, a plain path, or ``postgresql://...``.

    The store is not connected yet; it connects on first use or ``await store.open()``.
    """
    path = sqlite_path(url)
    if path is not None:
        return SQLiteStore(path, **options)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from asyncjobs.stores._postgres import PostgresStore
        except ImportError as error:  # asyncpg missing
            raise ConfigurationError(
                "the PostgreSQL store needs asyncpg: pip install 'asyncjobs[postgres]'"
            ) from error
        options.pop("synchronous", None)
        store: Store = PostgresStore(url, **options)
        return store
    scheme = url.split("://", 1)[0]
    raise ConfigurationError(
        f"unknown store URL scheme {scheme!r} in {redacted(url)!r}; use sqlite:///path.db "
        "or postgresql://..."
    )


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from asyncjobs.stores._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(name)
