"""The PostgreSQL store's LISTEN connection is one more connection than the pool: when
it cannot be opened, workers poll, and the store itself keeps working."""

from __future__ import annotations

import time
from typing import Any

import anyio
import asyncpg
import pytest

from asyncjobs.stores import open_store


async def test_a_listener_that_cannot_connect_leaves_the_store_working(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(postgres_url)
    await store.open()
    try:
        assert await store.get("nope") is None  # the pool is open

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise asyncpg.TooManyConnectionsError("sorry, too many clients already")

        monkeypatch.setattr(asyncpg, "connect", refuse)  # the server is at max_connections
        assert await store.changed() is False  # no listener: the runner polls
        assert await store.get("nope") is None  # the pool still answers
        assert await store.next_run_at() is None
        monkeypatch.undo()
        # The listener is tried again after its own short backoff, and then hears.
        deadline = time.monotonic() + 5  # noqa: TID251 - the backoff is on the loop's clock
        while not await store.changed():
            assert time.monotonic() < deadline, "the listener never reconnected"  # noqa: TID251
            await anyio.sleep(0.05)  # noqa: TID251 - waiting out a real backoff
    finally:
        await store.close()
