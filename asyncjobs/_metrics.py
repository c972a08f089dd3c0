"""Prometheus metrics read from the store: ``jobs.metrics_app()`` (mount at ``/metrics``).

Each scrape reads one ``Store.snapshot`` and renders it with prometheus_client,
so every process sharing a store serves the same numbers (scrape any one of
them). The values are gauges of the store's current state: jobs by status,
jobs finished in the last minute and five minutes by outcome, run-time and
wait-time distributions of the newest finished jobs (gauge histograms), dead
and stuck jobs, and worker processes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from asyncjobs._errors import ConfigurationError
from asyncjobs._stats import Stats, build, read_schedules, read_snapshot
from asyncjobs._stats import run_times as run_times_of
from asyncjobs._stats import wait_times as wait_times_of
from asyncjobs.stores._ops_rows import FinishedSample, OpsSnapshot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Upper bounds (seconds) of the run-time and wait-time histograms."""


def require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as error:
        raise ConfigurationError(
            "metrics need prometheus_client: pip install 'asyncjobs[metrics]'"
        ) from error


def metrics_app(jobs: Jobs) -> ASGIApp:
    """An ASGI app that answers GET/HEAD with the Prometheus exposition of ``jobs``."""
    require_prometheus()
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
            return
        try:
            snapshot, now = await read_snapshot(jobs)
            schedules = read_schedules(jobs)
        except Exception:
            logger.exception("reading metrics from the store failed")
            await _respond(send, 503, b"the job store could not be read\n")
            return
        stats = build(
            snapshot, now=now, alive_within=jobs.settings.visibility_timeout, schedules=schedules
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(stats, snapshot))
        headers = dict(scope.get("headers") or [])
        accept = headers.get(b"accept", b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(registry)  # for HEAD too: its Content-Length is the GET's
        await _respond(
            send,
            200,
            body,
            [(b"content-type", content_type.encode("latin-1"))],
            head=scope["method"] == "HEAD",
        )

    return app


class StatsCollector:
    """A prometheus_client collector over one stats snapshot (no state of its own)."""

    def __init__(self, stats: Stats, snapshot: OpsSnapshot) -> None:
        self.stats = stats
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeHistogramMetricFamily, GaugeMetricFamily

        qt = ["queue", "task"]
        jobs = GaugeMetricFamily(
            "asyncjobs_jobs", "Jobs in the store by status (queue depth).", labels=[*qt, "status"]
        )
        oldest = GaugeMetricFamily(
            "asyncjobs_oldest_queued_age_seconds",
            "Seconds the oldest due job has waited for a worker (0 when none).",
            labels=qt,
        )
        finished = GaugeMetricFamily(
            "asyncjobs_finished_jobs",
            "Jobs that finished within the window, by outcome.",
            labels=[*qt, "outcome", "window"],
        )
        dead = GaugeMetricFamily("asyncjobs_dead_jobs", "Jobs in the dead-letter state.", labels=qt)
        stuck = GaugeMetricFamily(
            "asyncjobs_stuck_jobs",
            "Running jobs whose lease expired: their worker stopped heartbeating.",
            labels=qt,
        )
        for queue in self.stats["queues"]:
            for task in queue["tasks"]:
                labels = [queue["queue"], task["task"]]
                for status, count in task["counts"].items():
                    jobs.add_metric([*labels, status], count)
                oldest.add_metric(labels, task["oldest_queued_age"] or 0.0)
                for window, numbers in task["windows"].items():
                    for outcome in ("succeeded", "dead", "cancelled"):
                        finished.add_metric([*labels, outcome, window], numbers[outcome])
                dead.add_metric(labels, task["counts"]["dead"])
                stuck.add_metric(labels, task["stuck"])
        yield from (jobs, oldest, finished, dead, stuck)

        by_task: dict[tuple[str, str], list[FinishedSample]] = defaultdict(list)
        for sample in self.snapshot.samples:
            by_task[(sample.queue, sample.task)].append(sample)
        run = GaugeHistogramMetricFamily(
            "asyncjobs_job_run_seconds",
            "Run time of the newest finished jobs (last attempt).",
            labels=qt,
        )
        wait = GaugeHistogramMetricFamily(
            "asyncjobs_job_wait_seconds",
            "Time the newest finished jobs waited for a worker once due.",
            labels=qt,
        )
        for (queue_name, task_name), samples in sorted(by_task.items()):
            for family, values in ((run, run_times_of(samples)), (wait, wait_times_of(samples))):
                family.add_metric(
                    [queue_name, task_name], buckets=_buckets(values), gsum_value=sum(values)
                )
        yield from (run, wait)

        workers = GaugeMetricFamily(
            "asyncjobs_workers",
            "Worker processes seen in the last hour, by state.",
            labels=["state"],
        )
        alive = sum(1 for w in self.stats["workers"] if w["alive"])
        workers.add_metric(["alive"], alive)
        workers.add_metric(["gone"], len(self.stats["workers"]) - alive)
        last_seen = GaugeMetricFamily(
            "asyncjobs_worker_last_seen_age_seconds",
            "Seconds since each worker process's last heartbeat.",
            labels=["worker"],
        )
        for worker in self.stats["workers"]:
            last_seen.add_metric([worker["id"]], worker["seconds_since_seen"])
        yield from (workers, last_seen)


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    ordered = sorted(values)
    buckets: list[tuple[str, float]] = []
    i = 0
    for bound in BUCKETS:
        while i < len(ordered) and ordered[i] <= bound:
            i += 1
        buckets.append((repr(bound), float(i)))
    buckets.append(("+Inf", float(len(ordered))))
    return buckets


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head: bool = False,
) -> None:
    """Send ``body`` with its length; for HEAD, the same headers and no body."""
    headers = headers or [(b"content-type", b"text/plain; charset=utf-8")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Served on its own (not mounted), the app has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
