"""pgqueuer (PostgreSQL, asyncpg). ``QueueManager`` in this process.

Concurrency 10: the entrypoint's ``concurrency_limit=10`` (enforced in SQL) with
``batch_size=10``. That was faster here than the other way to cap at 10,
``max_concurrent_tasks=10``, which forces ``batch_size<=5``. LISTEN/NOTIFY
wake-ups (its default). Producer and worker use separate connections. A fresh
database per run (schema from ``Queries.install()``), dropped after.
"""

from __future__ import annotations

import asyncio

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from bench.peers._common import (
    CONCURRENCY,
    Adapter,
    create_database,
    drop_database,
    main,
)

BATCH = CONCURRENCY


class PgQueuerAdapter(Adapter):
    library = "pgqueuer"
    backend = "PostgreSQL"

    async def setup(self) -> None:
        self.dsn = await create_database("bench_pgqueuer")
        self.conn = await asyncpg.connect(self.dsn)
        self.queries = Queries(AsyncpgDriver(self.conn))
        await self.queries.install()
        self.worker_conn: asyncpg.Connection | None = None
        self.settings = {"entrypoint_concurrency_limit": CONCURRENCY, "batch_size": BATCH}

    async def teardown(self) -> None:
        await self.conn.close()
        await drop_database(self.dsn)

    async def enqueue(self, x: float) -> None:
        await self.queries.enqueue("noop", repr(x).encode())

    async def enqueue_bulk(self, n: int) -> None:
        for start in range(0, n, 1000):
            k = min(1000, n - start)
            await self.queries.enqueue(["noop"] * k, [b"0.0"] * k, [0] * k)

    async def start_workers(self) -> None:
        self.worker_conn = await asyncpg.connect(self.dsn)
        self.qm = QueueManager(Queries(AsyncpgDriver(self.worker_conn)))

        @self.qm.entrypoint("noop", concurrency_limit=CONCURRENCY)
        async def noop(job: Job) -> None:
            self.hook(float(job.payload or b"0"))

        self.task = asyncio.create_task(self.qm.run(batch_size=BATCH, max_concurrent_tasks=None))

    async def stop_workers(self) -> None:
        self.qm.shutdown.set()
        await asyncio.wait_for(self.task, 30)
        assert self.worker_conn is not None
        await self.worker_conn.close()

    async def unfinished(self) -> int:
        stats = await self.queries.queue_size()
        return sum(s.count for s in stats if s.status in ("queued", "picked"))


if __name__ == "__main__":
    main({"postgres": PgQueuerAdapter})
