"""Tables for the plan tests, filled once per module and read by every test that wants
the same rows with the same statistics (``test_pg_plans.py``, ``test_pg_prune_plans.py``).

A fill of 200,000 jobs costs seconds (every row goes into a dozen indexes); several
tests read the same rows, only under another plan mode or statement, so each fill
happens once. Only a test that leaves the table as it found it may share one: one
that only reads, or one whose DELETE is rolled back (a delete rolled back leaves the
rows and their index entries as they were). Not a claim or a finish: an UPDATE rolled
back leaves dead row versions and index entries behind, which the next test would
read (200 pages more for a claim of 100, and another plan once analysed).

"Fresh" stays fresh: autovacuum is off on a shared table, so its statistics are only
ever the ones a test asks for (none, or one ANALYZE after the fill), and fresh and
analysed tables are separate fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import asyncpg
from conftest import postgres_dsn, with_search_path

from asyncjobs.stores import open_store

Fill = tuple[tuple[str, tuple[Any, ...]], ...]
"""The statements that fill a schema, with their arguments, run in order."""

SHARED = ("asyncjobs_jobs", "asyncjobs_rate_buckets", "asyncjobs_batch_deleted")


_TABLES = "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()"


def fill(*steps: tuple[str, Sequence[Any]]) -> Fill:
    return tuple((statement, tuple(args)) for statement, args in steps)


class PlanTables:
    """Schemas by (fill, statistics): ``analyze`` is the ANALYZE statement run after the
    fill (a bare ``ANALYZE``: every table of the schema), or None for a table never
    analysed."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._schemas: dict[tuple[Fill, str | None], str] = {}
        self._made: list[str] = []

    async def url(self, rows: Fill, analyze: str | None) -> str:
        """The URL of a schema filled with ``rows`` and then ``analyze``d (if given)."""
        key = (rows, analyze)
        if key in self._schemas:
            return with_search_path(self._dsn, self._schemas[key])
        schema = await self._fill(rows)
        if analyze is not None:
            conn = await asyncpg.connect(with_search_path(self._dsn, schema))
            try:
                if analyze == "ANALYZE":  # the schema's tables, not the database's: tests
                    for table in await conn.fetch(_TABLES):  # beside this one keep theirs
                        await conn.execute(f'ANALYZE "{table[0]}"')
                else:
                    await conn.execute(analyze)
            finally:
                await conn.close()
        self._schemas[key] = schema
        return with_search_path(self._dsn, schema)

    async def _fill(self, rows: Fill) -> str:
        schema = f"asyncjobs_test_{uuid.uuid4().hex[:16]}"
        admin = await asyncpg.connect(self._dsn)
        try:
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await admin.close()
        self._made.append(schema)
        url = with_search_path(self._dsn, schema)
        store = open_store(url)
        await store.open()  # the schema
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            for table in SHARED:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
            for statement, args in rows:
                await conn.execute(statement, *args)
        finally:
            await conn.close()
        return schema

    async def drop(self) -> None:
        admin = await asyncpg.connect(self._dsn)
        try:
            for schema in self._made:
                await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await admin.close()


@contextlib.contextmanager
def shared_tables() -> Iterator[PlanTables]:
    """A module's shared plan tables (a module-scoped fixture), dropped after its tests."""
    tables = PlanTables(postgres_dsn())
    try:
        yield tables
    finally:
        asyncio.run(tables.drop())
