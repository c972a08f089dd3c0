"""Where does asyncjobs spend its time while draining no-op jobs?

    .venv/bin/python bench/profile_asyncjobs.py [--n 20000] [--variant sqlite-normal]

Two passes over the throughput workload (fill the queue, then time the drain),
each in a fresh process:

1. Round trips: counts every call into aiosqlite's connection thread during the
   drain (``aiosqlite.Connection._execute``, wrapped here, asyncjobs untouched),
   and every write run on the event loop instead (``InlineWriter``, named
   ``loop:...``), by operation, with their latency, and how many jobs each
   claim/ack carried.
2. Sampling: py-spy attaches to the process for the drain only (``--threads``,
   250 Hz) and the stacks are folded into time per thread, the top functions by
   self time on the event loop thread, and asyncjobs functions by inclusive time.

Needs py-spy (``pip install -e '.[bench]'``) and ptrace rights (root, or
``kernel.yama.ptrace_scope=0``). Writes bench/results/profile-*.txt and the raw
py-spy stacks next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


# -- child: one drain ----------------------------------------------------------------


def _op_name(fn: Any, args: tuple[Any, ...]) -> str:
    # The store passes (raw connection, transaction function, ...): name the function.
    inner = next((a for a in args if callable(a) and hasattr(a, "__name__")), None)
    name = getattr(fn, "__name__", "?")
    return f"{name}:{getattr(inner, '__name__', '?')}" if inner is not None else name


async def _child(n: int, variant: str, mode: str, out: Path) -> None:
    import aiosqlite

    from asyncjobs.stores._sqlite_side import InlineWriter
    from bench.peers._common import Recorder
    from bench.peers.asyncjobs_bench import AsyncJobsAdapter

    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=RESULTS))
    adapter = AsyncJobsAdapter(variant, workdir)
    await adapter.setup()
    calls: dict[str, list[float]] = collections.defaultdict(list)
    counting = False
    original = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not counting:
            return await original(self, fn, *args, **kwargs)
        t = time.perf_counter()
        try:
            return await original(self, fn, *args, **kwargs)
        finally:
            calls[_op_name(fn, args)].append(time.perf_counter() - t)

    inline_writes = {name: getattr(InlineWriter, name) for name in ("try_write", "try_transaction")}

    def counted_on_loop(name: str) -> Any:
        def write(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inline_writes[name](self, fn, *args, **kwargs)
            finally:
                if counting:
                    calls[f"loop:{name}:{fn.__name__}"].append(time.perf_counter() - t)

        return write

    spy = None
    try:
        await adapter.enqueue_bulk(n)
        recorder = Recorder(n)
        adapter.hook = recorder.hit
        if mode == "count":
            aiosqlite.Connection._execute = counted  # type: ignore[method-assign]
            for name in inline_writes:
                setattr(InlineWriter, name, counted_on_loop(name))
            counting = True
        else:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            cmd = [py_spy, "record", "--pid", str(os.getpid()), "--rate", "250", "--threads",
                   "--format", "raw", "--output", str(out)]  # fmt: skip
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
            await asyncio.sleep(1.0)  # let py-spy attach
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await adapter.start_workers()
        await recorder.done.wait()
        elapsed = recorder.done_at - t0
        cpu = time.process_time() - cpu0
        counting = False
        await adapter.stop_workers()
    finally:
        aiosqlite.Connection._execute = original  # type: ignore[method-assign]
        for name, write in inline_writes.items():
            setattr(InlineWriter, name, write)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        await adapter.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "n": n,
        "drain_s": elapsed,
        "jobs_per_s": n / elapsed,
        "cpu_s": cpu,
        "calls": {
            k: {"count": len(v), "total_s": sum(v), "mean_us": sum(v) / len(v) * 1e6}
            for k, v in calls.items()
        },
    }
    if mode == "count":
        out.write_text(json.dumps(summary))  # noqa: ASYNC240 - after the measurement
    else:
        print(json.dumps(summary))


# -- parent: run, fold, report -------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(text: str) -> tuple[str, str]:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    return m["func"], m["file"]


def _source(frame_text: str) -> str:
    """The source line of a py-spy frame ("func (pkg/file.py:12)"), if found."""
    m = _FRAME.match(frame_text.strip())
    if not m or not m["line"]:
        return ""
    for base in sys.path:
        path = Path(base) / m["file"]
        if path.is_file():
            return linecache.getline(str(path), int(m["line"])).strip()
    return ""


def _idle(frame_text: str) -> bool:
    """py-spy in a container often cannot tell idle threads: name the waits."""
    func, _ = _frame(frame_text)
    if func in ("EpollSelector.select", "select"):
        return True  # the event loop has nothing to run
    return func == "_connection_worker_thread" and ".get(" in _source(frame_text)


def fold(raw: Path) -> dict[str, Any]:
    """Per-thread sample counts, self time and inclusive time by function."""
    threads: collections.Counter[str] = collections.Counter()
    self_main: collections.Counter[str] = collections.Counter()
    self_other: collections.Counter[str] = collections.Counter()
    incl_main: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        head = frames[0]
        name = head.split(":", 1)[1].strip() if ":" in head else head
        thread = "event loop (MainThread)" if "MainThread" in name else (
            "aiosqlite connection thread" if "_connection_worker_thread" in stack else name
        )  # fmt: skip
        parsed = [_frame(f) for f in frames[1:]]
        if not parsed:
            continue
        if _idle(frames[-1]):
            threads[thread + ", idle (waiting)"] += count
            continue
        threads[thread + ", busy"] += count
        func, file = parsed[-1]
        key = f"{func} ({file})"
        if thread.startswith("event loop"):  # busy samples only from here on
            self_main[key] += count
            groups[_group(file, func)] += count
            seen = set()
            for func, file in parsed:
                k = f"{func} ({file})"
                if file.startswith("asyncjobs/") and k not in seen:
                    seen.add(k)
                    incl_main[k] += count
        else:
            self_other[f"[{thread}] {key}"] += count
    return {
        "threads": threads,
        "self_main": self_main,
        "self_other": self_other,
        "incl_main": incl_main,
        "groups": groups,
    }


def _group(file: str, func: str) -> str:
    if file.startswith("asyncjobs/"):
        return "asyncjobs code (" + file.split("/")[-1] + ")"
    for prefix, label in (
        ("asyncio/", "asyncio event loop machinery"),
        ("selectors", "asyncio event loop machinery"),
        ("anyio/", "anyio (events, cancel scopes, task groups)"),
        ("aiosqlite/", "aiosqlite, event loop side"),
        ("json/", "json encode/decode"),
        ("logging/", "logging"),
        ("uuid", "uuid"),
        ("threading", "threading (locks, queue hand-off)"),
        ("queue", "threading (locks, queue hand-off)"),
        ("contextvars", "contextvars"),
        ("bench/", "benchmark harness (hook)"),
        ("dataclasses", "dataclasses"),
        ("traceback", "traceback"),
        ("socket", "socket"),
    ):
        if prefix in file:
            return label
    return f"other ({file.split('/')[-1] or func})"


def _pct(part: int, whole: int) -> str:
    return f"{part / whole * 100:5.1f}%" if whole else "  n/a"


def report(count: dict[str, Any], spy: dict[str, Any], folded: dict[str, Any]) -> str:
    n = count["n"]
    out = [
        f"asyncjobs drain of {n:,} no-op jobs, concurrency 10 "
        f"({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')})",
        f"pass 1 (round trips counted): {count['jobs_per_s']:,.0f} jobs/s, "
        f"process CPU {count['cpu_s']:.2f}s over {count['drain_s']:.2f}s wall "
        f"({count['cpu_s'] / count['drain_s'] * 100:.0f}% of a core)",
        f"pass 2 (py-spy attached):     {spy['jobs_per_s']:,.0f} jobs/s",
        "",
        "Store calls during the drain: round trips into the aiosqlite thread, and",
        "writes run on the event loop instead (loop:...):",
        f"  {'operation':<42}{'calls':>8}{'per job':>9}{'mean us':>9}{'total s':>9}{'% wall':>8}",
    ]
    total_calls = 0
    total_time = 0.0
    for op, c in sorted(count["calls"].items(), key=lambda kv: -kv[1]["total_s"]):
        total_calls += c["count"]
        total_time += c["total_s"]
        out.append(
            f"  {op:<42}{c['count']:>8,}{c['count'] / n:>9.3f}{c['mean_us']:>9.0f}"
            f"{c['total_s']:>9.2f}{c['total_s'] / count['drain_s'] * 100:>7.0f}%"
        )
    out.append(
        f"  {'all':<42}{total_calls:>8,}{total_calls / n:>9.3f}"
        f"{total_time / max(total_calls, 1) * 1e6:>9.0f}{total_time:>9.2f}"
        f"{total_time / count['drain_s'] * 100:>7.0f}%   (calls overlap: several awaiting at once)"
    )
    jobs_per = {op.split(":")[-1]: n / c["count"] for op, c in count["calls"].items() if c["count"]}
    out.append(
        "  jobs per call: "
        + ", ".join(f"{op} {v:.1f}" for op, v in sorted(jobs_per.items(), key=lambda kv: -kv[1]))
    )
    threads = folded["threads"]
    total = sum(threads.values())
    out += ["", f"py-spy samples by thread (250 Hz, {total:,} samples):"]
    out += [f"  {_pct(v, total)}  {k} ({v})" for k, v in sorted(threads.items())]
    main_total = sum(folded["self_main"].values())
    out += ["", "Event loop thread, busy samples by area (self time):"]
    out += [f"  {_pct(v, main_total)}  {k}" for k, v in folded["groups"].most_common(14)]
    out += ["", "Event loop thread, top functions by self time (share of its busy samples):"]
    out += [f"  {_pct(v, main_total)}  {k}" for k, v in folded["self_main"].most_common(25)]
    out += ["", "Event loop thread, asyncjobs functions by inclusive time (share of busy samples):"]
    out += [f"  {_pct(v, main_total)}  {k}" for k, v in folded["incl_main"].most_common(25)]
    other_total = sum(folded["self_other"].values())
    out += ["", "Other threads, busy samples by function (self time):"]
    out += [f"  {_pct(v, other_total)}  {k}" for k, v in folded["self_other"].most_common(12)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--variant", default="sqlite-normal")
    parser.add_argument("--child", choices=["count", "spy"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.child:
        asyncio.run(_child(args.n, args.variant, args.child, Path(args.out)))
        return
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    count_file = RESULTS / f"profile-{stamp}-count.json"
    raw = RESULTS / f"profile-{stamp}-pyspy.txt"
    base = [sys.executable, str(Path(__file__).resolve()), "--n", str(args.n),
            "--variant", args.variant]  # fmt: skip
    subprocess.run([*base, "--child", "count", "--out", str(count_file)], check=True, cwd=ROOT)
    spy_run = subprocess.run(
        [*base, "--child", "spy", "--out", str(raw)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    spy = json.loads(spy_run.stdout.strip().splitlines()[-1])
    text = report(json.loads(count_file.read_text()), spy, fold(raw))
    print(text)
    (RESULTS / f"profile-{stamp}.txt").write_text(text + "\n")
    print(f"\nwritten: bench/results/profile-{stamp}.txt (raw stacks: {raw.name})")


if __name__ == "__main__":
    main()
