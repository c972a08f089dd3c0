"""The PostgreSQL store under real faults: pg_terminate_backend on this store's own
backends (mid-enqueue, mid-claim, mid-finish, idle), a dropped LISTEN connection, a
small pool, lock and statement timeouts, a deadlock, a caller's aborted transaction. No job lost,
none run twice, and the store used again without a restart. Every wait is bounded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import pytest

from asyncjobs import Jobs, JobStatus, StoreError, current_job
from asyncjobs._clock import SystemClock
from asyncjobs.stores import ClaimRequest, PostgresStore, TaskLimits
from asyncjobs.testing import FakeClock

asyncpg = pytest.importorskip("asyncpg")

CLOCK = SystemClock()


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def poll_until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = CLOCK.now() + seconds
    while not await check():
        assert CLOCK.now() < deadline, f"gave up after {seconds}s waiting for {what}"
        await CLOCK.sleep(0.05)


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def app(postgres_url: str) -> tuple[str, str]:
    """The store URL with an application_name of this test's own (kills filter on it)."""
    name = f"rv_pgfault_{uuid.uuid4().hex[:10]}"
    return with_query(postgres_url, application_name=name), name


async def kill_waiting(
    admin: Any, name: str, like: str, seconds: float = 10, *, spare: list[int] | None = None
) -> list[int]:
    """Terminate this test's backends (application_name ``name``) waiting on a lock in a
    statement matching ``like``; wait until there is one. Returns their pids and adds
    them to ``spare``, whose backends are not counted again: one just terminated can
    still show as waiting for a moment, and a second kill must reach the next one."""
    spare = [] if spare is None else spare
    killed: list[int] = []

    async def found() -> bool:
        await admin.execute("SELECT pg_stat_clear_snapshot()")  # read afresh in a transaction
        rows = await admin.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND wait_event_type = 'Lock' AND query LIKE $2 "
            "AND pid <> ALL($3::int[])",
            name,
            like,
            spare,
        )
        killed[:] = [r["pid"] for r in rows]
        return bool(killed)

    try:
        await poll_until(found, seconds, f"a backend waiting in {like!r}")
    except AssertionError:
        rows = await admin.fetch(
            "SELECT pid, state, wait_event_type, left(query, 50) FROM pg_stat_activity "
            "WHERE application_name = $1",
            name,
        )
        raise AssertionError(f"none waiting in {like!r}: {[tuple(r) for r in rows]}") from None
    spare += killed
    return killed


async def statuses(admin: Any) -> dict[str, str]:
    rows = await admin.fetch("SELECT id, status FROM asyncjobs_jobs")
    return {r["id"]: r["status"] for r in rows}


# -- mid-enqueue ---------------------------------------------------------------------


@pytest.mark.parametrize("kills", [1, 2])
async def test_an_enqueue_whose_backend_is_killed_while_it_waits(
    app: tuple[str, str], admin: Any, kills: int
) -> None:
    """Killed once, the insert is retried on a fresh connection and stored once; killed
    on its retry too, the enqueue raises StoreError and stores nothing. Either way the
    store is used again."""
    url, name = app
    jobs = Jobs(url, workers=False)

    @jobs.task(name="t")
    async def t(n: int) -> None: ...

    try:
        await jobs.enqueue(t, 0)  # opens the pool and the enqueue connection
        outcome: list[object] = []

        async def enqueue() -> None:
            try:
                outcome.append((await jobs.enqueue(t, 1)).id)
            except StoreError as error:
                outcome.append(error)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg, admin.transaction():
                await admin.execute("LOCK TABLE asyncjobs_jobs IN SHARE MODE")
                tg.start_soon(enqueue)  # its insert waits on the lock
                killed: list[int] = []
                for _ in range(kills):
                    await kill_waiting(admin, name, "%INSERT INTO%", spare=killed)
        (result,) = outcome
        stored = await statuses(admin)
        if kills == 1:
            assert result in stored
            assert len(stored) == 2
        else:
            assert isinstance(result, StoreError)
            assert len(stored) == 1

        async def stored_again() -> bool:
            try:
                await jobs.enqueue(t, 2)
            except StoreError:
                return False  # the reconnect backoff (0.1 s)
            return True

        await poll_until(stored_again, 5, "an enqueue to go through again")
        assert len(await statuses(admin)) == len(stored) + 1
    finally:
        await jobs.close()


# -- mid-claim and mid-finish ----------------------------------------------------------


@pytest.mark.parametrize("kills", [1, 2])
async def test_a_claim_killed_while_it_waits_runs_the_job_once_on_its_first_attempt(
    app: tuple[str, str], admin: Any, kills: int
) -> None:
    url, name = app
    jobs = Jobs(url, poll_interval=0.2, visibility_timeout=30)
    runs: list[int] = []

    @jobs.task(name="t", retries=0)
    async def t(n: int) -> None:
        runs.append(n)

    try:
        async with jobs:
            # The runner is idle (its first claims found nothing): lock, enqueue from
            # elsewhere, and cut the claims that wait on the lock.
            other = Jobs(url, workers=False)
            try:
                with anyio.fail_after(30):
                    async with admin.transaction():
                        await admin.execute("LOCK TABLE asyncjobs_jobs IN SHARE ROW EXCLUSIVE MODE")
                        killed: list[int] = []
                        for _ in range(kills):
                            # A claim's statement that waits: the due jobs' promotion,
                            # or the pick, whose UPDATE comes after 1,024 bytes of CTEs
                            # (all pg_stat_activity keeps of a statement).
                            await kill_waiting(admin, name, "%asyncjobs_jobs%", spare=killed)
                    job = await other.enqueue("t", 7)
            finally:
                await other.close()

            async def ended() -> bool:
                try:
                    info = await jobs.get(job.id)
                except StoreError:  # refused during the reconnect backoff (0.1 s)
                    return False
                return info is not None and info.status in (JobStatus.SUCCEEDED, JobStatus.DEAD)

            await poll_until(ended, 20, "the job to end")
            info = await jobs.get(job.id)
            assert info is not None
            assert info.status == JobStatus.SUCCEEDED
            assert info.attempts == 1
            assert runs == [7]
    finally:
        await jobs.close()


async def finish_under_row_lock(
    jobs: Jobs, admin: Any, while_locked: Callable[[], Awaitable[None]]
) -> None:
    """Run a job whose outcome's write waits on a row lock the test holds while
    ``while_locked`` runs; then the outcome is written, and the job ran once, on its
    first attempt."""
    runs: list[int] = []
    release = asyncio.Event()

    @jobs.task(name="t", retries=2)
    async def t(n: int) -> int:
        runs.append(n)
        await release.wait()
        return n * 2

    async with jobs:
        job = await t.enqueue(5)

        async def running() -> bool:
            return bool(runs)

        await poll_until(running, 10, "the job to start")
        with anyio.fail_after(30):
            async with admin.transaction():
                await admin.execute("SELECT 1 FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE", job.id)
                release.set()  # it ends: its outcome's write waits on the row
                await while_locked()
        with anyio.fail_after(20):
            assert await job.result(timeout=20) == 10
        info = await jobs.get(job.id)
        assert info is not None
        assert info.attempts == 1
        assert runs == [5]


@pytest.mark.parametrize("kills", [1, 2, 3])
async def test_a_finish_killed_while_it_waits_is_written_and_the_job_runs_once(
    app: tuple[str, str], admin: Any, kills: int
) -> None:
    url, name = app
    jobs = Jobs(url, poll_interval=0.2, visibility_timeout=30)

    async def kill() -> None:
        killed: list[int] = []
        for _ in range(kills):
            await kill_waiting(admin, name, "%asyncjobs_jobs%", spare=killed)

    try:
        await finish_under_row_lock(jobs, admin, kill)
    finally:
        await jobs.close()


async def test_a_heartbeat_ended_by_a_deadlock_is_tried_again(
    app: tuple[str, str], admin: Any
) -> None:
    """PostgreSQL ends one statement of a deadlock; a heartbeat so ended is tried again,
    not lost (a lost beat can let a short lease run out, and the job run twice). The
    test makes the heartbeat the one PostgreSQL ends: its own deadlock_timeout is
    longer."""
    url, name = app
    jobs = Jobs(url, workers=False)
    try:
        first, second = await jobs.enqueue("t", 1), await jobs.enqueue("t", 2)
        ids = sorted([first.id, second.id])  # the heartbeat locks rows in id order
        request = ClaimRequest(
            worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=2, lease=60
        )
        assert len(await jobs.store.claim(request, now=CLOCK.now())) == 2
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg, admin.transaction():
                await admin.execute("SET LOCAL deadlock_timeout = '20s'")
                await admin.execute("SELECT 1 FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE", ids[1])
                beats: list[set[str]] = []

                async def beat() -> None:
                    lease = CLOCK.now() + 60
                    beats.append(await jobs.store.heartbeat(ids, worker="w", lease_until=lease))

                tg.start_soon(beat)
                await poll_until(
                    lambda: waiting(admin, name), 10, "the heartbeat to wait on the lock"
                )
                # Locks the row the heartbeat holds: a deadlock, which ends the heartbeat.
                await admin.execute("SELECT 1 FROM asyncjobs_jobs WHERE id = $1 FOR UPDATE", ids[0])
        assert beats == [set(ids)]
    finally:
        await jobs.close()


async def waiting(admin: Any, name: str) -> bool:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
        "AND wait_event_type = 'Lock' AND query LIKE '%lease_until%'",
        name,
    )
    return count > 0


# -- the LISTEN connection -----------------------------------------------------------


async def kill_all(admin: Any, name: str) -> int:
    n: int = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        name,
    )
    return n


class Listening(NamedTuple):
    jobs: Jobs  # the runner: its sessions carry the test's application_name
    store: Any  # its store
    other: Jobs  # an enqueue-only process, under another name (not killed)
    ran: asyncio.Event  # set by task "t"


@asynccontextmanager
async def listening_runner(url: str, name: str, poll_interval: float) -> AsyncIterator[Listening]:
    """A started runner, LISTENing for jobs, and a process that enqueues them."""
    jobs = Jobs(url, poll_interval=poll_interval)
    other = Jobs(with_query(url.replace(name, name + "_o")), workers=False)
    ran = asyncio.Event()

    @jobs.task(name="t")
    async def t() -> None:
        ran.set()

    try:
        async with jobs:
            store: Any = jobs.store

            async def listening() -> bool:
                return store._listener is not None

            await poll_until(listening, 10, "the runner to LISTEN")
            yield Listening(jobs, store, other, ran)
    finally:
        await other.close()
        await jobs.close()


@pytest.mark.parametrize("what", ["listener", "all"])
async def test_a_runner_whose_listen_connection_was_killed_still_wakes_for_new_jobs(
    app: tuple[str, str], admin: Any, what: str
) -> None:
    url, name = app
    async with listening_runner(url, name, poll_interval=60) as runner:
        store = runner.store
        if what == "listener":
            pid = store._listener.get_server_pid()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        else:
            assert await kill_all(admin, name) >= 2

        async def noticed() -> bool:
            listener = store._listener
            return (
                listener is not None
                and not listener.is_closed()
                and (what == "all" or listener.get_server_pid() != pid)
            )

        await poll_until(noticed, 10, "a new LISTEN connection")
        await runner.other.enqueue("t")
        with anyio.fail_after(10):  # well within poll_interval=60
            await runner.ran.wait()


# -- a small pool ------------------------------------------------------------------------


async def test_a_pool_of_one_under_concurrent_enqueues_and_progress_reports_loses_nothing(
    app: tuple[str, str], admin: Any
) -> None:
    url, _name = app
    jobs = Jobs(with_query(url, pool_min="0", pool_max="1"), poll_interval=0.2, concurrency=20)
    runs: list[int] = []

    @jobs.task(name="t")
    async def t(n: int) -> int:
        for step in range(3):
            await current_job().set_progress(step / 3, f"step {step}")
        runs.append(n)
        return n

    try:
        async with jobs:
            handles: list[Any] = []

            async def producer(k: int) -> None:
                for i in range(10):
                    n = k * 100 + i
                    spec = t.options(idempotency_key=f"k{n}") if i % 3 == 0 else t
                    handles.append(await jobs.enqueue(spec, n))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for k in range(30):
                        tg.start_soon(producer, k)
                for job in handles:
                    await job.result(timeout=60)
            assert sorted(runs) == sorted(k * 100 + i for k in range(30) for i in range(10))
    finally:
        await jobs.close()


@pytest.mark.parametrize("outcomes", [False, True], ids=["claim", "finish_and_claim"])
async def test_a_claim_that_waited_for_a_connection_leases_from_when_it_got_one(
    app: tuple[str, str], outcomes: bool
) -> None:
    """Counted from before the wait for the pool's only connection, the lease was
    written short by that wait (expired at once past visibility_timeout), and another
    worker's lease recovery could take a job that was running."""
    url, _name = app
    clock = FakeClock()
    jobs = Jobs(with_query(url, pool_min="0", pool_max="1"), clock=clock, visibility_timeout=2)

    @jobs.task(name="work")
    async def work() -> None: ...

    try:
        job = await work.enqueue()
        store = jobs.store
        assert isinstance(store, PostgresStore)
        assert store._pool is not None
        request = ClaimRequest(worker="w", tasks={"work": TaskLimits(max_attempts=4)}, queues=None,
                               limit=1, lease=2, clock=clock.now)  # fmt: skip
        async with store._pool.acquire():  # the only connection: the claim waits for it
            now = clock.now()
            claiming = asyncio.ensure_future(
                store.finish_and_claim([], request, now=now) if outcomes
                else store.claim(request, now=now)
            )  # fmt: skip
            await anyio.wait_all_tasks_blocked()
            assert not claiming.done()
            clock.advance(5)
        with anyio.fail_after(10):
            claimed = await claiming
        if outcomes:
            claimed = claimed[1]
        assert [row.id for row in claimed] == [job.id]
        row = await store.get(job.id)
        assert row is not None
        leased = (row.status, row.started_at, row.lease_until)
        assert leased == ("running", clock.now(), clock.now() + 2)
    finally:
        await jobs.close()


async def test_connections_killed_under_load_lose_no_returned_enqueue_and_store_no_refused_one(
    app: tuple[str, str], admin: Any
) -> None:
    url, name = app
    jobs = Jobs(
        with_query(url, pool_min="0", pool_max="2"),
        poll_interval=0.1,
        concurrency=10,
        visibility_timeout=3,
    )
    runs: list[int] = []

    @jobs.task(name="t", retries=5)
    async def t(n: int) -> int:
        await current_job().set_progress(0.5, "half")
        runs.append(n)
        return n

    try:
        async with jobs:
            returned: dict[int, str] = {}
            refused: list[int] = []

            async def producer(k: int) -> None:
                for i in range(40):
                    n = k * 100 + i
                    spec = t.options(idempotency_key=f"k{n}") if i % 3 == 0 else t
                    try:
                        returned[n] = (await jobs.enqueue(spec, n)).id
                    except StoreError:
                        refused.append(n)
                    await anyio.lowlevel.checkpoint()

            killed = 0
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for k in range(10):
                        tg.start_soon(producer, k)
                    for _ in range(5):
                        await CLOCK.sleep(0.1)
                        killed += await kill_all(admin, name)

                async def all_ended() -> bool:
                    rows = await admin.fetch(
                        "SELECT count(*) FILTER (WHERE status IN "
                        "('succeeded', 'dead', 'cancelled')) AS ended, count(*) AS n "
                        "FROM asyncjobs_jobs"
                    )
                    return bool(rows[0]["ended"] == rows[0]["n"])

                await poll_until(all_ended, 60, "every stored job to end")
            stored = await statuses(admin)
            assert killed > 0
            missing = [n for n, id_ in returned.items() if id_ not in stored]
            assert not missing, f"enqueues that returned but whose job is not stored: {missing}"
            assert len(stored) == len(returned), (
                f"{len(stored)} stored, {len(returned)} returned, {len(refused)} refused"
            )
            assert set(stored.values()) == {"succeeded"}
    finally:
        await jobs.close()


# -- lock_timeout / statement_timeout --------------------------------------------------


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_an_outcome_refused_by_a_timeout_setting_is_written_later_and_the_job_runs_once(
    app: tuple[str, str], admin: Any, setting: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, _name = app
    jobs = Jobs(with_query(url, **{setting: "300"}), poll_interval=0.1, visibility_timeout=30)

    async def refused() -> bool:
        return any(
            setting.split("_")[0] in r.getMessage() or "cancel" in r.getMessage()
            for r in caplog.records
            if r.levelname == "ERROR"
        ) or any("timeout" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)

    async def until_refused() -> None:
        await poll_until(refused, 10, "the write to be refused")

    try:
        await finish_under_row_lock(jobs, admin, until_refused)
    finally:
        await jobs.close()


async def test_sessions_ended_by_idle_session_timeout_are_replaced_without_errors(
    app: tuple[str, str], admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends each session idle for 200 ms (idle_session_timeout, set on a role
    or in the URL): the enqueue connection, the pool's, the LISTEN connection."""
    url, name = app
    jobs = Jobs(with_query(url, idle_session_timeout="200"), poll_interval=60)
    other = Jobs(
        with_query(url.replace(name, name + "_o"), idle_session_timeout="200"), workers=False
    )
    ran: list[int] = []
    got = asyncio.Event()

    @jobs.task(name="t")
    async def t(n: int) -> None:
        ran.append(n)
        got.set()

    try:
        async with jobs:
            for i in range(4):
                got.clear()
                pids = [
                    r["pid"]
                    for r in await admin.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", name
                    )
                ]

                async def idled_out(pids: list[int] = pids) -> bool:  # every one has ended
                    await admin.execute("SELECT pg_stat_clear_snapshot()")
                    return not await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
                    )

                await poll_until(idled_out, 10, "the sessions to idle out")
                if i % 2:
                    await other.enqueue("t", i)
                else:
                    await jobs.enqueue(t, i)
                with anyio.fail_after(10):
                    await got.wait()
            assert ran == [0, 1, 2, 3]
            errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert not errors, errors
    finally:
        await other.close()
        await jobs.close()


# -- an idle connection the server ended -----------------------------------------------


@pytest.mark.parametrize("operation", ["get", "claim", "enqueue_on_the_pool", "enqueue"])
async def test_an_operation_on_a_pooled_connection_the_server_just_ended_is_retried_once(
    app: tuple[str, str], admin: Any, operation: str
) -> None:
    """The server ends idle sessions (restart, failover, pg_terminate_backend by a DBA,
    idle_session_timeout): an operation that takes such a connection from the pool is
    "retried once" on a fresh one, as the store promises, and does not fail."""
    url, name = app
    jobs = Jobs(url, workers=False)

    @jobs.task(name="t")
    async def t() -> None: ...

    store: Any = jobs.store
    try:
        await jobs.get("none")  # the pool's connection is open, and idle
        await jobs.enqueue(t)  # and the enqueue connection
        for round_ in range(3):
            assert await kill_all(admin, name) >= 1
            await anyio.lowlevel.checkpoint()
            if operation == "get":
                assert await jobs.get("none") is None
            elif operation == "enqueue":
                await jobs.enqueue(t)
            elif operation == "claim":
                await jobs.drain()  # claims through the pool
            else:
                store._producing = True  # the enqueue connection is busy: the pool's
                try:
                    await jobs.enqueue(t)
                finally:
                    store._producing = False
            assert store._failures == 0, round_
    finally:
        await jobs.close()


async def test_a_runner_whose_idle_connections_the_server_ended_claims_a_new_job_at_once(
    app: tuple[str, str], admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """After the server ends the runner's idle sessions (a restart, a DBA, a timeout),
    the new LISTEN connection wakes it for a job enqueued elsewhere: its claim, on the
    pool's dead connection, is retried on a fresh one, not failed to wait out
    poll_interval."""
    url, name = app
    async with listening_runner(url, name, poll_interval=30) as runner:
        await runner.other.enqueue("t")  # a claim, then idle
        with anyio.fail_after(10):
            await runner.ran.wait()
        runner.ran.clear()
        assert await kill_all(admin, name) >= 2
        await runner.other.enqueue("t")
        with anyio.fail_after(10):  # poll_interval is 30
            await runner.ran.wait()
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert not errors, errors


# -- the caller's transaction ------------------------------------------------------------


async def test_a_callers_transaction_aborted_by_its_own_error_stores_nothing_and_breaks_nothing(
    app: tuple[str, str], admin: Any
) -> None:
    url, _name = app
    jobs = Jobs(url, poll_interval=0.1)
    ran: list[int] = []

    @jobs.task(name="t")
    async def t(n: int) -> None:
        ran.append(n)

    conn = await asyncpg.connect(url)
    try:
        async with jobs:
            # 1: enqueued, then the caller's own error rolls the transaction back.
            with pytest.raises(ZeroDivisionError):  # noqa: PT012 - raised inside the block
                async with conn.transaction(), jobs.transaction(conn):
                    await jobs.enqueue(t, 1)
                    await jobs.enqueue(t.options(idempotency_key="k"), 1)
                    1 / 0  # noqa: B018
            # 2: a statement of the caller's fails first; the enqueue is refused clearly.
            async with conn.transaction(), jobs.transaction(conn):
                with pytest.raises(asyncpg.PostgresError):
                    await conn.execute("SELECT 'x'::int")
                with pytest.raises(StoreError, match="caller's connection"):
                    await jobs.enqueue(t, 2)
            # 3: a savepoint rolled back; the outer transaction commits the rest.
            async with conn.transaction(), jobs.transaction(conn):
                with pytest.raises(KeyError):  # noqa: PT012 - raised inside the savepoint
                    async with conn.transaction():
                        await jobs.enqueue(t.options(idempotency_key="k"), 3)
                        raise KeyError("x")
                kept = await jobs.enqueue(t.options(idempotency_key="k"), 4)
            with anyio.fail_after(10):
                await kept.result(timeout=10)
            mine = await jobs.enqueue(t, 5)  # the store's own connections are unaffected
            with anyio.fail_after(10):
                await mine.result(timeout=10)
            assert sorted(ran) == [4, 5]
            assert len(await statuses(admin)) == 2
    finally:
        await conn.close()
        await jobs.close()
