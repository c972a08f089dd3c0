"""SAQ (Redis). Worker in this process with ``concurrency=10``.

Defaults otherwise: the worker blocks on the Redis list (no polling delay), job
results kept for SAQ's default TTL. Producer and worker use separate ``Queue``
objects (separate connection pools), as separate processes would. Keys live in
Redis database ``BENCH_REDIS_DB`` (default 9) under a per-run queue name; all are
deleted after.
"""

from __future__ import annotations

import asyncio
from typing import Any

from saq import Queue, Worker

from bench.peers._common import (
    CONCURRENCY,
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    RUN_TAG,
    Adapter,
    main,
    redis_delete,
)

URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


class SaqAdapter(Adapter):
    library = "SAQ"
    backend = "Redis"

    async def setup(self) -> None:
        self.name = f"bench-saq-{RUN_TAG}"
        self.queue = Queue.from_url(URL, name=self.name)
        await self.queue.connect()
        self.worker_queue: Queue | None = None
        self.settings = {"concurrency": CONCURRENCY}

    async def teardown(self) -> None:
        await self.queue.disconnect()
        await redis_delete(f"saq:*{self.name}*")

    async def enqueue(self, x: float) -> None:
        await self.queue.enqueue("noop", x=x)

    async def start_workers(self) -> None:
        async def noop(ctx: dict[str, Any], *, x: float) -> None:
            self.hook(x)

        self.worker_queue = Queue.from_url(URL, name=self.name)
        await self.worker_queue.connect()
        self.worker = Worker(self.worker_queue, functions=[("noop", noop)], concurrency=CONCURRENCY)
        self.task = asyncio.create_task(self.worker.start())

    async def stop_workers(self) -> None:
        await self.worker.stop()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        assert self.worker_queue is not None
        await self.worker_queue.disconnect()

    async def unfinished(self) -> int:
        return int(await self.queue.count("incomplete"))


if __name__ == "__main__":
    main({"redis": SaqAdapter})
