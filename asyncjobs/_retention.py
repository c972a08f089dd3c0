"""Retention: delete finished jobs after ``retention`` and dead ones after ``dead_retention``.

The runner's maintenance loop calls ``prune_expired`` about once a minute. It
deletes in bounded batches, one short transaction each, so a large backlog of
old jobs never holds the store's write lock for long; every process may prune,
and deleting what another process already deleted is harmless.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

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


async def prune_expired(jobs: Jobs, *, batch: int = BATCH, max_batches: int = MAX_BATCHES) -> int:
    """Delete expired finished jobs; return how many."""
    settings, clock = jobs.settings, jobs.clock
    total = 0
    for _ in range(max_batches):
        now = clock.now()
        deleted = await jobs.store.prune(
            finished_before=now - settings.retention,
            dead_before=now - settings.dead_retention,
            workers_before=now - WORKER_RETENTION,
            limit=batch,
        )
        total += deleted
        if deleted < batch:
            break
        await anyio.lowlevel.checkpoint()  # let other coroutines' writes in between batches
    if total:
        logger.info("pruned %d finished job(s) past retention", total, extra={"pruned": total})
    return total


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
