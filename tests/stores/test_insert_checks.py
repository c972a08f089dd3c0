"""A store refuses the jobs ``Jobs`` would never build (``store[sqlite]``, ``store[postgres]``).

The ``Store`` is public, for other backends and advanced use: ``insert`` called
directly with a priority out of range, an empty queue, a payload that is not JSON, a
job running without a worker... stored it, and the row then broke what reads it (every
claim, a list of jobs, the lease recovery). The store checks such a job with the
checks ``Jobs`` applies to what it is given, and their errors; a job ``Jobs`` built
from what it checked is not checked again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from test_conformance import T0, new  # a queued job of task t, with fields changed

from asyncjobs import ConfigurationError, Jobs
from asyncjobs._ratelimit import MAX_KEY_BYTES
from asyncjobs._tasks import make_options
from asyncjobs.stores import NewJob, Store, _job_rows
from asyncjobs.testing import FakeClock, drain

# A field of a job inserted directly, and what Jobs says of that value where it takes it.
REFUSED: list[tuple[dict[str, Any], Callable[[], object] | None]] = [
    ({"priority": 2**40}, lambda: make_options(priority=2**40)),
    ({"priority": "high"}, lambda: make_options(priority="high")),  # type: ignore[arg-type]
    ({"priority": True}, lambda: make_options(priority=True)),
    ({"queue": ""}, lambda: make_options(queue="")),
    ({"queue": " email"}, lambda: make_options(queue=" email")),
    ({"group_key": "a\nb"}, lambda: make_options(group="a\nb")),
    ({"idempotency_key": "k\x00"}, lambda: make_options(idempotency_key="k\x00")),
    ({"idempotency_key": "k" * 501}, lambda: make_options(idempotency_key="k" * 501)),
    ({"task": ""}, None),
    ({"task": "send\temail"}, None),
    ({"max_attempts": 0}, None),
    ({"max_attempts": -1}, None),
    ({"max_attempts": 10**6}, None),
    ({"max_attempts": 2.5}, None),
    ({"run_at": math.nan}, None),
    ({"run_at": math.inf}, None),
    ({"run_at": 1e20}, None),
    ({"payload": "not json"}, None),
    ({"payload": 5}, None),
    ({"payload": '{"args": ["\ud800"], "kwargs": {}}'}, None),  # no UTF-8 holds it
    ({"payload": "[1, 2]"}, None),
    ({"payload": '{"args": {}, "kwargs": {}}'}, None),
    ({"options": "{"}, None),
    ({"status": "succeeded"}, None),
    ({"status": "running"}, None),  # no worker: never recovered
    ({"worker": "w1"}, None),  # not running
    ({"status": "running", "worker": "w1", "lease": math.inf}, None),
    ({"rate_key": "k" * (MAX_KEY_BYTES + 1)}, None),
    ({"chain_next": ""}, None),
    ({"batch_id": "b\x00"}, None),
]


def case_id(value: object) -> str:
    return "jobs-says-too" if callable(value) else repr(value)[:40]


@pytest.mark.parametrize(("fields", "jobs_side"), REFUSED, ids=case_id)
async def test_insert_refuses_a_job_jobs_would_never_build(
    store: Store, fields: dict[str, Any], jobs_side: Callable[[], object] | None
) -> None:
    """Refused with ``ConfigurationError`` before anything is written (the good job
    beside it is not inserted either), in the words ``Jobs`` uses for that value."""
    with pytest.raises(ConfigurationError) as refused:
        await store.insert([new("ok"), new("bad", **fields)], now=T0)
    assert await store.get("ok") is None
    assert await store.get("bad") is None
    if jobs_side is not None:
        with pytest.raises(ConfigurationError) as said:
            jobs_side()
        assert str(refused.value) == str(said.value)


async def test_insert_refuses_a_bad_id(store: Store) -> None:
    with pytest.raises(ConfigurationError, match="job id"):
        await store.insert([new("")], now=T0)
    assert await store.list(limit=10, now=T0) == []


async def test_insert_takes_every_job_jobs_could_build(store: Store) -> None:
    """The bounds themselves are taken."""
    jobs = [
        new("a", priority=2**31 - 1, max_attempts=1, idempotency_key="k" * 500),
        new("b", priority=-(2**31), max_attempts=1001, group_key="g", status="scheduled"),
        new("c", status="waiting", options='{"retries": 2}', rate_key="k" * MAX_KEY_BYTES),
        new("d", status="running", worker="w1", lease=30.0, payload='{"args":[1],"kwargs":{}}'),
    ]
    assert list(await store.insert(jobs, now=T0)) == ["a", "b", "c", "d"]


async def test_jobs_does_not_check_again_what_it_built(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated once: the jobs ``Jobs`` builds reach the store as checked already."""
    checked: list[NewJob] = []
    original = _job_rows.check_new_job

    def check(job: NewJob) -> None:
        checked.append(job)
        original(job)

    monkeypatch.setattr(_job_rows, "check_new_job", check)
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), clock=FakeClock())
    try:

        @jobs.task(name="t", priority=5)
        async def t(n: int) -> int:
            return n

        job = await jobs.enqueue(t.options(queue="q", group="g"), 1)
        await jobs.enqueue_many([t.spec(2), t.spec(3)])
        await jobs.chain(t.spec(4), t.spec(5))
        await drain(jobs)
        assert await job.result(timeout=5) == 1
        assert checked == []
        await jobs.store.insert([new("direct", task="t", queue="q")], now=jobs.clock.now())
        assert [j.id for j in checked] == ["direct"]
    finally:
        await jobs.close()
