"""The rows of operations (stats, the dashboard, pruning): ``WorkerBeat``, what a worker
reports on each heartbeat, and ``WorkerRow``, a worker as stored; ``OpsSnapshot``,
everything ``jobs.stats()`` reads in one transaction, with its ``FinishedSample`` and
``StuckJob`` rows.

Values of the contract between asyncjobs and a database (``_protocol``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerBeat:
    """What a worker process reports about itself on each heartbeat."""

    id: str
    host: str
    pid: int
    started_at: float
    running: int
    concurrency: int
    queues: tuple[str, ...] | None
    stopped: bool = False
    visibility_timeout: float | None = None
    """Its own: it heartbeats every third of it, so others judge it alive by it."""

    def columns(self, now: float) -> tuple[Any, ...]:
        """The values both stores write to ``asyncjobs_workers`` for this beat, in the
        order ``WorkerRow.from_columns`` reads them back (queues as JSON)."""
        return (
            self.id, self.host, self.pid, self.started_at, now, now if self.stopped else None,
            self.running, self.concurrency,
            None if self.queues is None else json.dumps(list(self.queues)),
            self.visibility_timeout,
        )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRow:
    id: str
    host: str
    pid: int
    started_at: float
    last_seen_at: float
    stopped_at: float | None
    running: int
    concurrency: int
    queues: tuple[str, ...] | None
    visibility_timeout: float | None = None
    """The worker's own; None if it did not say (an earlier version)."""

    @classmethod
    def from_columns(cls, values: Iterable[Any]) -> WorkerRow:
        """A row of ``asyncjobs_workers`` as both stores select it: id, host, pid,
        started_at, last_seen_at, stopped_at, running, concurrency, queues (JSON),
        visibility_timeout."""
        (id_, host, pid, started_at, last_seen_at, stopped_at, running, concurrency, queues,
         visibility_timeout) = values  # fmt: skip
        return cls(
            id=id_, host=host, pid=pid, started_at=started_at, last_seen_at=last_seen_at,
            stopped_at=stopped_at, running=running, concurrency=concurrency,
            queues=None if queues is None else tuple(json.loads(queues)),
            visibility_timeout=visibility_timeout,
        )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishedSample:
    """Timings of one recently finished job (its last attempt)."""

    queue: str
    task: str
    status: str
    run_at: float  # when it was due: its run_at, or its enqueue if later (a past run_at)
    started_at: float | None
    finished_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckJob:
    """A running job whose lease expired: its worker stopped heartbeating."""

    id: str
    queue: str
    task: str
    worker: str | None
    attempts: int
    lease_until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsSnapshot:
    counts: dict[tuple[str, str, str], int]  # (queue, task, status) -> jobs
    oldest_due: dict[tuple[str, str], float]  # (queue, task) -> min run_at of due jobs
    finished: dict[tuple[str, str, str], list[int]]  # (queue, task, status) -> per window
    samples: list[FinishedSample]  # newest first
    stuck: list[StuckJob]  # the 1,000 longest stuck (lease end, then enqueue order)
    stuck_counts: dict[tuple[str, str], int]  # (queue, task) -> every stuck job
    workers: list[WorkerRow]
