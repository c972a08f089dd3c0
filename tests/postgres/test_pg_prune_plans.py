"""The plans PostgreSQL picks for the prune statements of rate-limit buckets and batch
tallies, with the statistics it really has (as ``test_pg_plans.py`` does for jobs): a
prune batch reads rows in proportion to what it deletes, not to the table; and the
store's connections compile none of them with JIT."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from plan_tables import PlanTables, fill, shared_tables

from asyncjobs.stores import PostgresStore, open_store
from asyncjobs.stores._postgres_admin import _PRUNE_BUCKETS, _PRUNE_TALLIES, BUCKET_NAMES

asyncpg = pytest.importorskip("asyncpg")

BATCH = 100


@pytest.fixture(scope="module")
def tables() -> Iterator[PlanTables]:
    with shared_tables() as shared:
        yield shared


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def rows_read(plan: dict[str, Any]) -> int:
    """Rows (index entries) every scan of the plan read, kept or filtered out."""
    return sum(
        (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for node in nodes(plan)
        if "Scan" in node["Node Type"]
    )


# Buckets of limiter $1 counted one a second from $3 on, keyed $2 || n.
FILL_BUCKETS = (
    "INSERT INTO asyncjobs_rate_buckets (name, key, tokens, updated_at) "
    "SELECT $1, $2 || n, 0.0, $3::float8 + n FROM generate_series(1, $4) AS n"
)
PER_USER = "limiter:per_user"


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize("due", [1_000, 0])
async def test_a_bucket_prune_reads_the_buckets_it_deletes_not_every_key(
    tables: PlanTables, due: int, analyzed: bool, mode: str
) -> None:
    """A keyed limiter keeps a bucket per key (a user, a domain): a prune batch reads
    the ones that have refilled, up to its size, not every bucket of the limiter.
    It read them all (100,000 rows removed by filter), in every process, even when
    none had refilled."""
    rows = fill(
        # Not refilled, and first in the primary key and in the heap.
        (FILL_BUCKETS, [PER_USER, "a-kept-", 5_000_000.0, 100_000]),
        (FILL_BUCKETS, ["limiter:other", "old-", 0.0, 20_000]),
        (FILL_BUCKETS, [PER_USER, "b-due-", 0.0, due]),
    )
    url = await tables.url(rows, "ANALYZE asyncjobs_rate_buckets" if analyzed else None)
    conn = await asyncpg.connect(url)  # the prune is rolled back: the table is shared
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute("PREPARE prune AS " + _PRUNE_BUCKETS)
        deleting = conn.transaction()
        await deleting.start()
        text = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune('{PER_USER}', 1000000.0, {BATCH})"
        )
        await deleting.rollback()
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert plan["Actual Rows"] == min(due, BATCH)
    read = rows_read(plan)
    assert read <= 4 * BATCH, (read, plan)


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_the_names_of_the_buckets_are_read_by_a_seek_each_not_every_bucket(
    postgres_url: str, analyzed: bool
) -> None:
    """A prune of the names the process does not define (dropped, renamed, another
    deploy's) lists the names stored: it steps from one to the next in the index,
    reading a few entries a name, not the 100,000 buckets of a keyed limiter."""
    store = open_store(postgres_url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(FILL_BUCKETS, PER_USER, "k-", 0.0, 100_000)
        await conn.execute(FILL_BUCKETS, "limiter:dropped", "k-", 0.0, 1_000)
        await conn.execute(FILL_BUCKETS, "task:send", "", 0.0, 1)
        if analyzed:
            await conn.execute("ANALYZE asyncjobs_rate_buckets")
        names = [r["name"] for r in await conn.fetch(BUCKET_NAMES)]
        text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + BUCKET_NAMES)
        plan = json.loads(text)[0]["Plan"]
    finally:
        await conn.close()

    assert names == ["limiter:dropped", PER_USER, "task:send"]
    read = rows_read(plan)
    assert read <= 20, (read, plan)


# Tallies of deleted batch members, of batches $1 || n, finished at $2.
FILL_TALLIES = (
    "INSERT INTO asyncjobs_batch_deleted (batch_id, status, n, finished_at) "
    "SELECT $1 || n, 'succeeded', 1, $2::float8 FROM generate_series(1, $3) AS n"
)
# Jobs of status $2 in batches $1 || n, one each, finished at 1.0.
FILL_MEMBERS = (
    "INSERT INTO asyncjobs_jobs (id, task, queue, status, priority, payload, max_attempts, "
    "run_at, enqueued_at, finished_at, batch_id) SELECT $1 || n || '-member', 't', "
    "'default', $2, 0, '{}', 3, 0.0, 1.0, 1.0, $1 || n FROM generate_series(1, $3) AS n"
)
RECENT, KEPT, DUE = 50_000, 1_000, 10
TALLIES = fill(
    (FILL_TALLIES, ["recent-", 5.0, RECENT]),  # within retention
    (FILL_TALLIES, ["kept-", 1.0, KEPT]),  # each batch keeps a job
    (FILL_MEMBERS, ["kept-", "dead", KEPT]),
    (FILL_TALLIES, ["gone-", 1.0, DUE]),
    (FILL_MEMBERS, ["running-", "running", RECENT]),  # other batches
)


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
async def test_a_tally_prune_reads_the_tallies_past_retention_and_seeks_their_jobs(
    tables: PlanTables, analyzed: bool, mode: str
) -> None:
    """The tallies of deleted batch members go past retention once their batch has no
    job left. A prune read every tally, and hashed every batch member and every job
    id against them (a read of the whole job table, once per batch of a prune); it
    reads the tallies past retention, and looks up each one's batch by a seek."""
    url = await tables.url(TALLIES, "ANALYZE" if analyzed else None)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute("PREPARE prune AS " + _PRUNE_TALLIES)
        pruning = conn.transaction()  # rolled back: the table is shared
        await pruning.start()
        text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE prune(0.0, 2.0)")
        plan = json.loads(text)[0]["Plan"]
        left = await conn.fetchval("SELECT count(*) FROM asyncjobs_batch_deleted")
        await pruning.rollback()
    finally:
        await conn.close()

    assert left == RECENT + KEPT
    read = rows_read(plan)
    assert read <= 4 * KEPT + 100, (read, plan)


async def explain_tally_prune(conn: Any) -> dict[str, Any]:
    """The tally prune's EXPLAIN (ANALYZE), its DELETE rolled back: the table is shared."""
    pruning = conn.transaction()
    await pruning.start()
    try:
        text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + _PRUNE_TALLIES, 0.0, 2.0)
    finally:
        await pruning.rollback()
    result: dict[str, Any] = json.loads(text)[0]
    return result


async def test_the_store_compiles_no_statement_with_jit(tables: PlanTables) -> None:
    """A statement the planner costs past jit_above_cost (the tally prune over 50,000
    tallies, on a table never analysed) is compiled by LLVM on a server that has JIT
    (on by default) at each run: 12-30 ms here, under the prune's locks, for a statement
    that takes 5 ms without. The store's connections have it off."""
    url = await tables.url(TALLIES, None)
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT pg_jit_available()"):
            pytest.skip("this PostgreSQL has no JIT (built without LLVM)")
        plain = await explain_tally_prune(conn)
    finally:
        await conn.close()
    assert "JIT" in plain, plain  # the default: what the store turns off
    store = PostgresStore(url)
    try:
        own = await store._run("explain", explain_tally_prune)
    finally:
        await store.close()
    assert "JIT" not in own, own["JIT"]


def test_a_jit_in_the_url_wins() -> None:
    assert PostgresStore("postgresql://h/db")._server_settings["jit"] == "off"
    assert "jit" not in PostgresStore("postgresql://h/db?jit=on")._server_settings
