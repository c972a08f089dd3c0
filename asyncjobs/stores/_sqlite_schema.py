"""The schema of ``SQLiteStore``'s file: switching it to WAL mode, and the numbered
migrations in ``migrations/sqlite/`` applied in order and recorded in a version table.

``migrate`` takes any sqlite3 connection: the store's own, in its write transaction, or
the caller's for transactional enqueue (``asyncjobs/_transaction.py``).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from asyncjobs._errors import ConfigurationError
from asyncjobs.stores._migrations import migration_scripts, refuse_newer

SCHEMA_VERSION_TABLE = "asyncjobs_migrations"


def switch_to_wal(db: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode=WAL``, once; the journal mode the file is in after it. It
    needs the file to itself, and may fail with SQLITE_BUSY; against another
    connection's write lock without waiting on the busy timeout (``SQLiteStore`` tries
    again, pausing, as when several processes open a new file at once)."""
    (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
    return str(mode)


def _statements(script: str) -> list[str]:
    """Split a migration script into complete statements."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--") and not current:
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ConfigurationError(f"incomplete SQL statement in migration: {current[:80]!r}")
    return statements


def migrate(db: sqlite3.Connection) -> None:
    """Create or upgrade the schema through ``db`` (any sqlite3 connection)."""
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} "
        "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    (current,) = db.execute(
        f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}"  # noqa: S608 - constant
    ).fetchone()
    scripts = migration_scripts("sqlite")
    _refuse_newer(db, current, scripts)
    for version, script in scripts:
        if version <= current:
            continue
        for statement in _statements(script):
            db.execute(statement)
        db.execute(
            f"INSERT INTO {SCHEMA_VERSION_TABLE} (version, applied_at) VALUES (?, ?)",  # noqa: S608
            (version, time.time()),  # noqa: TID251 - bookkeeping only, not job time
        )


def _refuse_newer(db: sqlite3.Connection, current: int, scripts: list[tuple[int, str]]) -> None:
    if scripts and current > scripts[-1][0]:
        main = [file for _, name, file in db.execute("PRAGMA database_list") if name == "main"]
        refuse_newer(current, scripts, f"the SQLite store's file {''.join(main)!r}")


def schema_current(db: sqlite3.Connection) -> bool:
    """Whether the file already holds every migration, found by a read: opening a store
    then takes no write lock, so it does not wait for a transaction another connection
    holds open (a ``jobs.transaction(conn)`` caller reading the store inside its block).
    A newer version raises ``StoreError`` here, on the read: it waited for the write
    lock to migrate first, and the newer asyncjobs writing in another process made
    that "database is locked", not why this one cannot use the file."""
    try:
        (current,) = db.execute(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}"  # noqa: S608 - constant
        ).fetchone()
    except sqlite3.OperationalError:  # no version table: a new file (or a busy one)
        return False
    scripts = migration_scripts("sqlite")
    _refuse_newer(db, current, scripts)
    return bool(current == scripts[-1][0])


def opens_without_writing(path: Path) -> bool:
    """Whether opening a store on ``path`` writes nothing: the file is in WAL mode and
    holds every migration. Found by a read on a connection of its own, which waits for
    no lock (a busy or missing file: False; a newer schema: ``StoreError``)."""
    try:
        db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=0)
    except sqlite3.Error:
        return False
    try:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        return str(mode).lower() == "wal" and schema_current(db)
    except sqlite3.Error:
        return False
    finally:
        db.close()


def holds_no_store(path: Path) -> bool:
    """Whether the file at ``path`` is a database without asyncjobs' tables (another
    database, an empty file), found by a read on a read-only connection of its own: the
    CLI refuses such a file rather than read it as an empty store, writing the tables
    into it. False when it cannot tell (busy, unreadable, not a database): opening the
    store says why."""
    try:
        db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=0)
    except sqlite3.Error:
        return False
    try:
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            (SCHEMA_VERSION_TABLE,),
        ).fetchone()
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return found is None
