"""arq (Redis). Worker in this process with ``max_jobs=10``.

Tuned: ``poll_delay=0.01`` (the default 0.5 s sleeps between reads of the queue,
which caps a drain near 200 jobs/s and adds up to 0.5 s of pickup latency).
Results kept as by default (``keep_result=3600``). The worker has its own
connection pool, as it would in its own process. Keys live in Redis database
``BENCH_REDIS_DB`` (default 9) under a per-run queue name; all are deleted after.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

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

POLL_DELAY = 0.01


class ArqAdapter(Adapter):
    library = "arq"
    backend = "Redis"

    async def setup(self) -> None:
        self.queue = f"bench-arq-{RUN_TAG}"
        self.redis = RedisSettings(host=REDIS_HOST, port=REDIS_PORT, database=REDIS_DB)
        self.pool = await create_pool(self.redis, default_queue_name=self.queue)
        self.worker: Worker | None = None
        self.settings = {"max_jobs": CONCURRENCY, "poll_delay": POLL_DELAY, "keep_result": 3600}

    async def teardown(self) -> None:
        await self.pool.aclose()
        await redis_delete(f"{self.queue}*", "arq:*")

    async def enqueue(self, x: float) -> None:
        await self.pool.enqueue_job("noop", x)

    async def start_workers(self) -> None:
        async def noop(ctx: dict[str, Any], x: float) -> None:
            self.hook(x)

        self.worker = Worker(
            functions=[func(noop, name="noop")],
            queue_name=self.queue,
            redis_settings=self.redis,
            max_jobs=CONCURRENCY,
            poll_delay=POLL_DELAY,
            handle_signals=False,
        )
        self.task = asyncio.create_task(self.worker.async_run())

    async def stop_workers(self) -> None:
        assert self.worker is not None
        # Let jobs that already ran finish recording their results: close() would
        # cancel them mid-way.
        for _ in range(500):
            if all(t.done() for t in self.worker.tasks.values()):
                break
            await asyncio.sleep(0.01)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.worker.close()

    async def unfinished(self) -> int:
        return int(await self.pool.zcard(self.queue))


if __name__ == "__main__":
    main({"redis": ArqAdapter})
