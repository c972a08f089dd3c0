"""What the errors of asyncpg mean to ``PostgresStore``: which are the driver's
(``DRIVER_ERRORS``, mapped to ``StoreError`` by ``_postgres_connections``), which mean
the server is out of reach (``is_connection_error``: the reconnect ``backoff``), which a
value refused by the server (``DataRefused``), which the server's answer refusing a
statement (``answered``: nothing of it committed), and which a connection that died
under an operation (``_connection_lost``: worth one retry). ``NotSent`` is an operation
refused before anything reached the server.
"""

from __future__ import annotations

import asyncpg

from asyncjobs._errors import DataRefused, StoreError

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    # A connection the server cut mid-operation can be left in an inconsistent state.
    asyncpg.InternalClientError,
)
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` means the server is (or was just) out of reach."""
    if isinstance(error, CONNECTION_ERRORS):
        return True
    return isinstance(error, asyncpg.InterfaceError) and "closed" in str(error)


def _refused_kind(error: BaseException) -> type[StoreError]:
    """``DataRefused`` for class 22 (data exception) and 54 (program limit exceeded):
    the server refused a value itself, as it will every time."""
    if isinstance(error, (asyncpg.DataError, asyncpg.ProgramLimitExceededError)):
        return DataRefused
    return StoreError


def answered(error: BaseException | None) -> bool:
    """Whether ``error``, a statement's (as the driver raised it), is the server's
    answer refusing it: the statement, and the transaction it was in, rolled back."""
    return isinstance(error, asyncpg.PostgresError) and not is_connection_error(error)


_LOST: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    ConnectionResetError,
    asyncpg.InterfaceError,  # closed under a transaction: its __aexit__'s
    # A session the server ended (a restart, pg_terminate_backend, idle_session_timeout)
    # whose end the driver has read but not yet acted on: the connection still looks
    # open, and the next statement is refused before it is sent.
    asyncpg.InternalClientError,
)
"""Errors of an operation whose connection may have died under it (``_connection_lost``)."""


def _connection_lost(error: BaseException) -> bool:
    """Whether the connection died under the operation (the server restarted, or cut
    it), not the operation's own failure: worth one retry on a fresh connection."""
    if isinstance(error, asyncpg.InterfaceError):
        return "connection is closed" in str(error)
    return True


class NotSent(StoreError):
    """An operation refused before anything reached the server (backing off, closed)."""


def backoff(failures: int, maximum: float) -> float:
    """Seconds to wait after ``failures`` failed connections in a row: 0.1 s, doubling
    up to ``maximum``."""
    return min(maximum, 0.1 * 2.0 ** (failures - 1))
