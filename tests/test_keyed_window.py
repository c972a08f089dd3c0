"""A keyed limiter behind a backlog longer than a SQLite claim's window (1,000 jobs).

Past the window a SQLite claim finds the keys one index seek each, ``KEYS_PER_CLAIM`` a
claim, taken in turn by name across claims (``_past_window``); PostgreSQL reads past the
backlog. What each promises: a key with tokens is never starved by keys without any,
a claim's cost does not grow with a backlog held back by a group or a queue, and the
limits (held-back pending keys, task concurrency) hold past the window too.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import counting_steps

from asyncjobs import Jobs, RateLimit, Task
from asyncjobs.stores import open_store
from asyncjobs.stores._admission import Admission
from asyncjobs.stores._claims import ClaimRequest, TaskLimits
from asyncjobs.stores._sqlite_limits import WINDOW, choose
from asyncjobs.testing import FakeClock, drain, replace_store

MakeJobs = Callable[..., Jobs]
BACKLOG = WINDOW + 100


def domain(address: str) -> str:
    return address.split("@")[1]


class Sender(NamedTuple):
    jobs: Jobs
    send: Task[[str], None]  # under a limiter keyed by the address's domain
    ran: list[str]  # the addresses sent, in order


def sender(jobs: Jobs, rate: str, **task: Any) -> Sender:
    jobs.limiter("per_domain", rate, key=domain)
    ran: list[str] = []

    @jobs.task(limiter="per_domain", **task)
    async def send(address: str) -> None:
        ran.append(address)

    return Sender(jobs, send, ran)


# -- which keys past the window a claim finds ------------------------------------------


async def test_a_key_with_tokens_runs_behind_a_backlog_of_keys_without(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock
) -> None:
    """A bulk send to one domain must not hold up another domain's mail: behind more
    ready jobs of empty buckets than a claim's window, the other keys' jobs still run,
    each key's in claim order (priority, then enqueue order)."""
    jobs, send, ran = sender(make_jobs(backend_url), "2/m")

    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    for n in range(3):
        await send.enqueue(f"u{n}@quiet.example")
    await send.options(priority=-1).enqueue("late@other.example")
    await send.enqueue("first@other.example")
    await drain(jobs)
    assert ran == [
        "u0@bulk.example", "u1@bulk.example", "u0@quiet.example", "u1@quiet.example",
        "first@other.example", "late@other.example",
    ]  # fmt: skip
    clock.advance(30)  # one more token per domain
    await drain(jobs)
    assert ran[6:] == ["u2@bulk.example", "u2@quiet.example"]
    assert (await jobs.stats())["totals"]["counts"]["queued"] == BACKLOG - 3


async def test_past_the_window_a_keys_jobs_keep_their_group_and_queue(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """Behind a backlog longer than a claim's window, a key's jobs still run one at a
    time in their group (b only once a has ended), and a worker takes only its own
    queues (never c)."""
    jobs, send, ran = sender(make_jobs(backend_url, queues=["mail"]), "10/m", queue="mail")

    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    grouped = send.options(group="thread-1")
    await grouped.enqueue("a@quiet.example")
    await grouped.enqueue("b@quiet.example")
    await send.options(queue="other").enqueue("c@quiet.example")
    await send.enqueue("d@quiet.example")
    await drain(jobs)
    assert ran[10:] == ["a@quiet.example", "d@quiet.example", "b@quiet.example"]


async def test_a_key_with_tokens_behind_the_window_runs_among_the_first(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """'zz' is first in claim order behind the bulk backlog, before 2,000 keys enqueued
    after it (and before it by name). PostgreSQL runs it right after bulk's two tokens;
    SQLite, which looks at ``KEYS_PER_CLAIM`` keys a claim in turn by name, within a few
    claims, not after every key before it by name."""
    jobs, send, ran = sender(make_jobs(backend_url), "2/m")
    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    await send.enqueue("first@zz.example")
    await jobs.enqueue_many([send.spec(f"later@a{n:04d}.example") for n in range(2 * WINDOW)])
    await drain(jobs)
    position = ran.index("first@zz.example")
    assert position == 2 if backend_url.startswith("postgresql") else position < WINDOW


async def test_a_key_with_tokens_is_not_starved_by_empty_keys_enqueued_after_it(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock
) -> None:
    """The 1,000 keys behind 'zz' (and before it by name) have empty buckets: 'zz', with
    tokens, still runs (the next SQLite claim goes on from the last key looked at)."""
    jobs, send, ran = sender(make_jobs(backend_url), "1/h")
    await jobs.enqueue_many([send.spec(f"warm@a{n:04d}.example") for n in range(WINDOW)])
    await drain(jobs)  # every a-key's bucket is now empty
    assert len(ran) == WINDOW
    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    await send.enqueue("first@zz.example")
    await jobs.enqueue_many([send.spec(f"later@a{n:04d}.example") for n in range(WINDOW)])
    clock.advance(1)
    await drain(jobs)
    assert ran[WINDOW:] == ["u0@bulk.example", "first@zz.example"]


# -- what a claim reads: not a backlog held back by a group or a queue ------------------


def _steps(tmp_path: Path, backlog: int, scenario: str) -> int:
    """SQLite VM steps of one choose() with ``backlog`` jobs held back (not by a key)."""
    import asyncio

    path = tmp_path / f"{scenario}-{backlog}.db"

    async def create() -> None:
        store = open_store(f"sqlite:///{path}")
        await store.open()
        await store.close()

    asyncio.run(create())
    db = sqlite3.connect(path, isolation_level=None)
    rows = []

    def add(key: str, queue: str, status: str = "queued", group: str | None = None) -> None:
        rows.append((uuid.uuid4().hex, "send", queue, status, "{}", 3, 0.0, 0.0, key, group))

    queues: list[str] | None = None
    queue_concurrency: dict[str, int] = {}
    if scenario == "full_queue":  # the task's queue is full: no job of it can start
        queue_concurrency = {"mail": 1}
        add("x", "mail", status="running")
        for n in range(backlog):
            add(f"k{n % 10}", "mail")
    elif scenario == "group":  # one group whose head runs
        add("x", "mail", status="running", group="g")
        for n in range(backlog):
            add(f"k{n % 10}", "mail", group="g")
    else:  # other_queue: a worker of queue 'mine' behind a blocked key; a backlog elsewhere
        queues = ["mine"]
        for _ in range(BACKLOG):
            add("bulk", "mine")
        for n in range(backlog):
            add(f"k{n % 10}", "other")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO asyncjobs_jobs (id, task, queue, status, payload, max_attempts, run_at, "
        "enqueued_at, rate_key, group_key) VALUES (?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    db.execute("INSERT INTO asyncjobs_rate_buckets VALUES ('limiter:per_domain', 'bulk', 0, 1000)")
    db.execute("COMMIT")
    request = ClaimRequest(
        worker="w",
        tasks={"send": TaskLimits(max_attempts=3, limiter="per_domain")},
        queues=queues,
        limit=8,
        lease=60,
        queue_concurrency=queue_concurrency,
        limiters={"per_domain": RateLimit(rate=1, per=3600)},
        keyed=frozenset({"per_domain"}),
    )
    with counting_steps(db) as steps:  # each step: some claims here take fewer than 100
        db.execute("BEGIN IMMEDIATE")
        admission = choose(db, request, 1000.0)
        db.execute("ROLLBACK")
    db.close()
    assert admission.chosen == []
    return steps.count


def test_a_claim_with_the_queue_full_does_not_scan_the_whole_backlog(tmp_path: Path) -> None:
    small, large = _steps(tmp_path, 2_000, "full_queue"), _steps(tmp_path, 20_000, "full_queue")
    assert large < 2 * small, (small, large)


def test_a_claim_behind_a_group_does_not_scan_the_whole_backlog(tmp_path: Path) -> None:
    small, large = _steps(tmp_path, 2_000, "group"), _steps(tmp_path, 20_000, "group")
    assert large < 2 * small, (small, large)


def test_a_claim_does_not_scan_the_backlog_of_queues_it_does_not_serve(tmp_path: Path) -> None:
    small, large = _steps(tmp_path, 2_000, "other_queue"), _steps(tmp_path, 20_000, "other_queue")
    assert large < 2 * small, (small, large)


# -- the limits past the window --------------------------------------------------------


async def test_past_the_window_a_key_pending_job_is_not_overtaken(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    producer, worker = make_jobs(backend_url, workers=False), make_jobs(backend_url)
    worker.limiter("per_domain", "1/m", key=domain)
    ran: list[str] = []

    @worker.task(name="send", limiter="per_domain")
    async def send(address: str) -> None:
        ran.append(address)

    await worker.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    await producer.enqueue("send", "first@quiet.example")  # its key pending
    await send.enqueue("second@quiet.example")
    await drain(worker)
    assert ran == ["u0@bulk.example", "first@quiet.example"]


async def test_past_the_window_task_concurrency_holds(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    jobs = make_jobs(backend_url)
    jobs.limiter("per_domain", "1/m", key=domain)
    started: list[str] = []

    @jobs.task(limiter="per_domain", concurrency=1)
    async def send(address: str) -> None:
        started.append(address)

    await jobs.enqueue_many([send.spec(f"u{n}@bulk.example") for n in range(BACKLOG)])
    await jobs.enqueue_many([send.spec(f"x@k{n}.example") for n in range(5)])
    await drain(jobs)
    assert started == ["u0@bulk.example"] + [f"x@k{n}.example" for n in range(5)]


# -- what an idle claim costs: not a look at every key without tokens -----------------


async def test_an_idle_claim_does_not_look_again_at_keys_it_found_without_tokens(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose ready jobs all wait for tokens of their keys claims again every
    poll interval: each claim read every key's bucket and tried its jobs one by one
    (110 ms a claim with 1,000 keys, 9% of a core while idle). A bucket gains tokens
    only with time, so a key found empty is left out by the claim's query until its
    next token is due; its jobs still run then."""
    jobs, send, ran = sender(make_jobs(backend_url), "1/h")
    keys = 50
    await jobs.enqueue_many([send.spec(f"{n}@k{n}.example") for n in range(keys) for n in (n, n)])
    await drain(jobs)  # each key's first job takes its token; the second finds none
    assert len(ran) == keys

    looked: list[tuple[str, str]] = []
    empty = Admission.empty

    def counting(self: Admission, bucket_id: tuple[str, str], limit: RateLimit) -> bool:
        looked.append(bucket_id)
        return empty(self, bucket_id, limit)

    monkeypatch.setattr(Admission, "empty", counting)
    clock.advance(60)
    await drain(jobs)
    assert len(ran) == keys
    assert len([b for b in looked if b[1]]) < 5  # not one per key

    clock.advance(3600)  # every key's next token is due
    await drain(jobs)
    assert len(ran) == 2 * keys


async def test_keys_found_without_tokens_in_one_store_run_at_once_in_another(
    make_jobs: MakeJobs, tmp_path: Path
) -> None:
    """The keys a worker remembers without tokens are those of its store: the app's own
    ``Jobs`` on a test store (``replace_store``) finds every bucket full there."""
    jobs, send, ran = sender(make_jobs(), "1/h")
    await jobs.enqueue_many([send.spec("a@k.example"), send.spec("b@k.example")])
    await drain(jobs)  # k's token taken, its second job found without one
    assert ran == ["a@k.example"]
    async with replace_store(jobs, "sqlite:///" + str(tmp_path / "test.db")):
        await send.enqueue("c@k.example")
        await drain(jobs)
    assert ran == ["a@k.example", "c@k.example"]
