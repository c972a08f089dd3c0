"""What a store does to a waiting job's payload when it releases it (pure, shared by stores).

Chains and batches (``asyncjobs/_workflows.py``) mark a waiting job in its
``options`` JSON:

- ``"pass_result": true`` on a chain member: when the member before it succeeds,
  that member's result becomes this job's first positional argument, and the flag
  becomes ``"passed"`` so that a retry by hand never passes it twice;
- ``"batch_counts": true`` on a batch's ``on_complete`` job: when the last member
  finishes, the job gets a ``batch`` keyword argument holding the counts
  (see ``batch_summary``).

``original_arguments`` undoes both, for a worker that computes the rate-limit key of a
job enqueued by name where its task was not defined from the arguments it was enqueued
with (``Runner.assign_keys``).

The store applies these in the same transaction that releases the job. A payload
that cannot be rewritten (a corrupt row) is left as it is: the release must not fail
the transaction that finishes other jobs, and the runner sends the job dead when it
cannot decode it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from asyncjobs._errors import RetryRefused

RESULT_FLAG = "pass_result"
COUNTS_FLAG = "batch_counts"


def wants(options: str | None, flag: str) -> bool:
    """Whether a job's stored ``options`` JSON sets ``flag``."""
    if not options:
        return False
    try:
        parsed = json.loads(options)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get(flag) is True


def _load(payload: str) -> dict[str, Any] | None:
    """The payload's object, or None when it is not what enqueue writes."""
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    if not isinstance(parsed.get("args", []), list):
        return None
    if not isinstance(parsed.get("kwargs") or {}, dict):
        return None
    return parsed


def _dump(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def prepend_result(payload: str, result: str | None) -> str:
    """``payload`` with ``result`` (JSON text; None is JSON null) as the first argument."""
    data = _load(payload)
    try:
        value = None if result is None else json.loads(result)
    except (ValueError, RecursionError):
        return payload  # a corrupt result: the job runs without it and fails visibly
    if data is None:
        return payload
    data["args"] = [value, *data.get("args", [])]
    return _dump(data)


def pass_result(payload: str, options: str | None, result: str | None) -> tuple[str, str]:
    """The payload and options of a chain member that wants ``result`` and now has it
    (only for options where ``wants(options, RESULT_FLAG)`` holds)."""
    parsed = json.loads(options or "{}")
    parsed[RESULT_FLAG] = "passed"
    return prepend_result(payload, result), _dump(parsed)


def result_gone(job_id: str) -> RetryRefused:
    """Why a manual retry of a chain member that takes the previous result (``wants``
    ``RESULT_FLAG``) is refused when the member before it is no longer stored: it was
    cancelled before that one succeeded, and without the result it would run with its
    arguments shifted by one. (One that does not take the result runs on its own.)"""
    return RetryRefused(
        f"job {job_id} cannot be retried: it is a chain member that takes the result of "
        "the job before it (pass_result=True), and that job is no longer stored (pruned "
        "or purged) and never passed it one. Enqueue its task again with that result as "
        "the first argument, or retry the chain from its first job"
    )


def batch_summary(batch_id: str, counts: Mapping[str, int]) -> dict[str, Any]:
    """The ``batch`` keyword an ``on_complete`` job receives (``asyncjobs.BatchCounts``)."""
    return {
        "id": batch_id,
        "total": sum(counts.values()),
        "succeeded": counts.get("succeeded", 0),
        "dead": counts.get("dead", 0),
        "cancelled": counts.get("cancelled", 0),
    }


def with_batch(payload: str, batch_id: str, counts: Mapping[str, int]) -> str:
    """``payload`` with the ``batch`` keyword argument set to the batch's counts."""
    data = _load(payload)
    if data is None:
        return payload
    kwargs = data.get("kwargs") or {}
    kwargs["batch"] = batch_summary(batch_id, counts)
    data["kwargs"] = kwargs
    return _dump(data)


def original_arguments(payload: str, options: str | None) -> tuple[list[Any], dict[str, Any]]:
    """The arguments a job was enqueued with: its payload's, less the previous result
    that a chain passed it and the ``batch`` counts its batch gave it. Raises
    ``ValueError`` for a payload enqueue did not write."""
    data = _load(payload)
    if data is None:
        raise ValueError("the payload is not a JSON object of args and kwargs")
    args = list(data.get("args", []))
    kwargs = dict(data.get("kwargs") or {})
    parsed = json.loads(options) if options else {}
    if isinstance(parsed, dict):
        if parsed.get(RESULT_FLAG) == "passed":
            args = args[1:]
        if parsed.get(COUNTS_FLAG) is True:
            kwargs.pop("batch", None)
    return args, kwargs


def tally(
    deleted: Iterable[tuple[str | None, str, float | None]],
) -> list[tuple[str, str, int, float]]:
    """The batch members among deleted jobs, given as (batch_id, status, finished_at): by
    batch and status, how many and their latest finish, sorted (the order in which a
    store locks the tallies it adds them to). A member is deleted finished: an
    unfinished one is cancelled first."""
    counts: dict[tuple[str, str], tuple[int, float]] = {}
    for batch_id, status, finished_at in deleted:
        if batch_id is not None:
            n, latest = counts.get((batch_id, status), (0, 0.0))
            counts[batch_id, status] = (n + 1, max(latest, finished_at or 0.0))
    return [(b, s, n, latest) for (b, s), (n, latest) in sorted(counts.items())]
