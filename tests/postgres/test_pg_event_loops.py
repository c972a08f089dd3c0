"""A PostgreSQL store used from several event loops, as a script or a sync app does
that calls ``asyncio.run()`` per enqueue (the SQLite store serves such callers too)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from asyncjobs import Jobs

pytest.importorskip("asyncpg")


# The connections of an ended loop can no longer be closed through it: they close as
# they are collected, and say so (ResourceWarning, which Python shows only when asked).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_store_left_open_when_its_event_loop_ended_opens_anew_in_the_next(
    postgres_url: str,
) -> None:
    """Its connections belong to the loop that opened them: used from the next loop,
    every other enqueue failed ('Event loop is closed', or a future attached to a
    different loop)."""
    jobs = Jobs(postgres_url)

    @jobs.task(name="t")
    async def t(n: int) -> None: ...

    for n in range(4):
        asyncio.run(t.enqueue(n))

    async def stored() -> int:
        try:
            return len(await jobs.list())
        finally:
            await jobs.close()

    assert asyncio.run(stored()) == 4
    gc.collect()  # the ended loops' connections, closed now (their warnings ignored)
