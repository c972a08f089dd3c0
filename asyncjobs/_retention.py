"""Retention: delete finished jobs after ``retention`` and dead ones after ``dead_retention``.

Rate-limit buckets go too once they have refilled (a missing bucket is a full one), so
a keyed limiter's buckets (one per customer, per domain) do not pile up; so do those
of a limiter this process does not define (dropped or renamed) once long unused.

The runner's maintenance loop calls ``prune_expired`` about once a minute. It
deletes in bounded batches, one short transaction each, so a large backlog of
old jobs never holds the store's write lock for long; every process may prune,
and deleting what another process already deleted is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from asyncjobs.stores._admission import limiter_bucket, own_bucket

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")

PRUNE_INTERVAL = 60.0
"""Seconds between pruning rounds of one process."""

BATCH = 500
"""Jobs deleted per transaction."""

MAX_BATCHES = 200
"""Batches per round; a round that hits it runs again at the next maintenance tick."""

WORKER_RETENTION = 86400.0
"""Rows of worker processes not seen for this long are deleted."""


async def in_batches(
    jobs: Jobs, delete: Callable[[float], Awaitable[int]], batch: int, max_batches: int
) -> int:
    """Call ``delete(now)`` (up to ``batch`` rows, one transaction) until it deletes
    fewer, ``max_batches`` times at most; return how many it deleted."""
    total = 0
    for _ in range(max_batches):
        deleted = await delete(jobs.clock.now())
        total += deleted
        if deleted < batch:
            break
        await anyio.lowlevel.checkpoint()  # let other coroutines' writes in between batches
    return total


async def prune_expired(jobs: Jobs, *, batch: int = BATCH, max_batches: int = MAX_BATCHES) -> int:
    """Delete expired finished jobs; return how many."""
    settings = jobs.settings

    def expired(now: float) -> Awaitable[int]:
        return jobs.store.prune(
            finished_before=now - settings.retention,
            dead_before=now - settings.dead_retention,
            workers_before=now - WORKER_RETENTION,
            limit=batch,
        )

    total = await in_batches(jobs, expired, batch, max_batches)
    if total:
        logger.info("pruned %d finished job(s) past retention", total, extra={"pruned": total})
    await prune_full_buckets(jobs, batch=batch, max_batches=max_batches)
    return total


def refill_times(jobs: Jobs) -> dict[str, float]:
    """Seconds a rate-limit bucket takes to refill from empty, by bucket name, for the
    limits defined in this process (the rate lives in code, not in the store)."""
    limits = {
        own_bucket(name)[0]: task.rate_limit
        for name, task in jobs.registry.items()
        if task.rate_limit is not None
    }
    limits |= {limiter_bucket(name, "")[0]: lim.limit for name, lim in jobs.limiters.items()}
    return {name: limit.refill_seconds for name, limit in limits.items()}


def unused_bucket_age(jobs: Jobs, refills: dict[str, float]) -> float:
    """Seconds after which a bucket of a name this process does not define is deleted.

    Such a name's rate is not known here: the limiter was dropped or renamed, or only
    another deploy sharing the store defines it (a rolling deploy, a service with other
    tasks). Its bucket goes once unused for as long as the store keeps any job
    (``retention``, ``dead_retention``) or any bucket of this process takes to refill,
    whichever is longest: a rate that takes longer still to refill gets its bucket back
    full that much early, once that long unused."""
    settings = jobs.settings
    return max(settings.retention, settings.dead_retention, *refills.values())


async def prune_full_buckets(
    jobs: Jobs, *, batch: int = BATCH, max_batches: int = MAX_BATCHES
) -> int:
    """Delete the rate-limit buckets that have refilled since they were last used, and
    those of names this process does not define unused for ``unused_bucket_age``."""
    refills = refill_times(jobs)
    unused = unused_bucket_age(jobs, refills)

    def full(now: float) -> Awaitable[int]:
        before = {name: now - seconds for name, seconds in refills.items()}
        return jobs.store.prune_buckets(full_before=before, others_before=now - unused, limit=batch)

    return await in_batches(jobs, full, batch, max_batches)


class Pruner:
    """When the maintenance loop should prune next (per process)."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.next_at = jobs.clock.now()

    async def maybe_prune(self) -> None:
        now = self.jobs.clock.now()
        if now < self.next_at:
            return
        try:
            deleted = await prune_expired(self.jobs)
        except Exception:
            logger.exception("pruning finished jobs failed")
            deleted = 0
        full = deleted >= BATCH * MAX_BATCHES
        self.next_at = now if full else now + PRUNE_INTERVAL
