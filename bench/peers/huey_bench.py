"""huey: ``RedisHuey`` and ``SqliteHuey``. Consumer in this process with 10
worker threads (huey is sync; its jobs run in threads).

``sqlite-full``: one SQLite file, WAL, ``fsync=True`` (``synchronous=FULL``), the
durable setting huey offers. Its workers poll when the queue is empty: tuned to
``initial_delay=max_delay=0.01`` s (defaults 0.1 s growing to 10 s would add up
to seconds of pickup latency). ``redis``: blocking pops (huey's default), keys
under a per-run name in Redis database ``BENCH_REDIS_DB`` (default 9), flushed after.
Periodic tasks and worker health checks off (nothing to check in a benchmark).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from huey import RedisHuey, SqliteHuey

from bench.peers._common import (
    CONCURRENCY,
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    RUN_TAG,
    Adapter,
    main,
)

POLL = 0.01


class HueyAdapter(Adapter):
    library = "huey"
    sync_enqueue = True

    def __init__(self, variant: str, workdir: Path) -> None:
        super().__init__(variant, workdir)
        self.backend = "Redis" if variant == "redis" else "SQLite"

    async def setup(self) -> None:
        name = f"bench-huey-{RUN_TAG}"
        if self.variant == "redis":
            self.huey: Any = RedisHuey(
                name, host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, blocking=True
            )
            self.settings = {"workers": CONCURRENCY, "worker_type": "thread", "blocking": True}
        else:
            self.huey = SqliteHuey(name, filename=str(self.workdir / "huey.db"), fsync=True)
            self.settings = {
                "workers": CONCURRENCY,
                "worker_type": "thread",
                "journal_mode": "wal",
                "synchronous": "FULL (fsync=True)",
                "poll_delay": POLL,
            }

        @self.huey.task(name="noop")
        def noop(x: float) -> None:
            self.hook(x)

        self.noop = noop
        self.consumer: Any = None

    async def teardown(self) -> None:
        self.huey.storage.flush_all()
        close = getattr(self.huey.storage, "close", None)
        if close is not None:
            close()

    def enqueue_sync(self, x: float) -> None:
        self.noop(x)

    async def start_workers(self) -> None:
        options: dict[str, Any] = {"initial_delay": POLL, "max_delay": POLL, "backoff": 1.0}
        self.consumer = self.huey.create_consumer(
            workers=CONCURRENCY,
            worker_type="thread",
            periodic=False,
            check_worker_health=False,
            **(options if self.variant != "redis" else {}),
        )
        self.consumer.start()

    async def stop_workers(self) -> None:
        await asyncio.to_thread(self.consumer.stop, graceful=True)

    async def unfinished(self) -> int:
        # huey removes a job from its queue when a worker takes it, and keeps no
        # "running" state; the workload waits for every run through the hook.
        return int(self.huey.pending_count())


if __name__ == "__main__":
    main({"redis": HueyAdapter, "sqlite-full": HueyAdapter})
