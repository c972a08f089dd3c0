"""Reading a ``PostgresStore`` URL: the store's own settings taken out before asyncpg
reads it, why a URL cannot be read (in words that never quote its password), and what
in it chooses where the jobs are (``_location``).
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlsplit

from asyncjobs.stores import redacted

_LOCK_TIMEOUT_MAX = 2**31 - 1
"""The longest ``lock_timeout`` PostgreSQL takes, in milliseconds (a 32-bit integer)."""

_URL_SETTINGS = ("pool_min", "pool_max", "command_timeout")
"""Parameters of a store URL that set the store, taken out before asyncpg reads it."""


def _without_settings(url: str, names: Collection[str]) -> str:
    """``url`` without its parameters ``names``, otherwise as written. Rebuilt from its
    parsed parts, a URL whose password has a ``?`` typed unescaped (the rest reads as
    the query) lost its host, and ``redacted`` then found no password to hide."""
    rest, hash_mark, fragment = url.partition("#")
    base, _, query = rest.partition("?")
    pieces = query.split("&")
    kept = [p for p in pieces if unquote_plus(p.partition("=")[0]) not in names]
    if len(kept) == len(pieces):
        return url
    return base + ("?" + "&".join(kept) if kept else "") + hash_mark + fragment


def _unreadable(url: str) -> str:
    """Why the host and port of ``url`` cannot be read, in words that never quote its
    password: urllib's own error may (a password typed with ``/``, ``?`` or ``#``
    unescaped ends the host there, and what came before reads as the port), so the
    reason is that of the URL with its password hidden, if it has one."""
    shown = redacted(url)
    try:
        _ = urlsplit(shown).port  # the same check, on the URL as shown
    except ValueError as error:
        return f"cannot read the host and port of {shown!r}: {error}"
    return (
        f"cannot read the host and port of {shown!r}: its password must be "
        "percent-encoded (a /, ?, #, [ or ] typed as is breaks the URL)"
    )


def _misread_by_asyncpg(url: str) -> str | None:
    """Why asyncpg would misread ``url``, with its password hidden; None if it would not.

    asyncpg reads the URL only on connecting, and its errors quote what it could not
    read: an ``&`` typed unescaped in a password parameter left a piece with no ``=``
    ("bad query field: '...'"), and an ``@`` in the user info (which asyncpg ends at
    its first ``@``) read the password's tail as the host (looked up in the DNS) and
    port ("invalid literal for int() ...")."""
    parts = urlsplit(url)
    if parts.netloc.count("@") > 1:
        return (
            f"cannot read the user name and password of {redacted(url)!r}: they must be "
            "percent-encoded (an @ typed as is ends them early)"
        )
    try:
        parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        return (
            f"cannot read the parameters of {redacted(url)!r}: each must be name=value, "
            "percent-encoded (an &, ?, # or @ in a password typed as is breaks them)"
        )
    return None


def _location(url: str) -> tuple[object, ...]:
    """What in a store URL chooses where its jobs are, normalised: the host (lower case),
    the port (5432 when not given), the user, the database and the other parameters
    (``search_path`` among them), sorted; not the scheme's spelling nor a password."""
    parts = urlsplit(url)
    query = sorted((k, v) for k, v in parse_qsl(parts.query) if "password" not in k.lower())
    host = (parts.hostname or "").lower()
    return (host, parts.port or 5432, parts.username, parts.path.lstrip("/"), query)
