"""SQLiteStore: WAL and durability settings, migrations, claim indexes, busy handling,
and group commit (including its failure path)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import pytest
from conftest import counting_steps

from asyncjobs import Jobs, StoreError
from asyncjobs._batching import GroupCommit
from asyncjobs.stores import ClaimRequest, SQLiteStore, TaskLimits
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.stores._migrations import migration_scripts
from asyncjobs.stores._outcomes import Outcome, OutcomeKind
from asyncjobs.stores._sqlite_admin import ADMIN_BATCH
from asyncjobs.stores._sqlite_claim import _PICK_READY, DUE_PER_CLAIM
from asyncjobs.stores._sqlite_finish import _finish
from asyncjobs.stores._sqlite_hot_path import INLINE_BYTES, INLINE_ROWS
from asyncjobs.stores._sqlite_schema import SCHEMA_VERSION_TABLE, migrate
from asyncjobs.stores._sqlite_side import CHECKPOINT_EVERY, InlineWriter
from asyncjobs.stores._sqlite_sql import insert_jobs
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]


def new_job(job_id: str, **overrides: object) -> NewJob:
    fields: dict[str, object] = {
        "id": job_id, "task": "t", "queue": "default", "payload": '{"args":[],"kwargs":{}}',
        "status": "queued", "priority": 0, "run_at": 0.0, "max_attempts": 1,
    }  # fmt: skip
    fields.update(overrides)
    return NewJob(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "store.db")


async def test_opening_sets_wal_and_normal_sync(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", busy_timeout=2.5)
    await store.open()
    try:
        assert await store._call(lambda db: db.execute("PRAGMA journal_mode").fetchone()) == (
            "wal",
        )
        assert await store._call(lambda db: db.execute("PRAGMA synchronous").fetchone()) == (1,)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent
    db.close()


async def test_synchronous_full_on_request(make_jobs: MakeJobs) -> None:
    jobs = make_jobs(synchronous="full")
    await jobs.store.open()
    store = jobs.store
    assert isinstance(store, SQLiteStore)
    assert await store._call(lambda db: db.execute("PRAGMA synchronous").fetchone()) == (2,)


async def test_migrations_are_recorded_and_run_once(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    with sqlite3.connect(path) as db:
        versions = [v for (v,) in db.execute(f"SELECT version FROM {SCHEMA_VERSION_TABLE}")]
    db.close()
    assert versions == [v for v, _ in migration_scripts("sqlite")]
    assert versions[0] == 1


def query_plan(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> str:
    return " ".join(str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))


async def test_the_claim_query_walks_the_ready_index_without_sorting(tmp_path: Path) -> None:
    """Claims read queued rows in claim order: backlog and finished rows cost nothing."""
    store = SQLiteStore(tmp_path / "i.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "i.db") as db:
        pick = _PICK_READY.format(queue_filter="")
        plan = query_plan(db, pick, ('["t"]', 10))
        recover_plan = query_plan(
            db, "SELECT id FROM asyncjobs_jobs WHERE status = 'running' AND lease_until < ?", (5,)
        )
    db.close()
    assert "USING INDEX asyncjobs_jobs_ready" in plan
    assert "TEMP B-TREE" not in plan
    assert "USING INDEX" in recover_plan  # only running rows, never a table scan


def steps_to_finish_a_batch_member(path: Path, members: int) -> int:
    """SQLite VM steps of the finish of one member of a batch of ``members``, the others
    unfinished: the work a finish does, counted rather than timed."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        migrate(db)
        insert_jobs(db, [new_job("cb", status="waiting")], 0.0)
        insert_jobs(
            db,
            [new_job(f"m{i}", batch_id="cb", status="running", worker="w") for i in range(members)],
            0.0,
        )
        done = Outcome(job_id="m0", worker="w", attempt=1, kind=OutcomeKind.DEAD, error="e")
        with counting_steps(db) as steps:
            assert _finish(db, [done], 1.0) == ["m0"]
        db.execute("COMMIT")
        return steps.count
    finally:
        db.close()


def test_a_batch_members_finish_costs_the_same_in_a_small_and_a_big_batch(
    tmp_path: Path,
) -> None:
    small = steps_to_finish_a_batch_member(tmp_path / "small.db", 100)
    big = steps_to_finish_a_batch_member(tmp_path / "big.db", 5_000)
    assert big < 2 * small, (small, big)  # counting the other members made it 50 times


async def test_a_claim_queues_a_bounded_number_of_due_jobs_oldest_first(
    tmp_path: Path,
) -> None:
    """A claim runs on the event loop: jobs due by the hundred thousand must not all be
    made ready in one statement. The claims that follow take the rest."""
    store = SQLiteStore(tmp_path / "due.db")
    await store.open()
    try:
        due = 2 * DUE_PER_CLAIM + 100
        await store.insert(
            [new_job(f"d{i:05d}", status="scheduled", run_at=float(due - i)) for i in range(due)],
            now=0.0,
        )
        request = ClaimRequest(
            worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=10, lease=30
        )
        first = await store.claim(request, now=float(due + 1))
        assert len(first) == 10
        assert all(r.run_at <= DUE_PER_CLAIM for r in first)  # of those due first

        def stored(db: sqlite3.Connection) -> dict[str, int]:
            return dict(db.execute("SELECT status, count(*) FROM asyncjobs_jobs GROUP BY status"))

        queued = DUE_PER_CLAIM - len(first)
        left = due - DUE_PER_CLAIM
        assert await store._call(stored) == {"running": 10, "queued": queued, "scheduled": left}
        claimed = len(first)
        while claimed < due:
            rows = await store.claim(request, now=float(due + 1))
            assert rows
            claimed += len(rows)
        assert await store._call(stored) == {"running": due}
    finally:
        await store.close()


async def test_drain_runs_a_due_job_behind_more_than_a_claim_makes_ready(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The jobs due first are another process's (a task this one lacks): the claim that
    makes them ready takes none of them, and drain() must not stop there."""
    jobs, other = make_jobs(workers=False), make_jobs(workers=False)
    ran: list[int] = []

    @jobs.task(name="mine")
    async def mine() -> None:
        ran.append(1)

    @other.task(name="theirs")
    async def theirs() -> None: ...

    await other.enqueue_many([theirs.options(delay=10).spec() for _ in range(DUE_PER_CLAIM)])
    job = await mine.options(delay=11).enqueue()
    clock.advance(60)
    await drain(jobs)
    assert ran == [1]
    assert (await job.info()).status == "succeeded"


async def test_claims_take_priority_then_fifo_among_many_rows(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "big.db")
    await store.open()
    try:
        await store.insert([new_job(f"done{i}") for i in range(20_000)], now=0.0)
        # Finished (a store inserts no finished job: Store.insert refuses the status).
        with contextlib.closing(sqlite3.connect(tmp_path / "big.db")) as db, db:
            db.execute(
                "UPDATE asyncjobs_jobs SET status = 'succeeded', finished_at = 0.0 "
                "WHERE id LIKE 'done%'"
            )
        await store.insert([new_job("ready", priority=1)], now=0.0)
        await store.insert([new_job(f"later{i}") for i in range(5_000)], now=0.0)

        rows = await store.claim(
            ClaimRequest(worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None,
                         limit=10, lease=30),
            now=1.0,
        )  # fmt: skip
        assert [r.id for r in rows][:2] == ["ready", "later0"]  # priority, then FIFO
        assert len(rows) == 10
    finally:
        await store.close()


async def test_a_write_waits_out_another_connections_lock(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: blocker.execute("COMMIT"))
    try:
        release.start()
        with anyio.fail_after(5):
            ids = await store.insert([new_job("a")], now=0.0)  # waits ~0.3 s, then commits
        assert ids == ["a"]
    finally:
        release.join()
        blocker.close()
        await store.close()


async def test_a_write_gives_up_after_five_busy_timeouts(tmp_path: Path) -> None:
    """Waited out in short waits (a deadline set meanwhile must end the wait soon), but
    five busy timeouts in all: 1 s here, not 0.25 s nor 5 s."""
    path = tmp_path / "busy.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = anyio.current_time()
        with anyio.fail_after(5), pytest.raises(StoreError, match="locked"):
            await store.insert([new_job("a")], now=0.0)
        assert anyio.current_time() - started >= 0.9
    finally:
        blocker.close()
        await store.close()


async def test_reads_go_on_with_the_open_file_after_it_is_deleted(tmp_path: Path) -> None:
    """Deleted under an open store (a reset by hand, a test cleaning up), the file
    lives on for the connections that have it open, readers included: reads and
    writes still agree (the reader opened the WAL by name at its first read, after it
    was gone, and every read failed while writes went on)."""
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        for name in ("s.db", "s.db-wal", "s.db-shm"):
            os.remove(tmp_path / name)
        await store.insert([new_job("a")], now=0.0)
        row = await store.get("a")
        assert row is not None
        assert row.id == "a"
    finally:
        await store.close()


async def test_checkpoints_after_the_file_is_deleted_do_not_create_it_again(
    tmp_path: Path,
) -> None:
    """Deleted under an open store, the file stays gone while the store writes on in
    the open one: the checkpointer opened its connection at its first checkpoint, by
    name, created an empty database at the path (which a new process or the CLI then
    took for the store) and checkpointed that one instead of the store's log."""
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        for name in ("s.db", "s.db-wal", "s.db-shm"):
            os.remove(tmp_path / name)
        for i in range(CHECKPOINT_EVERY):  # enough commits for a checkpoint
            await store.insert([new_job(f"job-{i:05d}")], now=0.0)
        checkpointer = store._checkpointer
        assert checkpointer is not None
        await checkpointer.idle()
        assert checkpointer.checkpoints >= 1
        assert os.listdir(tmp_path) == []
        assert len(await store.list(limit=1000, now=0.0)) == CHECKPOINT_EVERY
    finally:
        await store.close()


def count_thread_calls(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record each function the store runs in a connection thread: the writing
    connection's (``_call``) or the reading one's (``_read_call``)."""
    thread_calls: list[object] = []

    def counting(call: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
        async def counting_call(fn: Callable[..., object], *args: object, **kw: object) -> object:
            thread_calls.append(fn)
            return await call(fn, *args, **kw)

        return counting_call

    monkeypatch.setattr(store, "_call", counting(store._call))
    monkeypatch.setattr(store, "_read_call", counting(store._read_call))
    return thread_calls


def hold_write_lock(path: Path, seconds: float) -> tuple[sqlite3.Connection, threading.Timer]:
    """Another connection takes the write lock now and commits after ``seconds``."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(seconds, lambda: blocker.execute("COMMIT"))
    release.start()
    return blocker, release


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_a_short_insert_skips_the_connection_thread_only_while_the_file_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """With synchronous=NORMAL an insert of up to INLINE_ROWS jobs runs on the event loop
    (InlineWriter); a larger batch, a locked file, or synchronous=FULL (an fsync per
    commit) go through the store's connection thread."""
    path = tmp_path / "inline.db"
    store = SQLiteStore(path, synchronous=synchronous, busy_timeout=2.0)
    await store.open()
    thread_calls = count_thread_calls(store, monkeypatch)
    inline = synchronous == "normal"
    try:
        assert await store.insert([new_job("a")], now=0.0) == ["a"]
        assert await store.insert([new_job("b"), new_job("c")], now=0.0) == ["b", "c"]
        assert len(thread_calls) == (0 if inline else 2)
        large = [new_job(f"x{i}") for i in range(INLINE_ROWS + 1)]
        assert len(await store.insert(large, now=0.0)) == INLINE_ROWS + 1
        assert len(thread_calls) == (1 if inline else 3)

        blocker, release = hold_write_lock(path, 0.2)  # another connection writes
        try:
            with anyio.fail_after(5):
                assert await store.insert([new_job("d")], now=0.0) == ["d"]  # waited, wrote
        finally:
            release.join()
            blocker.close()
        assert len(thread_calls) == (2 if inline else 4)
        for job_id in "abcd":
            assert await store.get(job_id) is not None
    finally:
        await store.close()


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_a_runners_finish_and_claim_skips_the_thread_only_while_the_file_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """Claims and outcomes of at most INLINE_ROWS jobs are written on the event loop with
    synchronous=NORMAL; with the file locked they wait in the thread, and land the same."""
    path = tmp_path / "claims.db"
    store = SQLiteStore(path, synchronous=synchronous, busy_timeout=2.0)
    await store.open()
    limits = {"t": TaskLimits(max_attempts=1)}

    def request(limit: int) -> ClaimRequest:
        return ClaimRequest(worker="w", tasks=limits, queues=None, limit=limit, lease=30)

    def succeeded(job_id: str) -> Outcome:
        return Outcome(job_id, "w", 1, OutcomeKind.SUCCEEDED, result="1")

    try:
        await store.insert([new_job(f"j{i}") for i in range(4)], now=0.0)
        thread_calls = count_thread_calls(store, monkeypatch)
        inline = synchronous == "normal"
        claimed = await store.claim(request(2), now=1.0)
        assert [r.id for r in claimed] == ["j0", "j1"]
        applied, claimed = await store.finish_and_claim([succeeded("j0")], request(1), now=2.0)
        assert (applied, [r.id for r in claimed]) == (["j0"], ["j2"])
        assert await store.finish([succeeded("j1")], now=3.0) == ["j1"]
        assert len(thread_calls) == (0 if inline else 3)

        blocker, release = hold_write_lock(path, 0.2)
        try:
            with anyio.fail_after(5):
                applied, claimed = await store.finish_and_claim(
                    [succeeded("j2")], request(5), now=4.0
                )
        finally:
            release.join()
            blocker.close()
        assert (applied, [r.id for r in claimed]) == (["j2"], ["j3"])
        assert len(thread_calls) == (1 if inline else 4)
        # More rows than INLINE_ROWS: the thread, free file or not.
        assert await store.claim(request(INLINE_ROWS + 1), now=5.0) == []
        assert len(thread_calls) == (2 if inline else 5)
        statuses = {job_id: (await store.get(job_id)) for job_id in ("j0", "j1", "j2", "j3")}
        assert {k: r.status for k, r in statuses.items() if r is not None} == {
            "j0": "succeeded", "j1": "succeeded", "j2": "succeeded", "j3": "running",
        }  # fmt: skip
    finally:
        await store.close()


async def test_outcomes_carrying_large_results_are_written_in_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish counts its rows, not its bytes: the write of a job's 42 MB result ran on
    the event loop, which it held for about 0.7 s (the connection's thread releases the
    GIL while SQLite writes). Past INLINE_BYTES of results and errors it goes there."""
    store = SQLiteStore(tmp_path / "big.db")
    await store.open()
    limits = {"t": TaskLimits(max_attempts=1)}

    def request(limit: int) -> ClaimRequest:
        return ClaimRequest(worker="w", tasks=limits, queues=None, limit=limit, lease=30)

    def succeeded(job_id: str, result: str) -> Outcome:
        return Outcome(job_id, "w", 1, OutcomeKind.SUCCEEDED, result=result)

    large = '"' + "x" * INLINE_BYTES + '"'
    try:
        await store.insert([new_job(f"j{i}") for i in range(4)], now=0.0)
        await store.claim(request(3), now=1.0)
        thread_calls = count_thread_calls(store, monkeypatch)
        assert await store.finish([succeeded("j0", '"small"')], now=2.0) == ["j0"]
        assert thread_calls == []  # on the loop, as before
        assert await store.finish([succeeded("j1", large)], now=2.0) == ["j1"]
        assert len(thread_calls) == 1
        applied, claimed = await store.finish_and_claim([succeeded("j2", large)], request(1), now=3)
        assert (applied, [row.id for row in claimed]) == (["j2"], ["j3"])
        assert len(thread_calls) == 2
        row = await store.get("j1")
        assert row is not None
        assert row.result == large
    finally:
        await store.close()


async def test_a_short_write_refused_by_another_writer_tries_again_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds the write lock through two tries: the insert and the
    finish-and-claim wait it out in short pauses on the loop, and never go through the
    connection thread (whose SQLite busy handler sleeps a millisecond or more a try)."""
    path = tmp_path / "pauses.db"
    store = SQLiteStore(path)
    await store.open()
    thread_calls = count_thread_calls(store, monkeypatch)
    blocker = sqlite3.connect(path, isolation_level=None)
    tries: list[bool] = []  # True: written

    def releasing_after_two_refusals(write: Callable[..., object]) -> Callable[..., object]:
        def attempt(*args: object, **kwargs: object) -> object:
            result = write(*args, **kwargs)
            tries.append(result is not None)
            if tries.count(False) == 2 and blocker.in_transaction:
                blocker.execute("COMMIT")  # the other writer is done
            return result

        return attempt

    assert store._inline is not None
    for name in ("try_write", "try_transaction"):
        monkeypatch.setattr(
            store._inline, name, releasing_after_two_refusals(getattr(store._inline, name))
        )
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1, lease=30
    )
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert await store.insert([new_job("a")], now=0.0) == ["a"]
        assert tries == [False, False, True]

        tries.clear()
        blocker.execute("BEGIN IMMEDIATE")
        assert [row.id for row in await store.claim(request, now=1.0)] == ["a"]
        assert tries == [False, False, True]
        assert thread_calls == []
    finally:
        blocker.close()
        await store.close()


async def test_a_refused_short_write_tries_again_at_the_next_turn_of_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's claims hold the lock about a millisecond each, back to back:
    after a timed pause the enqueue found it taken again. The first tries again come
    at the next turns of the loop, before any timed pause."""
    path = tmp_path / "spin.db"
    store = SQLiteStore(path)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    waits: list[float] = []
    real_sleep = asyncio.sleep  # noqa: TID251 - wrapped to record the store's waits

    async def recording_sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 2 and blocker.in_transaction:
            blocker.execute("COMMIT")  # the other writer is done
        await real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert await store.insert([new_job("a")], now=0.0) == ["a"]
        assert len(waits) == 2
        assert waits[0] == 0  # the next turn of the loop, not a timed pause
    finally:
        monkeypatch.undo()
        blocker.close()
        await store.close()


async def test_reads_do_not_wait_behind_a_write_that_waits_for_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write waits in the connection thread while another connection holds the lock
    (a caller's ``jobs.transaction`` until it commits); every pure read goes through a
    connection of its own meanwhile, as WAL lets a reader run beside a writer."""
    path = tmp_path / "reads.db"
    store = SQLiteStore(path, busy_timeout=5.0)
    await store.open()
    await store.insert([new_job("a", batch_id="b")], now=0.0)
    writing = anyio.Event()
    call = store._call

    async def spy(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        writing.set()  # then queued in the thread before this task yields
        return await call(fn, *args, **kwargs)

    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async with anyio.create_task_group() as tg:
            monkeypatch.setattr(store, "_call", spy)
            tg.start_soon(lambda: store.retry("a", now=1.0))  # waits on the blocker
            with anyio.fail_after(2):
                await writing.wait()
            assert store._watch is not None
            monkeypatch.setattr(store._watch, "try_read", lambda fn: None)  # as when busy
            with anyio.fail_after(2):  # the write waits up to five busy timeouts
                assert (row := await store.get("a")) is not None
                assert row.status == "queued"
                assert [r.id for r in await store.list(now=1.0)] == ["a"]
                assert await store.counts(now=1.0) == {("default", "t", "queued"): 1}
                assert await store.batch_counts("b") == {"queued": 1}
                snapshot = await store.snapshot(
                    now=1.0, windows=[60.0], sample=10, workers_since=0.0
                )
                assert snapshot.counts == {("default", "t", "queued"): 1}
                assert await store.next_run_at() is None
            blocker.execute("COMMIT")  # the write goes on
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()


async def test_a_read_sees_every_write_committed_before_it(tmp_path: Path) -> None:
    """Reads go through a connection of their own; each is a read transaction begun
    after the call, so it sees the writes before it, on the loop or in the thread."""
    store = SQLiteStore(tmp_path / "ryw.db")
    await store.open()
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=1, lease=30
    )
    try:
        for i in range(20):
            await store.insert([new_job(f"j{i}")], now=0.0)  # on the loop
            assert (row := await store.get(f"j{i}")) is not None
            assert row.status == "queued"
            assert [r.id for r in await store.claim(request, now=1.0)] == [f"j{i}"]
            assert (row := await store.get(f"j{i}")) is not None
            assert row.status == "running"
            await store.set_progress(f"j{i}", 0.5, "half")  # in the thread
            assert (row := await store.get(f"j{i}")) is not None
            assert (row.progress, row.progress_message) == (0.5, "half")
            assert await store.counts(now=2.0) == {
                **({("default", "t", "succeeded"): i} if i else {}),
                ("default", "t", "running"): 1,
            }
            done = Outcome(f"j{i}", "w", 1, OutcomeKind.SUCCEEDED, result="1")
            assert await store.finish([done], now=3.0) == [f"j{i}"]
            assert [r.status for r in await store.list(now=3.0, limit=1)] == ["succeeded"]
    finally:
        await store.close()


async def test_the_reading_connection_refuses_writes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ro.db")
    await store.open()
    try:
        with pytest.raises(StoreError, match="readonly"):
            await store._read_call(lambda db: db.execute("DELETE FROM asyncjobs_jobs"))
    finally:
        await store.close()


async def test_the_next_scheduled_time_is_read_on_the_loop_and_through_the_thread_if_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "next.db")
    await store.open()
    try:
        assert await store.next_run_at() is None
        await store.insert(
            [new_job("a", status="scheduled", run_at=50.0), new_job("b", run_at=10.0),
             new_job("c", status="scheduled", run_at=30.0)],
            now=0.0,
        )  # fmt: skip
        thread_calls = count_thread_calls(store, monkeypatch)
        assert await store.next_run_at() == 30.0  # the earliest scheduled, not queued
        assert thread_calls == []
        assert store._watch is not None
        monkeypatch.setattr(store._watch, "try_read", lambda fn: None)  # as when busy
        assert await store.next_run_at() == 30.0
        assert len(thread_calls) == 1
    finally:
        await store.close()


def test_an_inline_transaction_refused_or_failed_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tx.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER UNIQUE)")
    writer = InlineWriter(path)

    def add(db: sqlite3.Connection, *values: int) -> int:
        for value in values:
            db.execute("INSERT INTO t VALUES (?)", (value,))
        return len(values)

    def stored() -> list[int]:
        with sqlite3.connect(path) as db:
            return [x for (x,) in db.execute("SELECT x FROM t ORDER BY x")]

    try:
        assert writer.try_transaction(add, 1, 2) == 2
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        assert writer.try_transaction(add, 3) is None  # refused at once, not waited
        blocker.execute("COMMIT")
        blocker.close()
        with pytest.raises(sqlite3.IntegrityError):
            writer.try_transaction(add, 4, 1)  # 4 went in, then 1 failed: rolled back
        assert stored() == [1, 2]
        assert writer.try_transaction(add, 5) == 1  # usable again
        assert stored() == [1, 2, 5]
    finally:
        writer.close()


async def test_a_lone_insert_on_the_loop_reports_driver_errors_as_store_errors(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "dup.db")
    await store.open()
    try:
        await store.insert([new_job("a")], now=0.0)
        with pytest.raises(StoreError, match="UNIQUE") as caught:
            await store.insert([new_job("a")], now=0.0)
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        assert await store.insert([new_job("b")], now=0.0) == ["b"]  # usable again
    finally:
        await store.close()


async def test_a_lock_held_past_every_retry_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "stuck.db"
    store = SQLiteStore(path, busy_timeout=0.02)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked") as caught:
            await store.insert([new_job("a")], now=0.0)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        assert await store.insert([new_job("a")], now=0.0) == ["a"]  # usable again
    finally:
        await store.close()


# -- group commit --------------------------------------------------------------------


async def test_group_commit_failure_raises_in_every_waiter_and_the_next_flush_works() -> None:
    gate = anyio.Event()
    flushes: list[list[str]] = []

    async def flush(items: list[str]) -> Sequence[str]:
        flushes.append(list(items))
        if len(flushes) == 1:
            await gate.wait()
        if "bad" in items:
            raise RuntimeError("disk on fire")
        return [item.upper() for item in items]

    group: GroupCommit[str, str] = GroupCommit(flush)
    outcomes: dict[str, str] = {}

    async def submit(item: str) -> None:
        try:
            outcomes[item] = await group.submit(item)
        except RuntimeError as error:
            outcomes[item] = f"error: {error}"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "a")  # leads the first flush, held at the gate
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            for item in ["b", "bad", "c"]:
                tg.start_soon(submit, item)  # queue up behind it: one shared flush
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
            gate.set()
    assert flushes == [["a"], ["b", "bad", "c"]]
    assert outcomes == {
        "a": "A", "b": "error: disk on fire", "bad": "error: disk on fire",
        "c": "error: disk on fire",
    }  # fmt: skip
    assert group.idle
    assert await group.submit_many(["d", "e"]) == ["D", "E"]
    assert flushes[-1] == ["d", "e"]


async def test_a_failed_enqueue_flush_raises_and_writes_nothing_then_enqueue_works(
    jobs: Jobs, clock: FakeClock
) -> None:
    @jobs.task
    async def t(i: int) -> int:
        return i

    original = jobs.store.insert
    calls = 0

    async def failing_once(new: Sequence[NewJob], *, now: float) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("SQLite store: disk I/O error")
        return await original(new, now=now)

    jobs.store.insert = failing_once  # type: ignore[method-assign, assignment]
    with pytest.raises(StoreError, match="disk I/O"):
        await t.enqueue(1)
    job = await t.enqueue(2)
    await drain(jobs)
    assert await job.result(timeout=1) == 2
    assert [info.args for info in await jobs.list()] == [[2]]


def held_before_wal(path: Path, lock: str) -> sqlite3.Connection:
    """A connection holding a new file, not yet in WAL mode (another process's, or an
    sqlite3 shell's): a read lock, or a write lock ("BEGIN IMMEDIATE"), until it ends."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")  # in the default journal mode (DELETE)
    holder.execute(lock)
    holder.execute("SELECT * FROM t").fetchall()
    return holder


@pytest.mark.parametrize("lock", ["BEGIN IMMEDIATE", "BEGIN"])
async def test_a_new_file_another_connection_holds_fails_to_open_saying_so(
    tmp_path: Path, lock: str
) -> None:
    """Switching a file to WAL mode needs it to itself. Against another connection's
    lock the open made 30 tries whatever the busy timeout (4.4 s against a write lock,
    10 s against a read lock with busy_timeout=0.2), then failed with a bare "database
    is locked". It waits as a write does (five busy timeouts), then says what it did."""
    path = tmp_path / "held.db"
    holder = held_before_wal(path, lock)
    store = SQLiteStore(path, busy_timeout=0.02)
    try:
        with (
            anyio.fail_after(4),
            pytest.raises(
                StoreError,
                match=r"could not switch .*held\.db to WAL mode: another connection held the "
                r"file .*database is locked",
            ) as caught,
        ):
            await store.open()
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        assert await store.insert([new_job("a")], now=0.0) == ["a"]  # opens once let go
    finally:
        await store.close()


async def test_switching_a_new_file_to_wal_gives_up_at_the_deadline(tmp_path: Path) -> None:
    """Five busy timeouts of a minute, but a deadline (``set_deadline``, at shutdown)
    already past: the open tries once, as a write does."""
    path = tmp_path / "held.db"
    holder = held_before_wal(path, "BEGIN IMMEDIATE")
    store = SQLiteStore(path, busy_timeout=60.0)
    store.set_deadline(0.0)
    try:
        with anyio.fail_after(4), pytest.raises(StoreError, match="to WAL mode: another"):
            await store.open()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await store.close()


async def test_many_connections_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Switching a new file to WAL races between openers; none may fail with "locked"."""
    for round_ in range(30):
        path = tmp_path / f"race-{round_}.db"
        stores = [SQLiteStore(path) for _ in range(16)]
        try:
            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(store.open)
        finally:
            for store in stores:
                await store.close()


async def test_idle_polls_cost_the_same_with_many_jobs_scheduled_for_later(
    tmp_path: Path,
) -> None:
    """``next_run_at`` and a claim that finds nothing due read the due rows only: the
    SQLite VM steps they take do not grow with the number of scheduled jobs."""
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=10, lease=60
    )

    async def steps_of_idle_polls(scheduled: int) -> int:
        store = SQLiteStore(tmp_path / f"sched-{scheduled}.db")
        await store.open()
        try:
            jobs = [
                new_job(f"s{i}", status="scheduled", run_at=3600.0 + i) for i in range(scheduled)
            ]
            await store.insert(jobs, now=0.0)
            steps = 0

            def count() -> int:
                nonlocal steps
                steps += 1
                return 0

            # Each connection that may run them: the threads' two, and the loop's two.
            assert store._inline is not None
            assert store._watch is not None
            loop_side = [store._inline._db, store._watch._db]
            await store._call(lambda db: db.set_progress_handler(count, 1))
            await store._read_call(lambda db: db.set_progress_handler(count, 1))
            for db in loop_side:
                db.set_progress_handler(count, 1)
            assert await store.next_run_at() == 3600.0
            assert await store.claim(request, now=10.0) == []
            await store._call(lambda db: db.set_progress_handler(None, 1))
            await store._read_call(lambda db: db.set_progress_handler(None, 1))
            for db in loop_side:
                db.set_progress_handler(None, 1)
            assert steps > 0
            return steps
        finally:
            await store.close()

    few, many = await steps_of_idle_polls(10), await steps_of_idle_polls(5000)
    assert many < few * 2


async def test_first_uses_at_once_open_the_store_once(tmp_path: Path) -> None:
    """An enqueue-only app without a lifespan opens the store on first use, and two
    requests can make that first use together."""
    store = SQLiteStore(tmp_path / "jobs.db")
    setups: list[sqlite3.Connection] = []
    setup = store._setup

    def counted(db: sqlite3.Connection) -> None:
        setups.append(db)
        setup(db)

    store._setup = counted  # type: ignore[method-assign]
    try:
        got = await asyncio.gather(
            store.get("a" * 32), store.changed(), store.counts(now=0.0), store.get("b" * 32)
        )
    finally:
        await store.close()
    assert got[0] is None
    assert len(setups) == 1


def is_open(store: SQLiteStore) -> bool:
    return store._db is not None


async def test_a_close_while_the_first_use_opens_the_store_lets_that_use_finish(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    first = asyncio.create_task(store.insert([new_job("a" * 32)], now=0.0))
    try:
        with anyio.fail_after(10):
            while not is_open(store):  # connected; the schema is being set up
                await anyio.lowlevel.checkpoint()
            await store.close()
            assert await first == ["a" * 32]
            await store.close()
            assert not is_open(store)
            assert await store.get("a" * 32) is not None  # a later use opens it again
    finally:
        first.cancel()
        if store._db is not None:  # without the fix: the stuck open's connection
            await store._db.close()
        await store.close()


async def test_jobs_close_lets_an_enqueue_in_flight_finish_and_leaves_the_store_closed(
    make_jobs: MakeJobs,
) -> None:
    jobs = make_jobs(workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    enqueuing = asyncio.create_task(jobs.enqueue(t))
    await anyio.lowlevel.checkpoint()  # its flush is opening the store
    try:
        with anyio.fail_after(10):
            await jobs.close()
            job = await enqueuing
            await anyio.lowlevel.checkpoint()
            assert jobs.store._db is None  # type: ignore[attr-defined]
    finally:
        enqueuing.cancel()
        await jobs.close()
    assert await jobs.get(job.id) is not None


def test_a_store_used_from_several_event_loops_closes_cleanly(tmp_path: Path) -> None:
    """A script or sync app may call asyncio.run per enqueue; the WAL checkpoint that
    an earlier loop started (and cancelled on closing) must not break close()."""
    store = SQLiteStore(tmp_path / "jobs.db")
    for index in range(CHECKPOINT_EVERY + 1):
        asyncio.run(store.insert([new_job(f"{index:032d}")], now=0.0))
    asyncio.run(store.close())
    assert store._db is None
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone() == (
            CHECKPOINT_EVERY + 1,
        )


# Python 3.12 warns of any fork while other threads run (the parent's connections').
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_store_opened_before_a_fork_opens_anew_in_the_child(tmp_path: Path) -> None:
    """A script that enqueued, then forks (a multiprocessing pool), or a prefork server
    whose app used the store on import: the child inherited the open store, whose
    connection threads did not come along. Its first read waited for ever, and its
    writes on the loop went through the parent's SQLite connections, which SQLite
    forbids after a fork."""
    store = SQLiteStore(tmp_path / "jobs.db")
    asyncio.run(store.insert([new_job("parent-1")], now=0.0))

    async def in_child() -> None:
        with anyio.fail_after(10):
            await store.insert([new_job("child-1")], now=0.0)  # a short write, on the loop
            assert await store.get("parent-1") is not None  # a read, in the thread
            more = [new_job(f"child-{i}") for i in range(2, INLINE_ROWS + 3)]
            await store.insert(more, now=0.0)  # more than the loop writes: in the thread
            await store.close()

    pid = os.fork()
    if pid == 0:  # the child: its own connections; report by its exit code
        code = 1
        try:
            asyncio.run(in_child())
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0

    async def in_parent() -> int:  # the parent's connections still work
        try:
            await store.insert([new_job("parent-2")], now=0.0)
            return len(await store.list(limit=1000, now=0.0))
        finally:
            await store.close()

    assert asyncio.run(in_parent()) == INLINE_ROWS + 4


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_from_an_open_store_keeps_its_jobs_when_the_parent_closes(
    tmp_path: Path,
) -> None:
    """SQLite's locks are per process, and it counts a process's own in memory, which a
    fork copies: a child's new connections on a file its inherited ones held counted
    those and took no lock of their own. The parent, closing its store while the child
    wrote, found itself the last on the file and deleted the log, with the child's
    later jobs in it. The child closes what it inherited instead, so its locks are real."""
    path = tmp_path / "jobs.db"
    store = SQLiteStore(path)
    asyncio.run(store.insert([new_job("parent")], now=0.0))
    from_child, child_wrote = os.pipe()  # the child has written
    parent_closed, to_child = os.pipe()  # the parent has closed its store

    async def in_child() -> None:
        with anyio.fail_after(10):
            await store.insert([new_job("child-0")], now=0.0)
            os.write(child_wrote, b"1")
            await anyio.to_thread.run_sync(os.read, parent_closed, 1)
            for i in range(1, 11):
                await store.insert([new_job(f"child-{i}")], now=0.0)
            await store.close()

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            asyncio.run(in_child())
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(from_child, 1) == b"1"
        asyncio.run(store.close())
    finally:
        os.write(to_child, b"1")
    assert os.waitpid(pid, 0)[1] == 0
    for fd in (from_child, child_wrote, parent_closed, to_child):
        os.close(fd)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone() == (12,)
    db.close()


async def test_a_relative_path_is_a_file_name_even_when_it_looks_like_a_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("file:jobs.db?cache=shared")
    try:
        await store.insert([new_job("a" * 32)], now=0.0)
        monkeypatch.chdir(tmp_path.parent)  # later connections: still the same file
        assert await store.get("a" * 32) is not None
    finally:
        await store.close()
    assert store.path == tmp_path / "file:jobs.db?cache=shared"
    assert (tmp_path / "file:jobs.db?cache=shared").exists()
    assert not (tmp_path / "jobs.db").exists()


async def test_purge_and_retry_dead_of_many_rows_go_in_short_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction over every row would hold the file's write lock for seconds with
    a million rows: other processes' enqueues would fail, this one's heartbeats wait."""
    store = SQLiteStore(tmp_path / "jobs.db")
    many = 2 * ADMIN_BATCH + 7
    await store.open()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        insert_jobs(db, [new_job(f"{n:032d}") for n in range(many + 1)], 0.0)
        db.execute("UPDATE asyncjobs_jobs SET status = 'dead', finished_at = 1.0 WHERE seq > 1")
    transactions: list[str] = []
    transaction = store._transaction

    async def counted(fn: Callable[..., object], *args: object) -> object:
        transactions.append(fn.__name__)
        return await transaction(fn, *args)

    monkeypatch.setattr(store, "_transaction", counted)
    try:
        assert await store.retry_dead(queue=None, task=None, now=2.0) == many
        assert transactions == ["_requeue_dead_batch"] * 3
        assert (await store.counts(now=2.0))[("default", "t", "queued")] == many + 1
        transactions.clear()
        assert await store.purge(status="queued", now=2.0) == many + 1
        assert transactions == ["_delete_batch"] * 3
        assert await store.counts(now=2.0) == {}
    finally:
        await store.close()


async def test_a_purge_takes_the_cancelled_run_after_a_member_an_earlier_step_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge goes newest first, ``ADMIN_BATCH`` rows a step: a step that passes over
    (keeps) a dead member's cancelled followers, the dead one left to a later step, does
    not lose them: the step that deletes the dead one takes them by id."""
    monkeypatch.setattr("asyncjobs.stores._sqlite.ADMIN_BATCH", 2)
    store = SQLiteStore(tmp_path / "jobs.db")
    await store.open()
    chain = [new_job(f"m{n}", chain_next=f"m{n + 1}" if n < 3 else None) for n in range(4)]
    others = [new_job("v"), new_job("w")]  # between the dead one and its followers
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        insert_jobs(db, [chain[0], *others, *chain[1:], new_job("x")], 0.0)
        db.execute(
            "UPDATE asyncjobs_jobs SET finished_at = 1.0, status = CASE WHEN id = 'm0' "
            "THEN 'dead' WHEN id IN ('v', 'w') THEN 'succeeded' ELSE 'cancelled' END "
            "WHERE id <> 'x'"
        )
    db.close()
    try:
        # Step one: m3 to m1 kept (m0 is stored), w and v deleted; step two: m0, m1 to m3.
        assert await store.purge(older_than=2.0, now=2.0) == 6
        assert [row.id for row in await store.list(now=2.0)] == ["x"]
    finally:
        await store.close()
