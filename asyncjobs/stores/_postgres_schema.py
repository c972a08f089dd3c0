"""The schema of ``PostgresStore``: the numbered migrations in ``migrations/postgres/``,
applied in order and recorded in a version table, under an advisory lock so two
processes never migrate one schema at once.

``migrate`` runs on the connection it is given, in that connection's current schema
(the first schema of its ``search_path``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from asyncjobs._errors import StoreError
from asyncjobs.stores._migrations import migration_scripts, refuse_newer

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection

logger = logging.getLogger(__name__)

SCHEMA_VERSION_TABLE = "asyncjobs_migrations"

_LOCK_MIGRATIONS = (
    "SET LOCAL lock_timeout = 0; "
    "SELECT pg_advisory_xact_lock(hashtext('asyncjobs.migrate:' || current_schema())); "
    "SET LOCAL lock_timeout TO DEFAULT"  # the connection's own again, for the migrations
)
"""Take the lock that serializes migrations of the current schema, however long another
process's migration holds it (an index built over a large table): the store's
``lock_timeout`` bounds the waits of the job path, not this one, and would fail to open
every process but one of those started at once."""


async def migrate(conn: Connection) -> None:
    """Create or upgrade the schema through ``conn`` (in the current schema)."""
    async with conn.transaction():
        schema = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            raise StoreError(
                "PostgreSQL store: no schema to create the job table in; the search_path "
                "names no existing schema (CREATE SCHEMA it first)"
            )
        # Serialize migrations of this schema across processes; released at commit.
        await conn.execute(_LOCK_MIGRATIONS)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} "
            "(version integer PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        current = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA_VERSION_TABLE}"  # noqa: S608
        )
        scripts = migration_scripts("postgres")
        refuse_newer(current, scripts, f"the PostgreSQL store's schema {schema!r}")
        for version, script in scripts:
            if version <= current:
                continue
            logger.info("PostgreSQL store: applying migration %04d in %s", version, schema)
            await conn.execute(script)
            await conn.execute(
                f"INSERT INTO {SCHEMA_VERSION_TABLE} (version, applied_at) "  # noqa: S608
                "VALUES ($1, extract(epoch FROM now()))",
                version,
            )


_FIND_STORE = (
    "SELECT current_schema(), EXISTS (SELECT 1 FROM pg_catalog.pg_tables "
    "WHERE schemaname = current_schema() AND tablename = $1)"
)


async def schema_without_store(conn: Connection) -> str | None:
    """The current schema (where ``migrate`` would create the tables) if it holds no
    asyncjobs store (no version table): the CLI refuses it rather than read it as an
    empty store and write the tables into it. Found by a read, which writes nothing.
    None when it holds one, or when no schema is current (opening the store says so)."""
    row = await conn.fetchrow(_FIND_STORE, SCHEMA_VERSION_TABLE)
    if row is None or row[0] is None or row[1]:
        return None
    return str(row[0])
