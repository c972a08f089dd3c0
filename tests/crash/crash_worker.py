"""A worker process for the multi-process and crash tests: run as a script, never collected.

``python crash_worker.py DB --runs FILE --ready FILE --stop FILE [--work S] [...]`` serves
jobs until FILE ``--stop`` exists. Each run of task ``record`` appends its job id to
``--runs`` (line-buffered, so a record survives kill -9); ``poison`` kills the process.
``--enqueue N``: once started, the process enqueues N ``record`` jobs itself, one by
one, so free slots take them at once (local dispatch); their ids go to ``--ready``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

import anyio

from asyncjobs import Jobs, current_job


def build(args: argparse.Namespace, runs: TextIO) -> Jobs:
    jobs = Jobs(
        args.db,
        concurrency=args.concurrency,
        visibility_timeout=args.visibility_timeout,
        poll_interval=0.2,
        shutdown_timeout=5,
    )

    @jobs.task(name="record")
    async def record(i: int) -> int:
        if args.work:
            await anyio.sleep(args.work)  # noqa: TID251 - simulated work in a real process
        runs.write(f"{current_job().id}\n")
        return i

    @jobs.task(name="ping")
    async def ping() -> None:
        return None

    @jobs.task(name="poison", retries=2)
    async def poison() -> None:
        runs.write(f"{current_job().id}\n")
        os._exit(3)

    return jobs


async def serve(args: argparse.Namespace, runs: TextIO) -> None:
    jobs = build(args, runs)
    stop = anyio.Path(args.stop)
    async with jobs:
        if args.enqueue:  # once a claim found nothing waiting, free slots take jobs at once
            await (await jobs.enqueue("ping")).result(timeout=10)
        made = [await jobs.enqueue("record", i) for i in range(args.enqueue)]
        written = anyio.Path(args.ready + ".part")  # renamed: the test never reads half
        await written.write_text("".join(f"{job.id}\n" for job in made))
        await written.rename(args.ready)
        while not await stop.exists():  # noqa: ASYNC110 - another process creates the file
            await anyio.sleep(0.05)  # noqa: TID251 - a real process waiting for its stop file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--runs", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--work", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--visibility-timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with Path(args.runs).open("a", buffering=1) as runs:
        anyio.run(serve, args, runs)


if __name__ == "__main__":
    main()
