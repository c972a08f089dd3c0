"""Processes for the chaos and shutdown tests: run as a script, never collected.

``python reliability_proc.py worker URL EVENTS_DIR STOP_FILE``
    serves task ``work`` until STOP_FILE exists. Each run appends ``start ID ATTEMPT PID``
    to EVENTS_DIR/PID.log before working and ``done ID ATTEMPT PID`` just before
    returning (line-buffered, so a line survives kill -9).
``python reliability_proc.py producer URL IDS_FILE SECONDS``
    enqueues ``work`` jobs for SECONDS, appending each returned id to IDS_FILE.
``python reliability_proc.py burst URL IDS_FILE``
    runs workers and eight producers enqueuing as fast as they can, logging ``ok ID`` for
    each enqueue that returned and ``error TYPE MESSAGE`` for each that raised, until
    SIGTERM; then stops the producers, closes the Jobs and logs ``closed``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import TextIO

import anyio

from asyncjobs import Jobs, current_job


def build(url: str, events: TextIO | None) -> Jobs:
    jobs = Jobs(
        url,
        concurrency=4,
        visibility_timeout=2,
        poll_interval=0.05,
        shutdown_timeout=2,
    )

    @jobs.task(name="work", retries=50)
    async def work(n: int) -> int:
        job = current_job()
        pid = os.getpid()
        if events is not None:
            events.write(f"start {job.id} {job.attempt} {pid}\n")
        await anyio.sleep(random.uniform(0.0, 0.03))  # noqa: TID251 - simulated work
        if events is not None:
            events.write(f"done {job.id} {job.attempt} {pid}\n")
        return n

    return jobs


async def worker(url: str, events: TextIO, stop_file: str) -> None:
    stop = anyio.Path(stop_file)
    jobs = build(url, events)
    async with jobs:
        print("ready", flush=True)
        while not await stop.exists():  # noqa: ASYNC110 - another process creates it
            await anyio.sleep(0.05)  # noqa: TID251 - a real process waiting to stop


async def producer(url: str, ids: TextIO, seconds: float) -> None:
    jobs = Jobs(url, workers=False)
    deadline = asyncio.get_running_loop().time() + seconds
    n = 0
    try:
        while asyncio.get_running_loop().time() < deadline:
            try:
                job = await jobs.enqueue("work", n)
            except Exception as error:  # logged; the test checks each one is clear
                ids.write(f"error {type(error).__name__} {error}".replace("\n", " ") + "\n")
                await anyio.sleep(0.1)  # noqa: TID251 - do not spin on a failing store
                continue
            ids.write(f"{job.id}\n")
            n += 1
            await anyio.sleep(0.004)  # noqa: TID251 - a steady stream, not a flood
    finally:
        await jobs.close()


async def burst(url: str, log: TextIO) -> None:
    jobs = build(url, None)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def produce(first: int) -> None:
        n = first
        while not stop.is_set():
            try:
                job = await jobs.enqueue("work", n)
            except Exception as error:
                log.write(f"error {type(error).__name__} {error}\n".replace("\n", " ") + "\n")
                await anyio.sleep(0.01)  # noqa: TID251 - do not spin on a failing store
            else:
                log.write(f"ok {job.id}\n")
            n += 1

    await jobs.start()
    print("ready", flush=True)
    async with anyio.create_task_group() as tg:
        for p in range(8):
            tg.start_soon(produce, p * 10_000_000)
    await jobs.close()
    log.write("closed\n")


def main() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    mode, url, *rest = sys.argv[1:]
    if mode not in ("worker", "producer", "burst"):
        raise SystemExit(f"unknown mode {mode!r}")
    name = f"{os.getpid()}.log" if mode == "worker" else ""
    # line-buffered: every line is written before the next step, so it survives kill -9
    with (Path(rest[0]) / name).open("a", buffering=1) as out:
        if mode == "worker":
            asyncio.run(worker(url, out, rest[1]))
        elif mode == "producer":
            asyncio.run(producer(url, out, float(rest[1])))
        else:
            asyncio.run(burst(url, out))


if __name__ == "__main__":
    main()
