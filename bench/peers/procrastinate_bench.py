"""procrastinate (PostgreSQL, psycopg 3). Worker in this process with
``concurrency=10``, LISTEN/NOTIFY on (the default), finished jobs kept (the
default). A fresh database per run, dropped after. Connection pool of 2 to 12
connections so ten concurrent jobs and the producer never wait for one.
"""

from __future__ import annotations

import asyncio

import procrastinate

from bench.peers._common import (
    CONCURRENCY,
    Adapter,
    create_database,
    drop_database,
    main,
)


class ProcrastinateAdapter(Adapter):
    library = "procrastinate"
    backend = "PostgreSQL"

    async def setup(self) -> None:
        self.dsn = await create_database("bench_procrastinate")
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=self.dsn, min_size=2, max_size=12)
        )

        @self.app.task(name="noop", queue="bench")
        async def noop(x: float) -> None:
            self.hook(x)

        self.noop = noop
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.settings = {"concurrency": CONCURRENCY, "listen_notify": True, "pool": "2-12"}

    async def teardown(self) -> None:
        await self.app.close_async()
        await drop_database(self.dsn)

    async def enqueue(self, x: float) -> None:
        await self.noop.defer_async(x=x)

    async def enqueue_bulk(self, n: int) -> None:
        for start in range(0, n, 1000):
            await self.noop.batch_defer_async(*({"x": 0.0} for _ in range(min(1000, n - start))))

    async def start_workers(self) -> None:
        self.task = asyncio.create_task(
            self.app.run_worker_async(
                queues=["bench"],
                concurrency=CONCURRENCY,
                install_signal_handlers=False,
                wait=True,
            )
        )

    async def stop_workers(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def unfinished(self) -> int:
        row = await self.app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        return int(row["n"])


if __name__ == "__main__":
    main({"postgres": ProcrastinateAdapter})
