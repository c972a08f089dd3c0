"""A claim or a write of outcomes the server refused (an error answer: nothing of it
committed) is not remembered as unanswered: the worker's next claim or write looks for
nothing. A try that went unanswered (its reply lost) still is, whatever tries of the
same operation were refused before or after it (a deadlock, a refused value)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from asyncjobs import StoreError
from asyncjobs.stores import (
    ClaimRequest,
    PostgresStore,
    TaskLimits,
    _postgres_claim,
    _postgres_finish,
    _postgres_sql,
)
from asyncjobs.stores._job_rows import NewJob
from asyncjobs.stores._outcomes import Outcome, OutcomeKind

asyncpg = pytest.importorskip("asyncpg")

REQUEST = ClaimRequest(
    worker="w", tasks={"t": TaskLimits(max_attempts=3)}, queues=None, limit=1, lease=60.0
)


def new_job(job_id: str) -> NewJob:
    return NewJob(
        id=job_id, task="t", queue="default", payload='{"args":[],"kwargs":{}}',
        status="queued", priority=0, run_at=0.0, max_attempts=3,
    )  # fmt: skip


def lost() -> BaseException:
    error: BaseException = asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    )
    return error


class RefusingNth:
    """A connection whose ``nth`` statement the server refuses (a division by zero it
    runs instead): the statements before it run as sent."""

    def __init__(self, conn: Any, nth: int) -> None:
        self._conn, self._left = conn, nth

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def _statement(self, method: str, query: str, *args: Any) -> Any:
        self._left -= 1
        if self._left == 0:
            return await self._conn.fetch("SELECT 1 / 0")
        return await getattr(self._conn, method)(query, *args)

    async def execute(self, query: str, *args: Any) -> Any:
        return await self._statement("execute", query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        return await self._statement("fetch", query, *args)


# The module of each function ``scripted`` replaces: the store calls it through there.
SCRIPTED: dict[str, ModuleType] = {"claim_after": _postgres_claim, "apply": _postgres_finish}


def scripted(monkeypatch: pytest.MonkeyPatch, name: str, tries: list[str]) -> list[str]:
    """Each try of ``<module>.<name>`` (claim_after, apply) as the next of ``tries``
    says, then as it is: "deadlock" (PostgreSQL ends it to break one: answered, rolled
    back), "refused" (the server refuses its first statement), "refused-second" (its
    second), "lost" (it commits, its reply is lost), "ok". Returns what is left."""
    module = SCRIPTED[name]
    real: Callable[..., Awaitable[Any]] = getattr(module, name)
    left = list(tries)

    async def one_try(conn: Any, *args: Any, **kwargs: Any) -> Any:
        how = left.pop(0) if left else "ok"
        if how == "deadlock":
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        if how.startswith("refused"):
            conn = RefusingNth(conn, 2 if how == "refused-second" else 1)
        result = await real(conn, *args, **kwargs)
        if how == "lost":
            raise lost()
        return result

    monkeypatch.setattr(module, name, one_try)
    return left


def counting_lookups(monkeypatch: pytest.MonkeyPatch) -> tuple[list[object], list[object]]:
    """The claims' lookups of unanswered claims (claim_again), and the unanswered writes
    each write of outcomes looks for (finished_before's ``earlier``)."""
    claims: list[object] = []
    writes: list[object] = []
    claim_again = _postgres_claim.claim_again
    finished_before = _postgres_finish.finished_before

    async def counted_claims(*args: Any, **kwargs: Any) -> Any:
        claims.append(args[4])
        return await claim_again(*args, **kwargs)

    async def counted_writes(*args: Any, **kwargs: Any) -> Any:
        writes.extend(args[3])
        return await finished_before(*args, **kwargs)

    monkeypatch.setattr(_postgres_claim, "claim_again", counted_claims)
    monkeypatch.setattr(_postgres_finish, "finished_before", counted_writes)
    return claims, writes


async def opened(url: str, *job_ids: str) -> PostgresStore:
    store = PostgresStore(url)
    await store.open()
    await store.insert([new_job(job_id) for job_id in job_ids], now=10.0)
    return store


def succeeded(job_id: str) -> Outcome:
    return Outcome(job_id, "w", 1, OutcomeKind.SUCCEEDED)


@pytest.mark.parametrize(
    "tries",
    [["refused"], ["deadlock"] * _postgres_sql.DEADLOCK_TRIES],
    ids=["refused", "deadlocks"],
)
async def test_a_claim_the_server_refused_is_not_looked_for_later(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tries: list[str]
) -> None:
    store = await opened(postgres_url, "a")
    try:
        claims, _ = counting_lookups(monkeypatch)
        left = scripted(monkeypatch, "claim_after", tries)
        with pytest.raises(StoreError):
            await store.claim(REQUEST, now=100.0)
        assert left == []
        assert [r.id for r in await store.claim(REQUEST, now=101.0)] == ["a"]
        assert claims == []
    finally:
        await store.close()


@pytest.mark.parametrize(
    "tries",
    [["refused"], ["deadlock"] * _postgres_sql.DEADLOCK_TRIES],
    ids=["refused", "deadlocks"],
)
async def test_a_finish_and_claim_the_server_refused_is_not_looked_for_later(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tries: list[str]
) -> None:
    """One transaction: refused, neither the outcomes nor the claim committed."""
    store = await opened(postgres_url, "a", "b")
    try:
        assert [r.id for r in await store.claim(REQUEST, now=100.0)] == ["a"]
        claims, writes = counting_lookups(monkeypatch)
        left = scripted(monkeypatch, "claim_after", tries)
        with pytest.raises(StoreError):
            await store.finish_and_claim([succeeded("a")], REQUEST, now=101.0)
        assert left == []
        applied, claimed = await store.finish_and_claim([succeeded("a")], REQUEST, now=102.0)
        assert (applied, [r.id for r in claimed]) == (["a"], ["b"])
        assert (claims, writes) == ([], [])
    finally:
        await store.close()


@pytest.mark.parametrize("finishing", [False, True], ids=["claim", "finish-and-claim"])
async def test_a_claim_tried_again_after_a_deadlock_looks_for_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, finishing: bool
) -> None:
    """The try PostgreSQL ended to break a deadlock rolled back: the next try of the
    same claim has nothing of it to find."""
    store = await opened(postgres_url, "a", "b")
    try:
        assert [r.id for r in await store.claim(REQUEST, now=100.0)] == ["a"]
        claims, writes = counting_lookups(monkeypatch)
        left = scripted(monkeypatch, "claim_after", ["deadlock"])
        if finishing:
            applied, claimed = await store.finish_and_claim([succeeded("a")], REQUEST, now=101.0)
            assert applied == ["a"]
        else:
            claimed = await store.claim(REQUEST, now=101.0)
        assert left == []
        assert [r.id for r in claimed] == ["b"]
        assert (claims, writes) == ([], [])
    finally:
        await store.close()


async def test_a_finish_the_server_refused_is_not_looked_for_later(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at its first statement: nothing of it committed. Sent again with another
    outcome that is no longer ours, the write looked for what the refused one wrote."""
    store = await opened(postgres_url, "a")
    try:
        assert [r.id for r in await store.claim(REQUEST, now=100.0)] == ["a"]
        _, writes = counting_lookups(monkeypatch)
        scripted(monkeypatch, "apply", ["refused"])
        with pytest.raises(StoreError):
            await store.finish([succeeded("a")], now=101.0)
        assert await store.finish([succeeded("a"), succeeded("gone")], now=102.0) == ["a"]
        assert writes == []
    finally:
        await store.close()


async def test_a_finish_refused_after_its_first_statement_committed_is_looked_for(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a transaction, its outcomes of plain jobs commit before the rest (here an
    outcome of a job no longer there) are written: refused there, the outcome it wrote
    is reported as applied when sent again, not as no longer ours."""
    store = await opened(postgres_url, "a")
    try:
        assert [r.id for r in await store.claim(REQUEST, now=100.0)] == ["a"]
        scripted(monkeypatch, "apply", ["refused-second"])
        with pytest.raises(StoreError):
            await store.finish([succeeded("a"), succeeded("gone")], now=101.0)
        assert await store.finish([succeeded("a")], now=102.0) == ["a"]
    finally:
        await store.close()


@pytest.mark.parametrize(
    "tries",
    [["lost", "refused"], ["deadlock", "lost", "refused"], ["lost", "deadlock", "refused"]],
    ids=["lost-refused", "deadlock-lost-refused", "lost-deadlock-refused"],
)
async def test_a_claim_with_a_try_unanswered_is_looked_for_whatever_was_refused(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tries: list[str]
) -> None:
    """The try whose reply was lost took the job: the retry on a fresh connection, refused,
    says nothing of it. The next claim hands it out, on its first attempt."""
    store = await opened(postgres_url, "a")
    try:
        claims, _ = counting_lookups(monkeypatch)
        left = scripted(monkeypatch, "claim_after", tries)
        with pytest.raises(StoreError):
            await store.claim(REQUEST, now=100.0)
        assert left == []
        (row,) = await store.claim(REQUEST, now=101.0)
        assert (row.id, row.attempts) == ("a", 1)
        assert claims
    finally:
        await store.close()


async def test_a_claim_refused_after_handing_out_an_unanswered_ones_jobs_is_looked_for(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim after an unanswered one first marks the jobs that one took as its own (a
    statement of its own, committed), then claims: refused there, the jobs carry its
    claim token alone, and the claim after it must look for that token."""
    store = await opened(postgres_url, "a")
    try:
        scripted(monkeypatch, "claim_after", ["lost", "lost", "refused-second"])
        with pytest.raises(StoreError):  # both tries unanswered: the job taken unseen
            await store.claim(REQUEST, now=100.0)
        store._failures, store._retry_at = 0, 0.0  # the reconnect backoff is over
        with pytest.raises(StoreError):
            await store.claim(REQUEST, now=101.0)
        (row,) = await store.claim(REQUEST, now=102.0)
        assert (row.id, row.attempts) == ("a", 1)
    finally:
        await store.close()
