"""Run every workload against asyncjobs and every installed peer; print ratios.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/run_all.py            # about 5 minutes
    .venv/bin/python bench/run_all.py --quick    # about 1 minute, smaller workloads
    .venv/bin/python bench/run_all.py --full     # memory up to 1,000,000 finished jobs

Each (library, workload) runs in its own process (``bench/peers/*_bench.py``),
one after the other, producer and workers in that process. Same workload for
all: no-op jobs, concurrency 10, durable settings (asyncjobs and huey: SQLite
WAL; PostgreSQL with its server defaults; Redis as the server is configured,
reported below). Each peer module's docstring says how it is configured. A peer
that is not installed, or whose server is not reachable, is skipped with a note.

The machine is often shared, so absolute figures move between runs: compare
the ratios, which are taken against the best peer measured in the same run.
Results go to bench/results/ (JSON) and, from a whole run (no --quick, --only or
--workloads; or with --chart), the throughput chart to docs/throughput.png.

Servers: Redis at $BENCH_REDIS_HOST:$BENCH_REDIS_PORT (127.0.0.1:6379), database
$BENCH_REDIS_DB (9), keys under per-run names, deleted after; PostgreSQL at
$BENCH_PG_DSN (postgresql://postgres@127.0.0.1:5432/test), one fresh database per
run, dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers._common import PG_DSN, REDIS_HOST, REDIS_PORT  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CHART = ROOT / "docs" / "throughput.png"


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    module: str
    variant: str
    package: str
    service: str | None = None  # "redis" | "postgres"
    ours: bool = False


CONFIGS = [
    Config("asyncjobs-normal", "asyncjobs (SQLite, NORMAL)", "asyncjobs_bench", "sqlite-normal",
           "asyncjobs", ours=True),
    Config("asyncjobs-full", "asyncjobs (SQLite, FULL)", "asyncjobs_bench", "sqlite-full",
           "asyncjobs", ours=True),
    Config("asyncjobs-pg", "asyncjobs (PostgreSQL)", "asyncjobs_bench", "postgres", "asyncjobs",
           "postgres", ours=True),
    Config("huey-sqlite", "huey (SQLite, FULL)", "huey_bench", "sqlite-full", "huey"),
    Config("huey-redis", "huey (Redis)", "huey_bench", "redis", "huey", "redis"),
    Config("arq", "arq (Redis)", "arq_bench", "redis", "arq", "redis"),
    Config("saq", "SAQ (Redis)", "saq_bench", "redis", "saq", "redis"),
    Config("procrastinate", "procrastinate (PostgreSQL)", "procrastinate_bench", "postgres",
           "procrastinate", "postgres"),
    Config("pgqueuer", "pgqueuer (PostgreSQL)", "pgqueuer_bench", "postgres", "pgqueuer",
           "postgres"),
]  # fmt: skip

# workload -> (params by mode, which configs run it)
WORKLOADS: dict[str, tuple[dict[str, dict[str, Any]], str]] = {
    "throughput": (
        {"quick": {"n": 1000, "timeout": 20}, "normal": {"n": 10_000, "timeout": 60}},
        "all",
    ),
    "enqueue": (
        {"quick": {"n": 300}, "normal": {"n": 2000}},
        "all",
    ),
    "enqueue_concurrent": (
        {"quick": {"n": 1000, "producers": 50}, "normal": {"n": 5000, "producers": 50}},
        "all",
    ),
    "pickup": (
        {"quick": {"rate": 500, "duration": 1}, "normal": {"rate": 500, "duration": 3}},
        "all",
    ),
    "idle": (
        {
            "quick": {"scheduled": 10_000, "rate_limited": 1000, "interval": 2, "settle": 1},
            "normal": {"scheduled": 10_000, "rate_limited": 1000, "interval": 5, "settle": 2},
        },
        "asyncjobs-normal",
    ),
    "memory": (
        {
            "quick": {"checkpoints": [5_000, 15_000]},
            "normal": {"checkpoints": [50_000, 150_000]},
            "full": {"checkpoints": [100_000, 300_000, 1_000_000]},
        },
        "asyncjobs-normal",
    ),
}


# -- availability --------------------------------------------------------------------


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _postgres_store_available() -> bool:
    try:
        import asyncjobs.stores as stores
    except ImportError:
        return False
    return hasattr(stores, "PostgresStore")


def availability(configs: list[Config]) -> tuple[list[Config], dict[str, str]]:
    pg = urlsplit(PG_DSN)
    services = {
        "redis": _reachable(REDIS_HOST, REDIS_PORT),
        "postgres": _reachable(pg.hostname or "127.0.0.1", pg.port or 5432),
    }
    ready, skipped = [], {}
    for config in configs:
        if importlib.util.find_spec(config.package) is None:
            skipped[config.key] = f"{config.package} is not installed (pip install -e '.[bench]')"
        elif config.service and not services[config.service]:
            skipped[config.key] = f"{config.service} is not reachable"
        elif config.key == "asyncjobs-pg" and not _postgres_store_available():
            skipped[config.key] = "asyncjobs has no PostgreSQL store yet"
        else:
            ready.append(config)
    return ready, skipped


# -- environment ---------------------------------------------------------------------


def _sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    source = _sh("df", "--output=source", str(RESULTS)).splitlines()[-1:]
    device = source[0] if source else "?"
    rotational = Path(f"/sys/block/{Path(device).name}/queue/rotational")
    disk = device
    if rotational.exists():
        disk += " (rotational)" if rotational.read_text().strip() == "1" else " (non-rotational)"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "disk": disk,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in ("asyncjobs", "aiosqlite", "arq", "saq", "huey", "procrastinate", "pgqueuer"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


async def _servers() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        try:
            cfg = {}
            for key in ("appendonly", "appendfsync", "save"):
                cfg.update(await client.config_get(key))
            info["redis"] = dict(cfg)
            info["redis"]["version"] = (await client.info("server"))["redis_version"]
        finally:
            await client.aclose()
    except Exception as error:
        info["redis"] = {"error": str(error)}
    try:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            info["postgres"] = {
                "version": await conn.fetchval("SHOW server_version"),
                "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
                "fsync": await conn.fetchval("SHOW fsync"),
            }
        finally:
            await conn.close()
    except Exception as error:
        info["postgres"] = {"error": str(error)}
    return info


def redis_durable(servers: dict[str, Any]) -> bool:
    return servers.get("redis", {}).get("appendonly") == "yes"


# -- running -------------------------------------------------------------------------


def run_one(
    config: Config, workload: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", f"bench.peers.{config.module}",
        "--variant", config.variant, "--workload", workload,
        "--params", json.dumps({**params, "time_limit": timeout - 30}),
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    if "error" in result:
        tail = proc.stderr.strip().splitlines()[-1:]
        result["error"] += "".join(
            f" ({t.strip()})" for t in tail if t.strip() not in result["error"]
        )
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


# -- reporting -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(cells, widths, strict=True))]  # fmt: skip
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _best_peer(
    results: dict[str, dict[str, Any]], metric: str, higher: bool, only: set[str] | None = None
) -> tuple[str, float] | None:
    by_key = {c.key: c for c in CONFIGS}
    peers = [
        (key, r[metric])
        for key, r in results.items()
        if "error" not in r and not by_key[key].ours and (only is None or key in only)
    ]
    if not peers:
        return None
    return max(peers, key=lambda p: p[1]) if higher else min(peers, key=lambda p: p[1])


def report(run: dict[str, Any]) -> str:
    labels = {c.key: c.label for c in CONFIGS}
    res = run["results"]
    out: list[str] = []

    def ratio_rows(
        workload: str, cols: list[tuple[str, str, int]], metric: str, higher: bool
    ) -> tuple[list[list[str]], tuple[str, float] | None]:
        results = res.get(workload, {})
        best = _best_peer(results, metric, higher)
        rows = []
        for key, r in results.items():
            if "error" in r:
                rows.append([labels[key], *(["error"] * len(cols)), "", r["error"][:70]])
                continue
            cells = [_fmt(r[m], d) for _, m, d in cols]
            ratio = f"{r[metric] / best[1]:.2f}x" if best else "n/a"
            note = ""
            if r.get("partial"):
                note = f"only {r['finished']:,} of {r['n']:,} ran in {r['ran_s']:.0f}s"
            elif r.get("runs", 0) > r.get("n", 0) and workload == "throughput":
                note = f"{r['runs'] - r['n']} job(s) ran twice"
            rows.append([labels[key], *cells, ratio, note])
        return rows, best

    sections = [
        ("throughput", "End-to-end throughput: {n:,} no-op jobs enqueued first, then drained "
         "by 10 concurrent workers (higher is better)",
         [("jobs/s", "jobs_per_s", 0), ("jobs/s to all acked", "jobs_per_s_acked", 0)],
         "jobs_per_s", True, "jobs/s vs best peer"),
        ("enqueue", "Enqueue latency: one producer, {n:,} sequential enqueues, no workers "
         "(lower is better)",
         [("p50 us", "p50_us", 0), ("p99 us", "p99_us", 0), ("enqueues/s", "per_s", 0)],
         "p50_us", False, "p50 vs best peer"),
        ("enqueue_concurrent", "Enqueue rate: {producers} concurrent producers, {n:,} enqueues "
         "(higher is better)",
         [("enqueues/s", "per_s", 0)], "per_s", True, "vs best peer"),
        ("pickup", "Pickup latency (enqueue -> job start, same process) at a steady {rate:g} "
         "jobs/s for {duration:g}s (lower is better)",
         [("p50 ms", "p50_ms", 2), ("p99 ms", "p99_ms", 2), ("max ms", "max_ms", 1),
          ("achieved/s", "achieved_rate", 0)],
         "p50_ms", False, "p50 vs best peer"),
    ]  # fmt: skip
    for workload, title, cols, metric, higher, ratio_name in sections:
        if workload not in res:
            continue
        params = run["params"][workload]
        rows, best = ratio_rows(workload, cols, metric, higher)
        out.append("\n" + title.format(**params))
        out.append(_table(["library", *(c[0] for c in cols), ratio_name, "note"], rows))
        if best:
            out.append(f"best peer: {labels[best[0]]}")
    if "idle" in res:
        for key, r in res["idle"].items():
            out.append(f"\nIdle cost: {labels[key]}")
            if "error" in r:
                out.append(f"  error: {r['error']}")
                continue
            note = (
                f"{r['rate_limited']:,} rate-limited (1/h) jobs"
                if r["rate_limits_enforced"]
                else f"{r['rate_limited']:,} jobs with rate_limit='1/h' (NOT enforced: "
                f"{r['rate_limited_ran']} ran)"
            )
            out.append(
                f"  workers started, empty store:            {r['cpu_percent_empty']:.2f}% "
                "of one core\n"
                f"  + {r['scheduled']:,} jobs scheduled an hour ahead:  "
                f"{r['cpu_percent_scheduled']:.2f}%\n"
                f"  + {note}: {r['cpu_percent']:.2f}%   "
                f"(each over {r['interval_s']:.1f}s)"
            )
    if "memory" in res:
        for key, r in res["memory"].items():
            out.append(f"\nMemory while finished jobs accumulate: {labels[key]}")
            if "error" in r:
                out.append(f"  error: {r['error']}")
                continue
            rows = [
                [f"{p['finished']:,}", _fmt(p["rss_mib"], 1), _fmt(p["db_mib"], 1),
                 _fmt(p["segment_jobs_per_s"])]
                for p in r["points"]
            ]  # fmt: skip
            out.append(_table(["finished jobs", "RSS MiB", "db MiB", "jobs/s in segment"], rows))
            out.append(f"  RSS growth first -> last checkpoint: {r['rss_growth_mib']:+.1f} MiB")
    out.append("\n" + targets(run))
    if run["skipped"]:
        out.append("\nSkipped:")
        out.extend(f"  {labels[k]}: {why}" for k, why in run["skipped"].items())
    return "\n".join(out)


def targets(run: dict[str, Any]) -> str:
    """The issue's targets, checked against this run's ratios."""
    res = run["results"]
    lines = ["Targets (issue 8), this run:"]

    def ok(flag: bool) -> str:
        return "met" if flag else "NOT met"

    def get(workload: str, key: str) -> dict[str, Any] | None:
        r = res.get(workload, {}).get(key)
        return r if r and "error" not in r else None

    tp = res.get("throughput", {})
    best = _best_peer(tp, "jobs_per_s", True)
    for key, need in (("asyncjobs-normal", 4.0), ("asyncjobs-full", 2.0)):
        r = get("throughput", key)
        if r and best:
            x = r["jobs_per_s"] / best[1]
            lines.append(
                f"  throughput {key}: {x:.2f}x best peer (need {need:g}x): {ok(x >= need)}"
            )
    durable = {c.key for c in CONFIGS if c.service != "redis" or run["servers_durable"]["redis"]}
    best_enq = _best_peer(res.get("enqueue", {}), "p50_us", False, durable)
    r = get("enqueue", "asyncjobs-normal")
    if r and best_enq:
        lines.append(
            f"  enqueue p50 {r['p50_us']:.0f} us vs best durable peer {best_enq[1]:.0f} us "
            f"({best_enq[0]}): {ok(r['p50_us'] <= best_enq[1])}"
        )
    r = get("enqueue_concurrent", "asyncjobs-normal")
    if r:
        lines.append(
            f"  50 producers: {r['per_s']:,.0f}/s (need 20,000): {ok(r['per_s'] >= 20_000)}"
        )
    r = get("pickup", "asyncjobs-normal")
    if r:
        lines.append(
            f"  pickup p50 {r['p50_ms']:.2f} ms (< 1), p99 {r['p99_ms']:.2f} ms (< 5): "
            f"{ok(r['p50_ms'] < 1 and r['p99_ms'] < 5)}"
        )
    r = get("idle", "asyncjobs-normal")
    if r:
        lines.append(f"  idle {r['cpu_percent']:.2f}% of a core (< 1%): {ok(r['cpu_percent'] < 1)}")
    r = get("memory", "asyncjobs-normal")
    if r:
        first = r["points"][0]["rss_mib"]
        flat = r["rss_growth_mib"] <= max(2.0, 0.05 * first)
        lines.append(
            f"  memory {r['points'][0]['finished']:,} -> {r['points'][-1]['finished']:,} "
            f"finished: {r['rss_growth_mib']:+.1f} MiB (flat = within 5%): {ok(flat)}"
        )
    r = get("throughput", "asyncjobs-pg")
    pg_peers = [get("throughput", k) for k in ("pgqueuer", "procrastinate")]
    if r and all(pg_peers):
        top = max(p["jobs_per_s"] for p in pg_peers if p)
        lines.append(
            f"  PostgreSQL store {r['jobs_per_s']:,.0f} jobs/s vs pgqueuer/procrastinate "
            f"{top:,.0f}: {ok(r['jobs_per_s'] > top)}"
        )
    if not run["servers_durable"]["redis"]:
        lines.append(
            "  note: the Redis server runs without persistence (appendonly no), so the Redis "
            "peers are not durable here; they still count as peers for the ratios."
        )
    return "\n".join(lines)


def chart(run: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    labels = {c.key: c.label for c in CONFIGS}
    ours = {c.key for c in CONFIGS if c.ours}
    tp = {k: r for k, r in run["results"].get("throughput", {}).items() if "error" not in r}
    if not tp:
        return False
    items = sorted(tp.items(), key=lambda kv: kv[1]["jobs_per_s"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 1.6), dpi=110)
    values = [r["jobs_per_s"] for _, r in items]
    colors = ["#2b8a3e" if k in ours else "#868e96" for k, _ in items]
    bars = ax.barh([labels[k] for k, _ in items], values, color=colors)
    for bar, (_, r) in zip(bars, items, strict=True):
        text = f" {r['jobs_per_s']:,.0f}"
        if r.get("partial"):
            text += f" (only {r['finished']:,} of {r['n']:,} ran in {r['ran_s']:.0f}s)"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text,
                va="center", fontsize=9)  # fmt: skip
    m = run["machine"]
    n = run["params"]["throughput"]["n"]
    ax.set_xlabel("no-op jobs/s (higher is better)")
    ax.set_title(
        f"End-to-end throughput, {n:,} no-op jobs, concurrency 10\n"
        f"{m['nproc']} cores ({m['cpu']}), {run['date'][:10]}, one run",
        fontsize=10,
    )
    ax.set_xlim(0, max(values) * 1.15)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small workloads, about a minute")
    size.add_argument("--full", action="store_true", help="memory up to 1,000,000 finished jobs")
    parser.add_argument("--only", default="", help="comma-separated config keys to run")
    parser.add_argument("--workloads", default="", help="comma-separated workloads to run")
    chart_flags = parser.add_mutually_exclusive_group()
    chart_flags.add_argument(
        "--no-chart", action="store_true", help="do not write docs/throughput.png"
    )
    chart_flags.add_argument(
        "--chart",
        action="store_true",
        help="write docs/throughput.png even for a --quick, --only or --workloads run",
    )
    parser.add_argument(
        "--report", metavar="JSON", help="print the tables and redraw the chart of a saved run"
    )
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved))
        if not args.no_chart and chart(saved, CHART):
            print(f"chart: {CHART.relative_to(ROOT)}")
        return
    mode = "quick" if args.quick else "full" if args.full else "normal"

    wanted = [c for c in CONFIGS if not args.only or c.key in args.only.split(",")]
    configs, skipped = availability(wanted)
    workloads = [w for w in WORKLOADS if not args.workloads or w in args.workloads.split(",")]
    servers = asyncio.run(_servers())
    run: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": mode,
        "machine": machine(),
        "versions": versions(),
        "servers": servers,
        "servers_durable": {"redis": redis_durable(servers)},
        "load_average_start": os.getloadavg(),
        "params": {},
        "results": {},
        "skipped": skipped,
    }
    m = run["machine"]
    print(f"machine: {m['nproc']} cores, {m['cpu']}, {m['memory_gib']} GiB, disk {m['disk']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in run['load_average_start'])}")
    for key, why in skipped.items():
        print(f"skipping {key}: {why}")
    started = time.perf_counter()
    timeout = 900.0 if mode == "full" else 300.0
    for workload in workloads:
        by_mode, who = WORKLOADS[workload]
        params = by_mode.get(mode, by_mode["normal"])
        run["params"][workload] = params
        for config in configs:
            if who != "all" and config.key != who:
                continue
            print(f"  {workload:<19} {config.label:<28}", end="", flush=True)
            result = run_one(config, workload, params, timeout)
            run["results"].setdefault(workload, {})[config.key] = result
            print(f" {result.get('error', 'ok')} ({result.get('wall_s', 0):.1f}s)"[:120])
    run["total_s"] = round(time.perf_counter() - started, 1)
    run["load_average_end"] = os.getloadavg()

    text = report(run)
    print(text)
    print(
        f"\ntotal {run['total_s']:.0f}s; load average at end: "
        + " ".join(f"{x:.2f}" for x in run["load_average_end"])
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for path in (RESULTS / f"run-{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(run, indent=2) + "\n")
    (RESULTS / f"run-{stamp}.txt").write_text(text + "\n")
    print(f"results: {RESULTS / f'run-{stamp}.json'}")
    # The README shows the chart: only a whole run replaces it, unless asked to.
    whole = not (args.quick or args.only or args.workloads)
    draw = args.chart or (whole and not args.no_chart)
    if draw and "throughput" in run["results"] and chart(run, CHART):
        print(f"chart: {CHART.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
