"""Transactional enqueue: jobs written through the caller's own open transaction.

``async with jobs.transaction(conn):`` binds ``conn`` (an aiosqlite connection to
the job store's own SQLite file, or an asyncpg connection to its PostgreSQL
database) to ``jobs`` for the current task and context; tasks started inside the
block share it until the block ends. Every enqueue inside the block inserts through
``conn``, so the job is part of the caller's transaction: it exists if and only if
the caller commits (the outbox pattern without a relay). A connection to another
database (another SQLite file; another PostgreSQL database or server, see
``PostgresStore.check_caller``) is refused with ``ConfigurationError``.

Workers are woken at enqueue time; the job is not visible to them until the
caller commits, and then the runner's change polling picks it up.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncjobs._errors import ConfigurationError
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.stores._sqlite import SQLiteStore
from asyncjobs.stores._sqlite_connections import DRIVER_ERRORS, error_kind
from asyncjobs.stores._sqlite_schema import migrate
from asyncjobs.stores._sqlite_sql import insert_jobs

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs


Inserter = Callable[[Sequence[NewJob], float], Awaitable[list[str]]]
"""Insert jobs (with ``now``) through the caller's transaction; return their ids."""


@dataclass(slots=True)
class _Binding:
    jobs: Jobs
    insert: Inserter
    open: bool = True
    """False once the block has ended: a task started inside it keeps a copy of the
    context, and its later enqueues must not write through the caller's connection."""


_bindings: ContextVar[tuple[_Binding, ...]] = ContextVar("asyncjobs_transactions", default=())


def bound_insert(jobs: Jobs) -> Inserter | None:
    """The caller's transaction bound to ``jobs`` in this context, if any."""
    for binding in reversed(_bindings.get()):
        if binding.open and binding.jobs is jobs:
            return binding.insert
    return None


@asynccontextmanager
async def transaction(jobs: Jobs, conn: Any) -> AsyncIterator[None]:
    """Make every ``jobs.enqueue`` in this block part of ``conn``'s open transaction."""
    binding = _Binding(jobs, await _inserter(jobs, conn))
    token = _bindings.set((*_bindings.get(), binding))
    try:
        yield
    finally:
        binding.open = False
        _bindings.reset(token)


async def _inserter(jobs: Jobs, conn: Any) -> Inserter:
    module = type(conn).__module__
    if module.startswith("aiosqlite"):
        return await _sqlite_inserter(jobs, conn)
    if module.startswith("asyncpg"):
        return await _asyncpg_inserter(jobs, conn)
    raise ConfigurationError(
        f"jobs.transaction() takes an aiosqlite or asyncpg connection, not {type(conn).__name__}"
    )


# -- SQLite ---------------------------------------------------------------------------


async def _sqlite_inserter(jobs: Jobs, conn: Any) -> Inserter:
    store = jobs.store
    if not isinstance(store, SQLiteStore):
        raise ConfigurationError(
            f"jobs.transaction() got an aiosqlite connection but the job store is {store!r}; "
            "pass a connection to the store's own database"
        )
    raw = getattr(conn, "_connection", None)
    if not isinstance(raw, sqlite3.Connection) or not hasattr(conn, "_execute"):
        raise ConfigurationError(
            "jobs.transaction() needs an open aiosqlite connection: this one is not "
            "opened yet (await aiosqlite.connect(...)) or already closed"
        )
    main_file, in_transaction = await _run(conn, _describe, raw)
    if not main_file or not _same_file(main_file, store.path):
        raise ConfigurationError(
            f"jobs.transaction() needs a connection to the job store's file {str(store.path)!r}, "
            f"but the connection is on {main_file or 'an in-memory database'!r}"
        )
    if in_transaction and not await store.open_unless_it_writes():
        # Opening the store now would wait on the caller's own write lock; create
        # the schema through the caller's connection instead (part of its transaction).
        # Only then: a read through it would take the snapshot of a deferred BEGIN
        # here, and another connection's commit would make the caller's first write
        # fail at once (SQLITE_BUSY_SNAPSHOT) instead of waiting for the lock.
        await _run(conn, migrate, raw)
    else:
        await store.open()

    async def insert(new: Sequence[NewJob], now: float) -> list[str]:
        ids: list[str] = await _run(conn, _insert_in_transaction, raw, new, now)
        return ids

    return insert


def _describe(db: sqlite3.Connection) -> tuple[str, bool]:
    main = ""
    for _seq, name, file in db.execute("PRAGMA database_list").fetchall():
        if name == "main":
            main = file or ""
    return main, db.in_transaction


def _insert_in_transaction(db: sqlite3.Connection, new: Sequence[NewJob], now: float) -> list[str]:
    if not db.in_transaction:
        if _autocommits(db):
            raise ConfigurationError(
                "jobs.transaction(conn): the connection is in autocommit mode with no open "
                "transaction, so the job would be committed on its own; run BEGIN first"
            )
        # sqlite3's legacy mode (aiosqlite's default) begins at the first write, after
        # the insert's read of the jobs' groups: another connection's commit in between
        # (the group's last job finished) left a new job marked behind nothing, which
        # held its group. Begin here, taking the write lock the insert takes anyway.
        db.execute("BEGIN IMMEDIATE")
    return insert_jobs(db, new, now)


def _autocommits(db: sqlite3.Connection) -> bool:
    """Each statement commits on its own: ``isolation_level=None``, or Python 3.12's
    ``autocommit=True``, which leaves ``isolation_level`` at its default."""
    return db.isolation_level is None or getattr(db, "autocommit", None) is True


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == b.resolve()


async def _run(conn: Any, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in the aiosqlite connection's thread; map driver errors, as the
    store does its own (``DataRefused`` for a value SQLite refuses, as PostgreSQL's
    caller connection says it too)."""
    try:
        return await conn._execute(fn, *args)
    except DRIVER_ERRORS as error:
        kind = error_kind(error)
        raise kind(f"transactional enqueue through {conn!r} failed: {error}") from error


# -- PostgreSQL -----------------------------------------------------------------------


async def _asyncpg_inserter(jobs: Jobs, conn: Any) -> Inserter:
    store = jobs.store
    try:
        from asyncjobs.stores._postgres import PostgresStore
    except ImportError as error:  # pragma: no cover - asyncpg is what made conn
        raise ConfigurationError(
            "transactional enqueue with asyncpg needs: pip install 'asyncjobs[postgres]'"
        ) from error
    if not isinstance(store, PostgresStore):
        raise ConfigurationError(
            f"jobs.transaction() got an asyncpg connection but the job store is {store!r}; "
            "pass a connection to the store's own database"
        )
    if not callable(getattr(conn, "is_in_transaction", None)):  # a pool, say
        raise ConfigurationError(
            f"jobs.transaction() takes an asyncpg connection, not {type(conn).__name__}: "
            "a pool runs each call on whichever connection it acquires; use "
            "`async with pool.acquire() as conn, conn.transaction():`"
        )
    pg: PostgresStore = store
    await pg.open()  # the schema exists before the caller's transaction needs it
    await pg.check_caller(conn)  # on the store's database, or its jobs are lost to it
    turns = _turns(conn)

    async def insert(new: Sequence[NewJob], now: float) -> list[str]:
        async with turns:
            if not conn.is_in_transaction():
                raise ConfigurationError(
                    "jobs.transaction(conn): the asyncpg connection has no open transaction, "
                    "so the job would be committed on its own; use `async with "
                    "conn.transaction():`"
                )
            return await pg.insert_with(conn, new, now=now)

    return insert


_caller_turns: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


def _turns(conn: Any) -> asyncio.Lock:
    """The lock that the enqueues through ``conn`` take turns on. The tasks started
    inside a block share its connection, which runs one query at a time: at once,
    all but one failed (asyncpg: "another operation is in progress"). One lock per
    connection, for every block on it."""
    try:
        return _caller_turns.setdefault(conn, asyncio.Lock())
    except TypeError:  # no weak reference to it: its blocks take turns each on their own
        return asyncio.Lock()
