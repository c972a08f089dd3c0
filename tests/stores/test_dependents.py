"""Store contract for workflows: result passing, batch counts (``store[sqlite|postgres]``)."""

from __future__ import annotations

import json
from typing import Any

from asyncjobs.stores import ClaimRequest, JobRow, NewJob, Outcome, OutcomeKind, Store, TaskLimits
from asyncjobs.stores._dependents import pass_result, prepend_result, wants, with_batch

T0 = 1_000_000.0
EMPTY = '{"args":[],"kwargs":{}}'


def new(job_id: str, **fields: Any) -> NewJob:
    values: dict[str, Any] = {
        "task": "t",
        "queue": "default",
        "payload": EMPTY,
        "status": "queued",
        "priority": 0,
        "run_at": T0,
        "max_attempts": 1,
    }
    values.update(fields)
    return NewJob(id=job_id, **values)


async def claim(store: Store, now: float = T0) -> list[JobRow]:
    request = ClaimRequest(
        worker="w", tasks={"t": TaskLimits(max_attempts=1)}, queues=None, limit=100, lease=30
    )
    return list(await store.claim(request, now=now))


def done(row: JobRow, kind: OutcomeKind, result: str | None = None) -> Outcome:
    return Outcome(job_id=row.id, worker="w", attempt=row.attempts, kind=kind, result=result)


async def payload(store: Store, job_id: str) -> Any:
    row = await store.get(job_id)
    assert row is not None
    return json.loads(row.payload)


async def test_a_marked_chain_member_gets_the_result_as_its_first_argument(store: Store) -> None:
    await store.insert(
        [
            new("a", chain_next="b"),
            new("b", status="waiting", chain_next="c", options='{"pass_result": true}',
                payload='{"args":[2],"kwargs":{"k":1}}'),
            new("c", status="waiting"),
        ],
        now=T0,
    )  # fmt: skip
    (a,) = await claim(store)
    await store.finish([done(a, OutcomeKind.SUCCEEDED, '{"x":[1,"y"]}')], now=T0 + 1)
    assert await payload(store, "b") == {"args": [{"x": [1, "y"]}, 2], "kwargs": {"k": 1}}
    (b,) = await claim(store, T0 + 1)
    await store.finish([done(b, OutcomeKind.SUCCEEDED, "5")], now=T0 + 2)
    assert await payload(store, "c") == {"args": [], "kwargs": {}}, "c did not ask for it"


async def test_a_failed_member_passes_nothing(store: Store) -> None:
    await store.insert(
        [new("a", chain_next="b"), new("b", status="waiting", options='{"pass_result": true}')],
        now=T0,
    )
    (a,) = await claim(store)
    await store.finish([done(a, OutcomeKind.DEAD)], now=T0 + 1)
    row = await store.get("b")
    assert row is not None
    assert (row.status, json.loads(row.payload)) == ("cancelled", {"args": [], "kwargs": {}})


async def test_the_batch_callback_gets_the_counts_and_batch_counts_reports_them(
    store: Store,
) -> None:
    await store.insert(
        [
            new("m1", batch_id="cb"),
            new("m2", batch_id="cb"),
            new("m3", batch_id="cb"),
            new("cb", task="other", status="waiting", options='{"batch_counts": true}'),
        ],
        now=T0,
    )
    assert await store.batch_counts("cb") == {"queued": 3}
    m1, m2, m3 = await claim(store)
    assert await store.cancel(["m3"], now=T0) == ["m3"]  # running: its worker stops it
    await store.finish([done(m3, OutcomeKind.CANCELLED)], now=T0)
    await store.finish([done(m1, OutcomeKind.SUCCEEDED, "1")], now=T0 + 1)
    assert (await payload(store, "cb"))["kwargs"] == {}, "not before the last member"
    await store.finish([done(m2, OutcomeKind.DEAD)], now=T0 + 2)
    assert await store.batch_counts("cb") == {"succeeded": 1, "dead": 1, "cancelled": 1}
    row = await store.get("cb")
    assert row is not None
    assert row.status == "queued"
    assert json.loads(row.payload)["kwargs"] == {
        "batch": {"id": "cb", "total": 3, "succeeded": 1, "dead": 1, "cancelled": 1}
    }
    assert await store.batch_counts("missing") == {}


async def test_deleted_batch_members_still_count_in_the_callbacks_counts(store: Store) -> None:
    """``delete`` and ``purge`` tally what they take from a batch on its callback."""
    await store.insert(
        [
            new("m1", batch_id="cb"),
            new("m2", batch_id="cb"),
            new("m3", batch_id="cb"),
            new("m4", batch_id="cb", status="scheduled", run_at=T0 + 60),
            new("cb", task="other", status="waiting", options='{"batch_counts": true}'),
        ],
        now=T0,
    )
    assert await store.delete(["m1"], now=T0) == 1  # queued: cancelled first
    m2, m3 = await claim(store)
    await store.finish([done(m2, OutcomeKind.SUCCEEDED), done(m3, OutcomeKind.DEAD)], now=T0)
    assert await store.purge(status="succeeded", now=T0) == 1
    assert await store.batch_counts("cb") == {"cancelled": 1, "succeeded": 1, "dead": 1,
                                              "scheduled": 1}  # fmt: skip
    (m4,) = await claim(store, T0 + 60)
    await store.finish([done(m4, OutcomeKind.SUCCEEDED)], now=T0 + 60)
    assert (await payload(store, "cb"))["kwargs"]["batch"] == {
        "id": "cb", "total": 4, "succeeded": 2, "dead": 1, "cancelled": 1
    }  # fmt: skip
    assert await store.delete(["m3", "m4"], now=T0 + 60) == 2  # after the release too
    assert await store.batch_counts("cb") == {"cancelled": 1, "succeeded": 2, "dead": 1}


async def test_prune_drops_a_tally_with_the_last_job_of_its_batch_past_retention(
    store: Store,
) -> None:
    await store.insert(
        [new("m1", batch_id="b1"), new("m2", batch_id="b2"), new("m3", batch_id="b2")], now=T0
    )
    first, second, _ = await claim(store)
    await store.finish([done(first, OutcomeKind.SUCCEEDED)], now=T0)
    await store.finish([done(second, OutcomeKind.SUCCEEDED)], now=T0)
    assert await store.purge(status="succeeded", now=T0) == 2
    await store.prune(finished_before=T0, dead_before=T0, workers_before=0, limit=10)
    assert await store.batch_counts("b1") == {"succeeded": 1}  # not yet past retention
    await store.prune(finished_before=T0 + 1, dead_before=T0 + 1, workers_before=0, limit=10)
    assert await store.batch_counts("b1") == {}  # no job of b1 is left
    assert await store.batch_counts("b2") == {"succeeded": 1, "running": 1}


async def test_the_tallies_are_pruned_once_a_prune_in_its_last_batch(store: Store) -> None:
    """A prune deletes in batches until one deletes fewer than its limit: the tallies
    past retention go in that last batch, once a prune, not in each full one (each
    read the tallies past retention, and then every tally)."""
    await store.insert([new("m1", batch_id="b1")], now=T0)
    await store.finish([done(row, OutcomeKind.SUCCEEDED) for row in await claim(store)], now=T0)
    assert await store.purge(status="succeeded", now=T0) == 1  # b1 has no job left
    await store.insert([new("x1"), new("x2")], now=T0)
    await store.finish([done(row, OutcomeKind.SUCCEEDED) for row in await claim(store)], now=T0)
    after = {"finished_before": T0 + 1, "dead_before": T0 + 1, "workers_before": 0}
    assert await store.prune(**after, limit=2) == 2  # a full batch: more may follow
    assert await store.batch_counts("b1") == {"succeeded": 1}
    assert await store.prune(**after, limit=2) == 0  # the last batch
    assert await store.batch_counts("b1") == {}


def test_payload_helpers() -> None:
    assert wants('{"pass_result": true}', "pass_result")
    assert not wants('{"pass_result": 1}', "pass_result")
    assert not wants(None, "pass_result")
    assert not wants("not json", "pass_result")
    assert not wants("[true]", "pass_result")
    assert json.loads(prepend_result('{"args":[1],"kwargs":{}}', "null")) == {
        "args": [None, 1],
        "kwargs": {},
    }
    payload, options = pass_result('{"args":[1]}', '{"pass_result":true,"timeout":5}', "2")
    assert json.loads(payload) == {"args": [2, 1]}
    assert json.loads(options) == {"pass_result": "passed", "timeout": 5}
    assert not wants(options, "pass_result")  # passed once, never again
    counts = {"succeeded": 2, "running": 1}
    assert json.loads(with_batch('{"args":[],"kwargs":{"batch":null}}', "b", counts)) == {
        "args": [],
        "kwargs": {"batch": {"id": "b", "total": 3, "succeeded": 2, "dead": 0, "cancelled": 0}},
    }
    # A payload that is not what enqueue writes is left as it is (the runner sends the
    # job dead when it cannot decode it); so is one whose result cannot be read.
    deep = "[" * 100_000  # deeper than the decoder goes
    for corrupt in ("[]", "{not json", '{"args": 5}', '{"args": [], "kwargs": [1]}', deep):
        assert prepend_result(corrupt, "1") == corrupt
        assert with_batch(corrupt, "b", counts) == corrupt
    assert prepend_result('{"args":[]}', "{not json") == '{"args":[]}'
