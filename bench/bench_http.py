"""HTTP benchmark: an endpoint that enqueues one durable job vs Starlette BackgroundTasks.

Run: ``.venv/bin/python bench/bench_http.py`` (``--help`` for durations). One uvicorn
process serves both endpoints (same app, same process, same run):

- ``POST /durable``: ``await request.state.jobs.enqueue(task, n)`` (SQLite, committed
  before the 202), with the asyncjobs workers running the jobs in the same process
  (``--no-workers``: nobody runs them; ``--worker-process``: a second process on the
  same file runs them, and the report says how long it took to catch up);
- ``POST /background``: the same no-op task run by Starlette's ``BackgroundTasks``
  after the response (not durable).

``--server-stats`` adds what the server counts itself for each endpoint: the garbage
collector's runs and time per request, and how many of the store's writes on the event
loop found the file locked by another connection (with ``--worker-process``).

``--gc-freeze`` has the app call ``gc.freeze()`` once its startup is done (an app's own
choice); ``--gc-off``, a diagnostic, turns the collector off in the server, to show what
each endpoint costs without it.

``--reference`` adds two endpoints that do no job work at all, to show what any
endpoint that waits costs before a job is built or written:

- ``POST /yield``: suspends the request once (``await asyncio.sleep(0)``);
- ``POST /wait``: waits for a group commit that a worker thread flushes without
  writing anything: the wait a durable enqueue makes, minus the job and the SQL.

The load generator is ``wrk`` on loopback (``apt-get install -y wrk``); without it a
bounded keep-alive HTTP/1.1 load generator runs in a separate Python process. Rounds
alternate between the endpoints; the report gives each endpoint's median requests/s,
the server's CPU time per request (all its threads), wrk's 99th percentile latency,
and the ratio durable / background (target >= 0.8), also as the median of each round's
own ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ENDPOINTS = ("background", "durable")
REFERENCE_ENDPOINTS = ("yield", "wait")


# -- the server (runs in the child process) -------------------------------------------


class ServerStats:
    """``--server-stats``: what the server spends besides answering, counted in the server.

    The garbage collector's runs by generation and its time (``gc.callbacks``), and the
    store's short writes tried on the event loop and how many of them found the file
    locked by another connection (``InlineWriter``'s tries, wrapped: a diagnostic only).
    ``GET /stats`` returns the counts since the last call and starts them again.
    """

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self._started = 0.0
        self.reset()

    def reset(self) -> dict[str, float]:
        taken = self.counts
        self.counts = dict.fromkeys(
            ("gen0", "gen1", "gen2", "gc_seconds", "gen0_seconds", "gen1_seconds",
             "gen2_seconds", "inline_writes", "inline_refused"), 0,
        )  # fmt: skip
        return taken

    def install(self) -> None:
        from asyncjobs.stores._sqlite_side import InlineWriter

        def collected(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._started = time.perf_counter()
            else:
                took = time.perf_counter() - self._started
                self.counts[f"gen{info['generation']}"] += 1
                self.counts[f"gen{info['generation']}_seconds"] += took
                self.counts["gc_seconds"] += took

        gc.callbacks.append(collected)
        for name in ("try_write", "try_transaction"):
            tried = getattr(InlineWriter, name)

            def counted(writer: Any, *args: Any, _tried: Any = tried, **kwargs: Any) -> Any:
                result = _tried(writer, *args, **kwargs)
                self.counts["inline_writes"] += 1
                self.counts["inline_refused"] += result is None
                return result

            setattr(InlineWriter, name, counted)


def serve(
    port: int,
    db: str,
    workers: bool,
    stats: bool = False,
    freeze: bool = False,
    gc_off: bool = False,
) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTasks
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncjobs import Jobs, JobsMiddleware
    from asyncjobs._batching import GroupCommit

    jobs = Jobs("sqlite:///" + db, concurrency=50, workers=workers)

    @jobs.task(name="record")
    async def record(n: int) -> None:
        return None

    async def durable(request: Request) -> JSONResponse:
        job = await request.state.jobs.enqueue(record, 1)
        return JSONResponse({"job": job.id}, status_code=202)

    async def background(request: Request) -> JSONResponse:
        tasks = BackgroundTasks()
        tasks.add_task(record, 1)
        return JSONResponse({"job": None}, status_code=202, background=tasks)

    async def yield_once(request: Request) -> JSONResponse:
        await asyncio.sleep(0)
        return JSONResponse({"job": None}, status_code=202)

    thread = ThreadPoolExecutor(1)

    async def flush_in_thread(items: list[int]) -> list[int]:
        await asyncio.get_running_loop().run_in_executor(thread, len, items)
        return items

    commits = GroupCommit(flush_in_thread)

    async def wait(request: Request) -> JSONResponse:
        await commits.submit(1)
        return JSONResponse({"job": None}, status_code=202)

    counted = ServerStats()
    if stats:
        counted.install()

    async def server_stats(request: Request) -> JSONResponse:
        return JSONResponse(counted.reset())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if freeze:  # --gc-freeze: what an app can do once its startup is done
            gc.freeze()
        if gc_off:  # --gc-off: a diagnostic, what every endpoint costs without the collector
            gc.disable()
        yield

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/durable", durable, methods=["POST"]),
            Route("/background", background, methods=["POST"]),
            Route("/yield", yield_once, methods=["POST"]),
            Route("/wait", wait, methods=["POST"]),
            Route("/stats", server_stats),
        ],
        middleware=[Middleware(JobsMiddleware, jobs=jobs)],
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def work(db: str) -> None:
    """The ``--worker-process`` child: run the jobs the server enqueues until SIGTERM."""
    from asyncjobs import Jobs

    jobs = Jobs("sqlite:///" + db, concurrency=50)

    @jobs.task(name="record")
    async def record(n: int) -> None:
        return None

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with jobs:
            await stop.wait()

    asyncio.run(main())


def unfinished(db: str) -> int:
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM asyncjobs_jobs WHERE status <> 'succeeded'"
        ).fetchone()
    return int(count)


# -- load generators ------------------------------------------------------------------

WRK_SCRIPT = (
    'wrk.method = "POST"\nwrk.body = "{}"\nwrk.headers["Content-Type"] = "application/json"\n'
)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(
    url: str, seconds: int, connections: int, threads: int, script: Path
) -> tuple[float, float]:
    """Requests/s and the 99th percentile latency in ms, as wrk measured them."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{url}: {errors.group(1)} failed responses\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if rate is None or p99 is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return float(rate.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)]


async def _python_load(host: str, port: int, path: str, seconds: float, connections: int) -> int:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()
    deadline = time.perf_counter() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 2"):
                    raise SystemExit(f"failed response: {head!r}")
                length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(client() for _ in range(connections)))
    return done


def run_python_load(url: str, seconds: int, connections: int) -> float:
    """The fallback load generator, in its own process so it does not share the server's."""
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert match is not None
    out = subprocess.run(
        [sys.executable, __file__, "--load", url, "--seconds", str(seconds),
         "--connections", str(connections)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(out.strip())


# -- the driver -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


def server_cpu(pid: int) -> float | None:
    """CPU seconds the server process has used, all threads (Linux /proc; else None).

    Requests/s moves with the machine's load; CPU per request moves much less, so the
    report gives both: the server's CPU per request shows what the durable write costs.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def read_stats(port: int) -> dict[str, float]:
    """The server's ``--server-stats`` counts since the last call (which restarts them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        counts: dict[str, float] = json.load(response)
    return counts


def per_request(counts: dict[str, float], requests: float) -> dict[str, float]:
    """One round's counts as µs of collection per request, collections and store writes
    on the loop per 1,000 requests, and the share of those writes refused."""
    writes = counts["inline_writes"]
    return {
        "gc_us": counts["gc_seconds"] / requests * 1e6,
        **{f"gen{g}": counts[f"gen{g}"] / requests * 1000 for g in range(3)},
        **{f"gen{g}_us": counts[f"gen{g}_seconds"] / requests * 1e6 for g in range(3)},
        "refused": counts["inline_refused"] / writes if writes else 0.0,
        "writes": writes / requests * 1000,
    }


def describe_stats(rounds: list[dict[str, float]]) -> str:
    """The medians of the rounds' ``per_request`` figures, as one line."""
    m = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    text = (
        f"gc {m['gc_us']:.1f} µs/request ({m['gen0_us']:.1f} young, {m['gen1_us']:.1f} "
        f"middle, {m['gen2_us']:.1f} full); collections per 1,000 requests: "
        f"{m['gen0']:.1f} young, {m['gen1']:.2f} middle, {m['gen2']:.2f} full"
    )
    if m["writes"]:
        text += (
            f"; store writes on the loop: {m['writes']:.1f} per 1,000 requests, "
            f"{m['refused']:.0%} of them refused (file locked)"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per endpoint")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--python-load", action="store_true", help="do not use wrk")
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="enqueue only (Jobs(workers=False)): isolates the cost of the durable write",
    )
    parser.add_argument(
        "--worker-process",
        action="store_true",
        help="enqueue only in the server; a second process on the same file runs the jobs",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure /yield and /wait: endpoints that wait but do no job work",
    )
    parser.add_argument(
        "--server-stats",
        action="store_true",
        help="also report the server's garbage collections per request and, for the "
        "durable endpoint, how many of the store's writes on the loop found the file locked",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="the app calls gc.freeze() once its startup is done (every endpoint: one "
        "server), so the collector's full runs skip the objects of startup",
    )
    parser.add_argument(
        "--gc-off",
        action="store_true",
        help="a diagnostic: the server turns the garbage collector off (gc.disable()) once "
        "its startup is done, to show what each endpoint costs without its runs",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.work is not None:
        work(args.work)
        return
    if args.serve is not None:
        serve(
            args.serve,
            args.db,
            workers=not args.no_workers,
            stats=args.server_stats,
            freeze=args.gc_freeze,
            gc_off=args.gc_off,
        )
        return
    if args.load is not None:
        match = re.match(r"http://([^:/]+):(\d+)(/.*)", args.load)
        assert match is not None
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        print(
            asyncio.run(_python_load(host, port, path, args.seconds, args.connections))
            / args.seconds
        )
        return

    use_wrk = not args.python_load and shutil.which("wrk") is not None
    endpoints = ENDPOINTS + (REFERENCE_ENDPOINTS if args.reference else ())
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        db = str(Path(tmp) / "bench-jobs.db")
        serve_args = ["--serve", str(port), "--db", db]
        if args.no_workers or args.worker_process:
            serve_args.append("--no-workers")  # the server reads it, not just the report
        if args.server_stats:
            serve_args.append("--server-stats")
        if args.gc_freeze:
            serve_args.append("--gc-freeze")
        if args.gc_off:
            serve_args.append("--gc-off")
        server = subprocess.Popen([sys.executable, __file__, *serve_args])
        worker = None
        caught_up: float | None = None
        left = 0
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT)
        try:
            wait_for_port(port, server)
            if args.worker_process:  # the server created the file's tables by now
                worker = subprocess.Popen([sys.executable, __file__, "--work", db])

            cpu: dict[str, list[float]] = {e: [] for e in endpoints}  # µs per request

            p99: dict[str, list[float]] = {e: [] for e in endpoints}  # ms, wrk only
            # --server-stats: each round's counts, per request
            spent: dict[str, list[dict[str, float]]] = {e: [] for e in endpoints}

            def measure(endpoint: str, seconds: int) -> float:
                url = f"http://127.0.0.1:{port}/{endpoint}"
                if args.server_stats:
                    read_stats(port)  # start counting
                before = server_cpu(server.pid)
                if use_wrk:
                    rate, latency = run_wrk(url, seconds, args.connections, args.threads, script)
                    p99[endpoint].append(latency)
                else:
                    rate = run_python_load(url, seconds, args.connections)
                after = server_cpu(server.pid)
                if before is not None and after is not None and rate > 0:
                    cpu[endpoint].append((after - before) / (rate * seconds) * 1e6)
                if args.server_stats and rate > 0:
                    spent[endpoint].append(per_request(read_stats(port), rate * seconds))
                return rate

            for endpoint in endpoints:  # warm up
                measure(endpoint, 1)
            for samples in (*cpu.values(), *p99.values()):
                samples.clear()
            for counted in spent.values():
                counted.clear()
            results: dict[str, list[float]] = {e: [] for e in endpoints}
            for _ in range(args.rounds):
                for endpoint in endpoints:
                    results[endpoint].append(measure(endpoint, args.seconds))
            if worker is not None:  # how long until the worker has run every job
                started = time.monotonic()
                while unfinished(db) and time.monotonic() - started < 120:
                    time.sleep(0.1)
                caught_up = time.monotonic() - started
                left = unfinished(db)
        finally:
            for proc in (worker, server):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)

    generator = (
        f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s"
        if use_wrk
        else f"python load generator, {args.connections} connections, {args.seconds}s"
    )
    if args.worker_process:
        workers = "enqueue only; a second process runs the jobs"
    elif args.no_workers:
        workers = "no workers (enqueue only) in the same process"
    else:
        workers = "workers running the jobs in the same process"
    print(f"load: {generator}, {args.rounds} rounds per endpoint, cpus: {os.cpu_count()}")
    print(f"durable endpoint: {workers}")
    if args.gc_freeze:
        print("the app calls gc.freeze() once its startup is done (--gc-freeze)")
    if args.gc_off:
        print("the server runs with the garbage collector off (--gc-off)")
    if caught_up is not None:
        print(
            f"worker process: caught up {caught_up:.1f}s after the last round, {left} job(s) left"
        )
    medians = {e: statistics.median(v) for e, v in results.items()}
    for endpoint in endpoints:
        rounds = ", ".join(f"{v:,.0f}" for v in results[endpoint])
        line = f"{endpoint:>10}: {medians[endpoint]:>9,.0f} req/s (median; rounds {rounds})"
        if cpu[endpoint]:
            line += f", server CPU {statistics.median(cpu[endpoint]):.0f} µs/request"
        if p99[endpoint]:
            line += f", p99 latency {statistics.median(p99[endpoint]):.1f} ms"
        print(line)
        if spent[endpoint]:
            print(" " * 12 + describe_stats(spent[endpoint]))
    for endpoint in REFERENCE_ENDPOINTS if args.reference else ():
        print(f"{endpoint:>10} / background = {medians[endpoint] / medians['background']:.2f}x")
    ratio = medians["durable"] / medians["background"]
    # Each round measures background then durable back to back: on a noisy shared machine
    # the ratio within a round drifts less than the two medians taken apart.
    paired = statistics.median(
        d / b for d, b in zip(results["durable"], results["background"], strict=True)
    )
    print(
        f"   durable / background = {ratio:.2f}x (target >= 0.8x); "
        f"median of the rounds' own ratios {paired:.2f}x"
    )


if __name__ == "__main__":
    main()
