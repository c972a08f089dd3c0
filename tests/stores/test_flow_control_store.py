"""Flow control in the store's claim, on every backend: two stores on one database act
as two processes. Buckets and running counts live in the store, so limits hold across
them; a held-back job spends no attempt; ``Claimed.next_token_at`` says when to retry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asyncjobs import RateLimit
from asyncjobs.stores import Store, open_store
from asyncjobs.stores._claims import Claimed, ClaimRequest, TaskLimits
from asyncjobs.stores._job_rows import NewJob

NOW = 1_000_000.0


@pytest.fixture
async def two_stores(backend_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two processes would have."""
    first, second = open_store(backend_url), open_store(backend_url)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def new_jobs(
    task: str, count: int, *, queue: str = "default", rate_key: str | None = None, start: int = 0
) -> list[NewJob]:
    return [
        NewJob(
            id=f"{task}-{rate_key}-{n}", task=task, queue=queue,
            payload='{"args":[],"kwargs":{}}', status="queued", priority=0, run_at=NOW,
            max_attempts=3, rate_key=rate_key,
        )
        for n in range(start, start + count)
    ]  # fmt: skip


def request(
    worker: str,
    limit: int,
    tasks: dict[str, TaskLimits],
    *,
    limiters: dict[str, RateLimit] | None = None,
    queue_concurrency: dict[str, int] | None = None,
    queues: list[str] | None = None,
    keyed: frozenset[str] = frozenset(),
) -> ClaimRequest:
    return ClaimRequest(
        worker=worker,
        tasks=tasks,
        queues=queues,
        limit=limit,
        lease=60,
        limiters=limiters or {},
        queue_concurrency=queue_concurrency or {},
        keyed=keyed,
    )


async def test_a_bucket_is_shared_by_every_store_and_claim_says_when_it_refills(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores
    await a.insert(new_jobs("t", 30), now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, rate_limit=RateLimit(rate=10))}
    first = await a.claim(request("a", 8, tasks), now=NOW)
    second = await b.claim(request("b", 8, tasks), now=NOW)
    assert (len(first), len(second)) == (8, 2)
    assert isinstance(second, Claimed)
    assert second.next_token_at == pytest.approx(NOW + 0.1)
    third = await a.claim(request("a", 8, tasks), now=NOW + 0.05)
    assert isinstance(third, Claimed)
    assert len(third) == 0
    assert third.next_token_at == pytest.approx(NOW + 0.1)
    fourth = await b.claim(request("b", 8, tasks), now=NOW + 0.35)
    assert len(fourth) == 3
    assert all(row.attempts == 1 for row in [*first, *second, *fourth])
    remaining = await a.list(status="queued", now=NOW + 0.35, limit=100)
    assert len(remaining) == 17
    assert all(row.attempts == 0 and row.started_at is None for row in remaining)


@pytest.mark.parametrize("bucket", ["own", "limiter"])
async def test_a_bucket_counted_in_the_future_holds_tokens_back_one_refill_at_most(
    two_stores: tuple[Store, Store], bucket: str
) -> None:
    """A claim an hour ahead (a host whose clock ran ahead, or this one's before it was
    set back) took the burst. A claim at the right time then waited an hour for a token;
    now it waits as if the burst had been taken one refill (here 1 s) from now at most."""
    a, b = two_stores
    await a.insert(new_jobs("t", 30, rate_key="k"), now=NOW)
    rate = RateLimit(rate=10)
    if bucket == "own":
        tasks, limiters = {"t": TaskLimits(max_attempts=3, rate_limit=rate)}, {}
    else:
        tasks, limiters = {"t": TaskLimits(max_attempts=3, limiter="mail")}, {"mail": rate}
    assert len(await a.claim(request("a", 20, tasks, limiters=limiters), now=NOW + 3600)) == 10
    held = await b.claim(request("b", 20, tasks, limiters=limiters), now=NOW + 60)
    assert isinstance(held, Claimed)
    assert len(held) == 0
    assert held.next_token_at == pytest.approx(NOW + 61.1)
    assert len(await b.claim(request("b", 20, tasks, limiters=limiters), now=NOW + 61.1)) == 1
    refilled = await a.claim(request("a", 20, tasks, limiters=limiters), now=NOW + 62.1)
    assert len(refilled) == 10


async def test_a_bucket_counted_less_than_a_refill_ahead_mints_no_tokens(
    two_stores: tuple[Store, Store],
) -> None:
    """Hosts whose clocks differ by less than a refill (NTP keeps them milliseconds
    apart) share a bucket exactly: the one behind waits out the difference."""
    ahead, behind = two_stores
    await ahead.insert(new_jobs("t", 30), now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, rate_limit=RateLimit(rate=10))}
    assert len(await ahead.claim(request("a", 20, tasks), now=NOW)) == 10
    held = await behind.claim(request("b", 20, tasks), now=NOW - 0.5)
    assert isinstance(held, Claimed)
    assert len(held) == 0
    assert held.next_token_at == pytest.approx(NOW + 0.1)
    assert len(await behind.claim(request("b", 20, tasks), now=NOW + 0.05)) == 0
    assert len(await ahead.claim(request("a", 20, tasks), now=NOW + 0.1)) == 1


async def test_claim_reports_no_refill_time_when_nothing_waits_on_a_bucket(
    two_stores: tuple[Store, Store],
) -> None:
    a, _ = two_stores
    await a.insert(new_jobs("t", 2), now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, rate_limit=RateLimit(rate=1, per=60))}
    claimed = await a.claim(request("a", 5, tasks), now=NOW)
    assert len(claimed) == 1
    assert isinstance(claimed, Claimed)
    assert claimed.next_token_at == pytest.approx(NOW + 60)
    await a.cancel(["t-None-1"], now=NOW)
    idle = await a.claim(request("a", 5, tasks), now=NOW + 1)
    assert isinstance(idle, Claimed)
    assert idle.next_token_at is None


async def test_claim_reports_no_refill_time_when_nothing_waits_on_a_limiter(
    two_stores: tuple[Store, Store],
) -> None:
    a, _ = two_stores
    await a.insert(new_jobs("t", 1), now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, limiter="mail"), "u": TaskLimits(max_attempts=3)}
    mail = {"mail": RateLimit(rate=1, per=60)}
    assert len(await a.claim(request("a", 5, tasks, limiters=mail), now=NOW)) == 1
    await a.insert(new_jobs("u", 1), now=NOW)  # a job of another task, not under the limiter
    claimed = await a.claim(request("a", 5, tasks, limiters=mail), now=NOW + 1)
    assert isinstance(claimed, Claimed)
    assert [row.task for row in claimed] == ["u"]
    assert claimed.next_token_at is None


@pytest.mark.parametrize("bucket", ["own", "limiter"])
async def test_claim_reports_no_refill_time_for_jobs_only_in_queues_it_does_not_serve(
    two_stores: tuple[Store, Store], bucket: str
) -> None:
    """A worker of other queues would wake at each token of a bucket that a worker of
    the email queue keeps empty, for jobs it can never take."""
    email, other = two_stores
    await email.insert(new_jobs("t", 3, queue="email"), now=NOW)
    rate = RateLimit(rate=1, per=60)
    if bucket == "own":
        tasks, limiters = {"t": TaskLimits(max_attempts=3, rate_limit=rate)}, {}
    else:
        tasks, limiters = {"t": TaskLimits(max_attempts=3, limiter="mail")}, {"mail": rate}
    first = await email.claim(
        request("email", 5, tasks, limiters=limiters, queues=["email"]), now=NOW
    )
    assert len(first) == 1
    idle = await other.claim(
        request("other", 5, tasks, limiters=limiters, queues=["default"]), now=NOW + 1
    )
    assert isinstance(idle, Claimed)
    assert (len(idle), idle.next_token_at) == (0, None)
    held = await email.claim(
        request("email", 5, tasks, limiters=limiters, queues=["email"]), now=NOW + 1
    )
    assert isinstance(held, Claimed)
    assert len(held) == 0
    assert held.next_token_at == pytest.approx(NOW + 60)  # the email worker still waits


async def test_a_named_limiter_is_shared_by_tasks_and_keys_get_their_own_buckets(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores
    await a.insert(new_jobs("welcome", 40, rate_key="busy.example"), now=NOW)
    await a.insert(new_jobs("welcome", 3, rate_key="quiet.example"), now=NOW)
    await a.insert(new_jobs("receipt", 3), now=NOW)
    limits = TaskLimits(max_attempts=3, limiter="mail")
    tasks = {"welcome": limits, "receipt": limits}
    mail = {"mail": RateLimit(rate=2)}
    keyed = frozenset(mail)  # its key function gave the jobs their keys
    claimed = await a.claim(request("a", 10, tasks, limiters=mail, keyed=keyed), now=NOW)
    assert len(await b.claim(request("b", 10, tasks, limiters=mail, keyed=keyed), now=NOW)) == 0
    keys = sorted(row.id.rsplit("-", 1)[0] for row in claimed)
    # Two per bucket: the busy key's backlog (more than a page) does not hide the
    # quiet key's jobs queued behind it in the same task.
    busy, quiet = ["welcome-busy.example"] * 2, ["welcome-quiet.example"] * 2
    assert keys == ["receipt-None"] * 2 + busy + quiet


async def test_task_and_queue_concurrency_count_jobs_running_in_other_stores(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores
    await a.insert(new_jobs("t", 10), now=NOW)
    await a.insert(new_jobs("u", 10, queue="email"), now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, concurrency=3)}
    assert len(await a.claim(request("a", 2, tasks), now=NOW)) == 2
    assert len(await b.claim(request("b", 5, tasks), now=NOW)) == 1
    assert len(await a.claim(request("a", 5, tasks), now=NOW)) == 0
    by_queue = {"u": TaskLimits(max_attempts=3)}
    email = {"email": 4}
    assert len(await b.claim(request("b", 3, by_queue, queue_concurrency=email), now=NOW)) == 3
    assert len(await a.claim(request("a", 3, by_queue, queue_concurrency=email), now=NOW)) == 1
    assert len(await a.claim(request("a", 3, by_queue, queue_concurrency=email), now=NOW)) == 0


async def test_a_group_member_waits_for_the_one_before_under_limits(
    two_stores: tuple[Store, Store],
) -> None:
    a, b = two_stores
    group = [
        NewJob(
            id=f"g-{n}", task="t", queue="default", payload='{"args":[],"kwargs":{}}',
            status="queued", priority=0, run_at=NOW, max_attempts=3, group_key="user:42",
        )
        for n in range(3)
    ]  # fmt: skip
    await a.insert(group, now=NOW)
    tasks = {"t": TaskLimits(max_attempts=3, concurrency=5)}
    assert [r.id for r in await a.claim(request("a", 5, tasks), now=NOW)] == ["g-0"]
    assert len(await b.claim(request("b", 5, tasks), now=NOW)) == 0
