"""``await jobs.stats()``: what the queues are doing, as JSON-shaped data.

The numbers come from the store (one ``Store.snapshot`` read), so every process
sharing a store reports the same thing. Metrics (``_metrics.py``), the dashboard
and the CLI all read this.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict

from asyncjobs._models import JobStatus
from asyncjobs.stores._ops_rows import FinishedSample, OpsSnapshot

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0}
"""Recent windows for throughput and failure rate, by label."""

SAMPLE = 1000
"""How many of the newest finished (succeeded or dead) jobs the timing percentiles use."""

WORKERS_SEEN_WITHIN = 3600.0
"""Workers whose last heartbeat is older than this are left out of ``stats()``."""

STATUSES = tuple(status.value for status in JobStatus)


class WindowStats(TypedDict):
    """Jobs that finished in the last ``seconds``."""

    seconds: float
    succeeded: int
    dead: int
    cancelled: int
    throughput: float
    """Jobs that succeeded or died, per second."""
    failure_rate: float | None
    """dead / (succeeded + dead); None when none finished."""


class Timing(TypedDict):
    """Percentiles in seconds over the newest finished jobs (``count`` of them)."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class GroupStats(TypedDict):
    """Numbers for one task, one queue, or everything."""

    counts: dict[str, int]
    """Jobs in the store by status (every status present, zero when none)."""
    oldest_queued_age: float | None
    """Seconds the oldest due job has been waiting for a worker."""
    windows: dict[str, WindowStats]
    run_time: Timing
    """started_at → finished_at of the last attempt."""
    wait_time: Timing
    """run_at (when it became due) → started_at."""
    stuck: int
    """Running jobs whose lease expired (their worker stopped heartbeating)."""


class TaskStats(GroupStats):
    task: str


class QueueStats(GroupStats):
    queue: str
    tasks: list[TaskStats]


class StuckJobStats(TypedDict):
    id: str
    queue: str
    task: str
    worker: str | None
    attempts: int
    lease_expired_at: str


class WorkerStats(TypedDict):
    id: str
    host: str
    pid: int
    started_at: str
    last_seen_at: str
    seconds_since_seen: float
    stopped_at: str | None
    alive: bool
    """Not stopped, and heartbeated within its own ``visibility_timeout`` (the reader's
    for a worker of an earlier version)."""
    running: int
    concurrency: int
    queues: list[str] | None


class ScheduleStats(TypedDict):
    """A cron/periodic schedule registered in the process that reports."""

    task: str
    schedule: str
    """Readable: the cron expression and zone, or ``every 300s``."""
    cron: str | None
    timezone: str | None
    every: float | None
    next_run_at: str


class Stats(TypedDict):
    generated_at: str
    totals: GroupStats
    queues: list[QueueStats]
    stuck_jobs: list[StuckJobStats]
    workers: list[WorkerStats]
    schedules: list[ScheduleStats]


async def read_snapshot(jobs: Jobs, *, sample: int = SAMPLE) -> tuple[OpsSnapshot, float]:
    now = jobs.clock.now()
    snapshot = await jobs.store.snapshot(
        now=now,
        windows=list(WINDOWS.values()),
        sample=sample,
        workers_since=now - WORKERS_SEEN_WITHIN,
    )
    return snapshot, now


async def collect(jobs: Jobs, *, sample: int = SAMPLE) -> Stats:
    snapshot, now = await read_snapshot(jobs, sample=sample)
    return build(
        snapshot,
        now=now,
        alive_within=jobs.settings.visibility_timeout,
        schedules=read_schedules(jobs),
    )


def build(
    snapshot: OpsSnapshot,
    *,
    now: float,
    alive_within: float,
    schedules: list[ScheduleStats] | None = None,
) -> Stats:
    """Shape a store snapshot into ``Stats`` (pure: no I/O). Each entry of the snapshot
    is read once, into the parts of its (queue, task); a queue and the totals add up
    their tasks' parts (with 1,000 tasks, reading the whole snapshot for each task and
    queue held the event loop for seconds)."""
    parts = _parts_by_task(snapshot)
    by_queue: dict[str, list[str]] = defaultdict(list)
    for queue, task in sorted(parts):
        by_queue[queue].append(task)

    queues: list[QueueStats] = []
    for queue, tasks in by_queue.items():
        tasks_stats = [TaskStats(task=task, **_group([parts[queue, task]], now)) for task in tasks]
        queue_parts = [parts[queue, task] for task in tasks]
        queues.append(QueueStats(queue=queue, tasks=tasks_stats, **_group(queue_parts, now)))
    return Stats(
        generated_at=_iso(now),
        totals=_group(list(parts.values()), now),
        queues=queues,
        stuck_jobs=[
            StuckJobStats(
                id=s.id,
                queue=s.queue,
                task=s.task,
                worker=s.worker,
                attempts=s.attempts,
                lease_expired_at=_iso(s.lease_until),
            )
            for s in snapshot.stuck
        ],
        workers=[
            WorkerStats(
                id=w.id,
                host=w.host,
                pid=w.pid,
                started_at=_iso(w.started_at),
                last_seen_at=_iso(w.last_seen_at),
                seconds_since_seen=round(max(now - w.last_seen_at, 0.0), 3),
                stopped_at=None if w.stopped_at is None else _iso(w.stopped_at),
                alive=w.stopped_at is None
                and now - w.last_seen_at <= (w.visibility_timeout or alive_within),
                running=w.running,
                concurrency=w.concurrency,
                queues=None if w.queues is None else list(w.queues),
            )
            for w in snapshot.workers
        ],
        schedules=schedules or [],
    )


@dataclass(slots=True)
class _Parts:
    """What a snapshot holds of one (queue, task)."""

    counts: dict[str, int] = field(default_factory=dict)
    oldest_due: float | None = None
    finished: dict[str, list[int]] = field(default_factory=dict)
    samples: list[FinishedSample] = field(default_factory=list)
    stuck: int = 0


def _parts_by_task(snapshot: OpsSnapshot) -> dict[tuple[str, str], _Parts]:
    parts: dict[tuple[str, str], _Parts] = defaultdict(_Parts)
    for (queue, task, status), n in snapshot.counts.items():
        parts[queue, task].counts[status] = n
    for key, run_at in snapshot.oldest_due.items():
        parts[key].oldest_due = run_at
    for (queue, task, status), per_window in snapshot.finished.items():
        parts[queue, task].finished[status] = per_window
    for sample in snapshot.samples:
        parts[sample.queue, sample.task].samples.append(sample)
    for key, n in snapshot.stuck_counts.items():
        parts[key].stuck = n
    return dict(parts)


def _group(parts: list[_Parts], now: float) -> GroupStats:
    counts = dict.fromkeys(STATUSES, 0)
    for part in parts:
        for status, n in part.counts.items():
            # A status this version does not know reads as dead (``info_from_row``).
            counts[status if status in counts else JobStatus.DEAD.value] += n
    oldest = [part.oldest_due for part in parts if part.oldest_due is not None]
    windows: dict[str, WindowStats] = {}
    for i, (label, seconds) in enumerate(WINDOWS.items()):
        done = {"succeeded": 0, "dead": 0, "cancelled": 0}
        for part in parts:
            for status, per_window in part.finished.items():
                if status in done:
                    done[status] += per_window[i]
        ended = done["succeeded"] + done["dead"]
        windows[label] = WindowStats(
            seconds=seconds,
            succeeded=done["succeeded"],
            dead=done["dead"],
            cancelled=done["cancelled"],
            throughput=round(ended / seconds, 6),
            failure_rate=round(done["dead"] / ended, 6) if ended else None,
        )
    samples = [sample for part in parts for sample in part.samples]
    return GroupStats(
        counts=counts,
        oldest_queued_age=round(max(now - min(oldest), 0.0), 3) if oldest else None,
        windows=windows,
        run_time=timing(run_times(samples)),
        wait_time=timing(wait_times(samples)),
        stuck=sum(part.stuck for part in parts),
    )


def run_times(samples: Iterable[FinishedSample]) -> list[float]:
    return [max(s.finished_at - s.started_at, 0.0) for s in samples if s.started_at is not None]


def wait_times(samples: Iterable[FinishedSample]) -> list[float]:
    return [max(s.started_at - s.run_at, 0.0) for s in samples if s.started_at is not None]


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


def timing(values: list[float]) -> Timing:
    if not values:
        return Timing(count=0, p50=None, p90=None, p99=None, max=None)
    ordered = sorted(values)
    return Timing(
        count=len(ordered),
        p50=round(percentile(ordered, 0.50), 6),
        p90=round(percentile(ordered, 0.90), 6),
        p99=round(percentile(ordered, 0.99), 6),
        max=round(ordered[-1], 6),
    )


def read_schedules(jobs: Jobs) -> list[ScheduleStats]:
    """Cron/periodic schedules registered in this process, with their next run."""
    found = []
    for info in jobs.schedules():
        if info.cron is not None:
            described = f"{info.cron} ({info.timezone})" if info.timezone else info.cron
        else:
            described = f"every {info.every:g}s"
        found.append(
            ScheduleStats(
                task=info.task,
                schedule=described,
                cron=info.cron,
                timezone=info.timezone,
                every=info.every,
                next_run_at=info.next_run_at.astimezone(UTC).isoformat(),
            )
        )
    return found


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def human_duration(seconds: float | None, *, missing: str = "-") -> str:
    """A duration as people read it (the CLI's and the dashboard's tables): 850 ms,
    4.2 s, 3.5 min, 36.0 h, 3.0 d; ``missing`` when there is none."""
    if seconds is None:
        return missing
    # Each unit ends where its rounded figure would reach the next one (0.9996 s is
    # "1.0 s", not "1000 ms"), so the figure shown decides, not the exact value.
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f} ms"
    if round(seconds, 1) < 120:
        return f"{seconds:.1f} s"
    if round(seconds / 60, 1) < 120:
        return f"{seconds / 60:.1f} min"
    if round(seconds / 3600, 1) < 48:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
