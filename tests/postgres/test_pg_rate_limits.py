"""PostgreSQL: a claim under a rate limit spends tokens on the jobs it takes alone.

Claims under limits are serialised (an advisory lock), but other writes lock queued
rows too: a plain claim, a cancel, the rate keys' update. A claim under limits reads
such a row as queued, and its take (FOR UPDATE SKIP LOCKED) skips it; a token spent on
it was lost, and the task ran slower than its limit while other workers claimed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asyncjobs import RateLimit
from asyncjobs.stores import ClaimRequest, NewJob, PostgresStore, TaskLimits, open_store
from asyncjobs.stores import _postgres_claim as claims

asyncpg = pytest.importorskip("asyncpg")

T0 = 1_000_000.0
PLAIN = ClaimRequest(
    worker="other", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=1, lease=60
)
TWO_A_MINUTE = RateLimit(rate=2, per=60)
LIMITS = {
    "rate-limit": {"t": TaskLimits(max_attempts=3, rate_limit=TWO_A_MINUTE)},
    "limiter": {"t": TaskLimits(max_attempts=3, limiter="l")},
}


def new(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=T0, max_attempts=3,
    )  # fmt: skip


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    opened = open_store(postgres_url)
    assert isinstance(opened, PostgresStore)
    await opened.open()
    yield opened
    await opened.close()


@pytest.mark.parametrize("limits", LIMITS.values(), ids=LIMITS.keys())
async def test_a_job_another_claim_holds_spends_no_token(
    store: PostgresStore, postgres_url: str, limits: dict[str, TaskLimits]
) -> None:
    """Two tokens a minute, three jobs, the first taken by a plain claim whose
    transaction is still open: the claim under the limit takes the other two."""
    await store.insert([new("j0"), new("j1"), new("j2")], now=T0)
    request = ClaimRequest(
        worker="w", tasks=limits, queues=None, limit=10, lease=60,
        limiters={"l": TWO_A_MINUTE},
    )  # fmt: skip
    other = await asyncpg.connect(postgres_url)
    try:
        async with other.transaction():
            held = await claims.claim(other, PLAIN, T0, "other")
            assert [r.id for r in held] == ["j0"]
            claimed = await store.claim(request, now=T0)
    finally:
        await other.close()
    assert [r.id for r in claimed] == ["j1", "j2"]
    # ...and a minute's two tokens are spent.
    assert await store.claim(request, now=T0 + 1) == []


async def test_a_prune_leaves_a_bucket_a_claim_holds_and_deletes_the_oldest_first(
    store: PostgresStore, postgres_url: str
) -> None:
    """A bucket locked by a claim under way is in use: the prune deletes the other
    buckets that have refilled, the oldest first, and leaves it to the next prune."""
    other = await asyncpg.connect(postgres_url)
    try:
        await other.executemany(
            "INSERT INTO asyncjobs_rate_buckets VALUES ('limiter:l', $1, 0, $2)",
            [("x", 4.0), ("y", 3.0), ("z", 2.0), ("held", 1.0), ("new", T0)],
        )
        left = "SELECT key FROM asyncjobs_rate_buckets ORDER BY key"
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM asyncjobs_rate_buckets WHERE key = 'held' FOR UPDATE"
            )
            assert await store.prune_buckets(full_before={"limiter:l": T0}, limit=2) == 2
            assert [r["key"] for r in await other.fetch(left)] == ["held", "new", "x"]
            assert await store.prune_buckets(full_before={"limiter:l": T0}, limit=2) == 1
        assert [r["key"] for r in await other.fetch(left)] == ["held", "new"]
        assert await store.prune_buckets(full_before={"limiter:l": T0}, limit=2) == 1
    finally:
        await other.close()
