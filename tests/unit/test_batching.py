"""Group commit: batching, failure isolation and cancellation."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from asyncjobs._batching import GroupCommit


class SlowStore:
    """A flush that waits until the test lets it finish, recording every batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = anyio.Event()
        self.started = anyio.Event()

    async def flush(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return [i * 10 for i in items]


async def flush_with_company(group: GroupCommit[int, int], store: SlowStore, first: int) -> None:
    """``first`` flushes alone while ``first + 1`` and ``first + 2`` queue behind it and
    share the next flush: the group has seen company, so its next leaders gather."""
    store.release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(group.submit, first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(group.submit, first + 1)
        tg.start_soon(group.submit, first + 2)
        await anyio.wait_all_tasks_blocked()
        store.release.set()
    assert store.batches[-2:] == [[first], [first + 1, first + 2]]


async def test_waiters_that_arrive_during_a_flush_share_the_next_one() -> None:
    store = SlowStore()
    group: GroupCommit[int, int] = GroupCommit(store.flush)
    results: dict[int, int] = {}

    async def submit(i: int) -> None:
        results[i] = await group.submit(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(submit, 0)
        await store.started.wait()
        for i in range(1, 6):
            tg.start_soon(submit, i)
        await anyio.wait_all_tasks_blocked()
        store.release.set()
    assert store.batches == [[0], [1, 2, 3, 4, 5]]
    assert results == {i: i * 10 for i in range(6)}
    assert group.idle


async def test_a_lone_producer_flushes_at_once_and_company_makes_leaders_gather() -> None:
    store = SlowStore()
    store.release.set()
    group: GroupCommit[int, int] = GroupCommit(store.flush)

    async def two_in_one_loop_iteration(first: int) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(group.submit, first)
            tg.start_soon(group.submit, first + 1)

    # No company seen yet: the first submitter does not wait for the second.
    await two_in_one_loop_iteration(0)
    assert store.batches == [[0], [1]]
    # A flush that did have company (submitters queued behind a slow flush)...
    await flush_with_company(group, store, 2)
    # ...makes the next leader wait one loop iteration for the others.
    await two_in_one_loop_iteration(5)
    assert store.batches[-1] == [5, 6]
    assert group.idle


async def test_a_waiter_cancelled_before_its_flush_writes_nothing() -> None:
    store = SlowStore()
    group: GroupCommit[int, int] = GroupCommit(store.flush)

    async with anyio.create_task_group() as tg:
        tg.start_soon(group.submit, 0)
        await store.started.wait()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await group.submit(99)  # queued behind the flush, then cancelled
        tg.start_soon(group.submit, 1)
        await anyio.wait_all_tasks_blocked()
        store.release.set()
    assert store.batches == [[0], [1]]
    assert group.idle


async def test_an_elected_leader_that_is_cancelled_flushes_the_others_but_not_its_own() -> None:
    """asyncio's task.cancel() can land after the election and before the waiter resumes:
    its caller hears CancelledError, so its item must not be written (it could not
    learn that it was, and would submit it again)."""
    doomed: asyncio.Task[int] | None = None
    batches: list[list[int]] = []
    release = anyio.Event()

    async def flush(items: list[int]) -> list[int]:
        batches.append(list(items))
        if items == [0]:
            await release.wait()
            # Runs after this flush elects the waiter of 1 and before that waiter resumes.
            assert doomed is not None
            asyncio.get_running_loop().call_soon(doomed.cancel)
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(flush)
    with anyio.fail_after(5):
        first = asyncio.create_task(group.submit(0))
        await anyio.wait_all_tasks_blocked()
        doomed = asyncio.create_task(group.submit(1))  # first in line: the next leader
        await anyio.wait_all_tasks_blocked()
        third = asyncio.create_task(group.submit(2))
        await anyio.wait_all_tasks_blocked()
        release.set()
        assert await first == 0
        assert await third == 20
        with pytest.raises(asyncio.CancelledError):
            await doomed
    assert batches == [[0], [2]]  # the elected leader flushed the others before giving up
    assert group.idle


async def test_a_leader_cancelled_by_asyncio_mid_flush_lets_the_flush_end_for_all() -> None:
    """``task.cancel()`` (``asyncio.timeout``, ``wait_for``) goes through an anyio shield:
    it must neither cut the flush short nor reach the other callers of the batch."""
    store = SlowStore()
    group: GroupCommit[int, int] = GroupCommit(store.flush)
    await flush_with_company(group, store, 0)  # the next leader gathers company
    store.release = anyio.Event()
    with anyio.fail_after(5):
        leader = asyncio.create_task(group.submit(10))
        other = asyncio.create_task(group.submit(11))
        while store.batches[-1] != [10, 11]:
            await anyio.lowlevel.checkpoint()
        leader.cancel()  # while the flush waits on the store
        await anyio.wait_all_tasks_blocked()
        assert not leader.done()  # it waits for the flush to end
        store.release.set()
        assert await other == 110
        with pytest.raises(asyncio.CancelledError):
            await leader
    assert group.idle
    assert await group.submit(12) == 120  # leadership was not lost


async def test_a_leader_cancelled_by_asyncio_while_gathering_flushes_the_others_only() -> None:
    store = SlowStore()
    store.release.set()
    group: GroupCommit[int, int] = GroupCommit(store.flush)
    await flush_with_company(group, store, 0)  # the next leader gathers company
    store.release.set()
    with anyio.fail_after(5):
        leader = asyncio.create_task(group.submit(10))
        other = asyncio.create_task(group.submit(11))
        await anyio.lowlevel.checkpoint()  # both queued; the leader gathers for a while
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        assert await other == 110
    assert store.batches[-1] == [11]  # nothing of the cancelled leader was written
    assert group.idle


async def test_a_failed_flush_fails_its_batch_only() -> None:
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise RuntimeError("disk full")
        return items

    group: GroupCommit[int, int] = GroupCommit(flush)
    with pytest.raises(RuntimeError, match="disk full"):
        await group.submit(13)
    assert await group.submit(1) == 1


async def test_a_gathering_leader_waits_out_one_quiet_loop_iteration() -> None:
    """Under HTTP load a request is read in one loop iteration and enqueues in the next:
    a leader that flushed at the first iteration without newcomers wrote one job
    alone, then the rest of the wave (measured: a third of all flushes held one job)."""
    store = SlowStore()
    group: GroupCommit[int, int] = GroupCommit(store.flush)
    await flush_with_company(group, store, 0)

    async def after_iterations(item: int, iterations: int) -> None:
        for _ in range(iterations):
            await anyio.lowlevel.checkpoint()
        await group.submit(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(group.submit, 3)
        tg.start_soon(after_iterations, 4, 1)  # one iteration with nobody new between
    assert store.batches[-1] == [3, 4]
    # A lone producer is not held for long: at most _GATHER_PASSES iterations.
    async with anyio.create_task_group() as tg:
        tg.start_soon(group.submit, 5)
        tg.start_soon(after_iterations, 6, 8)
    assert store.batches[-2:] == [[5], [6]]
    assert group.idle
