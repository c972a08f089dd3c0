"""Rate keys the worker computes: those of jobs enqueued by name in a process that
lacks the task's definition (an enqueue-only web process).

Such a process cannot know the task's limiter nor run its key function, so it stores
``PENDING_KEY`` (asyncjobs/_ratelimit.py) instead of a key; NULL would mean "no key",
the limiter's shared bucket, and per-customer limits would become one global limit.
A claim holds these jobs back under a keyed limiter and reports them
(``Claimed.unkeyed``); the runner computes their keys here with its own limiters, and
its next claim admits them, each under its own key. Nothing of this runs unless a
claim reported such a job: no cost without keyed limiters or jobs enqueued by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from asyncjobs._codec import decode_payload
from asyncjobs._ratelimit import KEY_ERROR

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")


async def compute_keys(jobs: Jobs, seqs: Sequence[int]) -> int:
    """Compute and store the rate keys of the jobs with these ``seq`` whose key is still
    not computed.

    A key function that fails on a job's arguments sends the job dead with the error
    when it runs (``KEY_ERROR``), as its enqueue would have failed where the task is
    known; a payload that cannot be decoded gets no key and dies of that when it runs.
    Returns how many keys were written (0 when the store failed: logged, and the next
    claim reports those jobs again)."""
    try:
        found = await jobs.store.unkeyed_jobs(seqs)
        keys = [_key_of(jobs, *job) for job in found]
        if keys:
            await jobs.store.set_rate_keys(keys)
    except Exception:
        logger.exception("computing the rate keys of %d job(s) failed", len(seqs))
        return 0
    return len(keys)


def _key_of(
    jobs: Jobs, seq: int, task: str, payload: str, options: str | None
) -> tuple[int, str | None, str | None]:
    """(seq, key, options) for ``Store.set_rate_keys``: options only to record a failure."""
    definition = jobs.registry.get(task)
    limiter = jobs.limiters.get(definition.limiter or "") if definition else None
    if limiter is None:  # unregistered since the claim: no bucket of ours to choose
        return seq, None, None
    try:
        args, kwargs = decode_payload(payload)
    except (ValueError, RecursionError):
        return seq, None, None  # dies when it runs: "the stored payload cannot be decoded"
    try:
        return seq, limiter.key_for(tuple(args), kwargs), None
    except Exception as error:
        message = (
            f"the key function of limiter {limiter.name!r} failed on the job's "
            f"arguments: {type(error).__name__}: {error}"
        )
        logger.error("a job of task %s (seq %d): %s", task, seq, message, extra={"task": task})
        return seq, None, _with_key_error(options, message)


def _with_key_error(options: str | None, message: str) -> str | None:
    """``options`` (JSON text) recording ``message`` under ``KEY_ERROR``; None (left as
    they are) when they are corrupt, as the job dies of that when it runs."""
    try:
        parsed = json.loads(options) if options else {}
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    parsed[KEY_ERROR] = message
    return json.dumps(parsed)
