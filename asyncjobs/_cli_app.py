"""Loading the app a command of the ``asyncjobs`` CLI works on (``--app``, a
``module:attribute`` naming a ``Jobs``), and running the command's action on it in an
event loop of its own: ``load_jobs`` and ``run``. The commands are in ``_cli``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from asyncjobs._errors import AsyncJobsError
from asyncjobs._jobs import Jobs
from asyncjobs.stores import Store, redacted
from asyncjobs.stores._sqlite import SQLiteStore
from asyncjobs.stores._sqlite_schema import holds_no_store

T = TypeVar("T")


def load_jobs(spec: str | None, *, given_as: str = "--app") -> Jobs:
    """Import ``module:attribute`` (the current directory is importable) as a ``Jobs``;
    an error about it names where it was ``given_as``."""
    if not spec:
        raise click.UsageError("name your Jobs with --app module:attribute or $ASYNCJOBS_APP")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(
            f"{spec!r} is not module:attribute (e.g. myapp:jobs)", param_hint=given_as
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if not _names_the_module(error, module_name):
            raise  # one the app imports: its traceback shows where, as any error in it
        raise click.BadParameter(
            f"cannot import {module_name!r}: {error}", param_hint=given_as
        ) from error
    except AsyncJobsError as error:  # its Jobs(...) refused a setting: say it, no traceback
        raise click.ClickException(f"importing {module_name!r} failed: {error}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attribute!r}", param_hint=given_as
            ) from None
    if not isinstance(target, Jobs):
        raise click.BadParameter(
            f"{spec} is a {type(target).__name__}, not an asyncjobs.Jobs", param_hint=given_as
        )
    return target


def _names_the_module(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module missing is the one named (or a package on its path), not one
    that the app's module imports."""
    missing = error.name or ""
    return module_name == missing or module_name.startswith(missing + ".")


def run(ctx: click.Context, action: Callable[[Jobs], Awaitable[T]]) -> T:
    """Load the app, run ``action(jobs)`` in a fresh event loop, close the store.

    A SQLite store that does not exist is refused, not created: a mistyped path would
    otherwise read as an empty store (only the app and ``asyncjobs worker`` create it).
    So is a file without its tables (another database, an empty file), which would get
    them written into it, and a PostgreSQL schema without them (``_refuse_no_store``).
    """
    jobs = load_jobs(ctx.obj)
    store = jobs.store
    if isinstance(store, SQLiteStore):
        if not store.path.exists():
            raise click.ClickException(
                f"no asyncjobs store at {str(store.path)!r}: start the app (or "
                "`asyncjobs worker`) once to create it, or check the URL"
            )
        if holds_no_store(store.path):
            raise click.ClickException(
                f"no asyncjobs store in {str(store.path)!r}: the file holds no job tables; "
                "check the URL, or start the app (or `asyncjobs worker`) once to create them"
            )

    async def main() -> T:
        try:
            await _refuse_no_store(store)
            return await action(jobs)
        finally:
            await jobs.close()

    try:
        return asyncio.run(main())
    except AsyncJobsError as error:  # a store or setting problem: say it, no traceback
        raise click.ClickException(str(error)) from error


async def _refuse_no_store(store: Store) -> None:
    """Refuse a PostgreSQL store whose schema (the first of the URL's search_path that
    exists, or ``public``) holds no asyncjobs tables, as ``run`` refuses such a SQLite file: opening
    it would create them there. Read on a connection of its own, before the store
    opens; the URL is shown without its password."""
    # A PostgresStore exists only once its module (which needs asyncpg) is imported.
    postgres = sys.modules.get("asyncjobs.stores._postgres")
    if postgres is None or not isinstance(store, postgres.PostgresStore):
        return
    schema = await store.schema_without_store()
    if schema is not None:
        raise click.ClickException(
            f"no asyncjobs store in schema {schema!r} of {redacted(store.url)!r}: it holds "
            "no job tables; check the URL (its search_path), or start the app (or "
            "`asyncjobs worker`) once to create them"
        )
