"""The SQL of ``SQLiteStore``'s claim: due jobs made ready, then the ready jobs taken
in claim order (under concurrency and rate limits, those ``_sqlite_limits`` chooses),
and a runner's finish-and-claim.

Each function takes the sqlite3 connection it runs on as its first argument (as in
``_sqlite_sql``), and runs inside the ``BEGIN IMMEDIATE`` transaction the store opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from asyncjobs.stores._claims import Claimed, ClaimRequest
from asyncjobs.stores._outcomes import Outcome
from asyncjobs.stores._sqlite_finish import _finish
from asyncjobs.stores._sqlite_limits import choose, has_limits
from asyncjobs.stores._sqlite_sql import _SELECT, _row
from asyncjobs.stores._sqlite_walks import Walks

_ANY_QUEUED = "SELECT 1 FROM asyncjobs_jobs WHERE status = 'queued' LIMIT 1"


DUE_PER_CLAIM = 1000
"""The most scheduled jobs a claim makes queued: a claim runs on the event loop thread,
and 100,000 jobs due at once (a newsletter at 9:00) held it 0.4 s. The rest are queued
by the claims that follow at once (the runner wakes for a due job), those due longest
first: up to about 40 ms of work each. Priorities order the jobs made ready; a
high-priority job due later than 1,000 others waits for those to be made ready (as
Sidekiq's scheduled poller moves jobs in order of due time), not for them to run."""


def _claim(
    db: sqlite3.Connection,
    request: ClaimRequest,
    now: float,
    walks: Walks | None = None,
    version: int | None = None,
) -> Claimed:
    """``walks``: the store's walks past the window (``Walks``; None: from the start),
    and ``version`` the file's data version read before the claim."""
    if walks is not None:
        walks.claiming(version)
    # The write lock is held (BEGIN IMMEDIATE): read the time now. ``now`` was read
    # before any wait for another process's lock, and a lease counted from it would be
    # written short by that wait, even already expired.
    if request.clock is not None:
        now = request.clock()
    db.execute(
        # INDEXED BY: as in next_run_at, the due rows only, not every scheduled one.
        "UPDATE asyncjobs_jobs SET status = 'queued' WHERE seq IN (SELECT seq FROM "
        "asyncjobs_jobs INDEXED BY asyncjobs_jobs_scheduled WHERE status = 'scheduled' "
        "AND run_at <= ? ORDER BY run_at LIMIT ?)",
        (now, DUE_PER_CLAIM),
    )
    if not db.execute(_ANY_QUEUED).fetchall():
        # Nothing ready (a runner's claim with each write of outcomes, an idle poll):
        # a probe of the status index costs a twentieth of the claim's statement.
        return Claimed()
    slots = request.limit - request.ahead
    claimed = _claim_ready(db, request, slots, now, walks, last_attempts=True)
    # More may be ready: look ahead (not under concurrency or rate limits, which choose
    # jobs by their own rules).
    if request.ahead and len(claimed) == slots and not has_limits(request):
        ahead = _claim_ready(db, request, request.ahead, now, walks, last_attempts=False)
        claimed.extend(ahead)
        claimed.sort(key=lambda r: (-r.priority, r.seq))
    return claimed


# A job's attempts under this claim: the claimer's definition applies unless retries
# were given at enqueue. Corrupt options must not fail the whole claim (the runner
# sends that job to dead); CASE evaluates in order, so json_extract sees valid JSON.
# The two parameters are ``_task_attempts``: the tasks whose attempts differ from the
# usual, and the usual (every claimed job's task is one of the claimer's).
_MAX_ATTEMPTS = """CASE
                WHEN options IS NOT NULL AND NOT json_valid(options) THEN max_attempts
                WHEN json_extract(options, '$.retries') IS NOT NULL THEN max_attempts
                ELSE coalesce((SELECT value FROM json_each(?) WHERE key = task), ?)
                END"""


def _task_attempts(request: ClaimRequest) -> tuple[str, int]:
    """``_MAX_ATTEMPTS``' parameters: as a JSON object, the claimer's tasks whose attempts
    differ from the most common number, and that number. The object is read through for
    each claimed job, so it holds only the exceptions (with every task in it, a claim
    of 100 by a worker of 200 tasks took three times one of a single task's)."""
    counts = Counter(limits.max_attempts for limits in request.tasks.values())
    usual = counts.most_common(1)[0][0] if counts else 1
    others = {n: t.max_attempts for n, t in request.tasks.items() if t.max_attempts != usual}
    return json.dumps(others), usual


def _claim_ready(
    db: sqlite3.Connection,
    request: ClaimRequest,
    limit: int,
    now: float,
    walks: Walks | None,
    *,
    last_attempts: bool,
) -> Claimed:
    """Claim up to ``limit`` ready jobs in claim order; without ``last_attempts``,
    leave those about to start their last attempt where they are."""
    if limit <= 0:
        return Claimed()
    attempts = _task_attempts(request)
    params: list[Any] = [now, now + request.lease, request.worker, *attempts]
    next_token_at, unkeyed, partial = None, False, False
    if has_limits(request):  # concurrency, rate limits: chosen in Python, same transaction
        admission = choose(db, replace(request, limit=limit), now, walks)
        next_token_at, unkeyed = admission.wake_at, admission.unkeyed
        partial = walks is not None and walks.more
        if not admission.chosen:
            return Claimed(next_token_at=next_token_at, unkeyed=unkeyed, partial=partial)
        pick = "SELECT value FROM json_each(?)"
        params.append(json.dumps(admission.chosen))
    elif request.queues is None:  # the fast path: one statement
        params.extend((json.dumps(list(request.tasks)), limit))
        pick = _PICK_READY
    else:  # each queue's first ``limit``, then the first ``limit`` of them all
        picks: list[str] = []
        for queue in sorted(set(request.queues)):
            picks.append(_PICK_QUEUE)
            params.extend((queue, json.dumps(list(request.tasks)), limit))
        if not picks:  # queues=[]: none
            picks.append(_PICK_NONE)
        params.append(limit)
        pick = _PICK_QUEUES.format(picks=" UNION ALL ".join(picks))
    spare = ""
    if not last_attempts:  # the next ``limit`` in order, less those on their last attempt
        spare = f"AND attempts + 1 < {_MAX_ATTEMPTS}"
        params.extend(attempts)
    rows = db.execute(
        f"""
        UPDATE asyncjobs_jobs SET
            status = 'running', attempts = attempts + 1, started_at = ?, lease_until = ?,
            worker = ?, progress = NULL, progress_message = NULL,
            -- never below this attempt (a manual retry allows one more)
            max_attempts = max(attempts + 1, {_MAX_ATTEMPTS})
        WHERE seq IN ({pick}) AND status = 'queued' {spare}
        RETURNING {_SELECT}
        """,  # noqa: S608 - only constants are interpolated
        params,
    ).fetchall()
    claimed = Claimed(sorted((_row(r) for r in rows), key=lambda r: (-r.priority, r.seq)))
    claimed.next_token_at, claimed.unkeyed, claimed.partial = next_token_at, unkeyed, partial
    return claimed


# INDEXED BY: without ANALYZE statistics the planner prefers the (status, seq) index
# and sorts every queued row on each claim (38 ms per claim with a 100k backlog); the
# partial ready index yields them already in claim order (0.04 ms). It leaves out the
# jobs behind another of their group (migration 0012), so a group's backlog is not read;
# the group's first job is still checked (a later one of its group may run).
_READY_HEAD = """j.status = 'queued' AND j.behind IS NULL
              AND j.task IN (SELECT value FROM json_each(?))
              AND (j.group_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM asyncjobs_jobs AS g
                    WHERE g.group_key = j.group_key
                      AND g.status IN ('scheduled', 'queued', 'running')
                      AND (g.seq < j.seq OR g.status = 'running')))"""
_PICK_READY = f"""
            SELECT j.seq FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready
            WHERE {_READY_HEAD}
            ORDER BY j.priority DESC, j.seq
            LIMIT ?"""  # noqa: S608 - constants
# A claim from some queues: the first jobs of each queue in claim order (_PICK_QUEUE, a
# walk of asyncjobs_jobs_ready_queue each, migration 0014), then the first of them all.
# One walk of asyncjobs_jobs_ready testing the queue read every other queue's jobs
# before them (1,400,000 VM steps a claim of 100 behind 100,000 in another queue).
_PICK_QUEUE = f"""SELECT * FROM (
            SELECT j.seq, j.priority FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready_queue
            WHERE j.queue = ? AND {_READY_HEAD}
            ORDER BY j.priority DESC, j.seq LIMIT ?)"""  # noqa: S608 - constants
_PICK_NONE = "SELECT NULL AS seq, NULL AS priority WHERE false"
_PICK_QUEUES = """
            SELECT seq FROM ({picks}) ORDER BY priority DESC, seq LIMIT ?"""


def _finish_and_claim(
    db: sqlite3.Connection,
    outcomes: Sequence[Outcome],
    request: ClaimRequest,
    now: float,
    walks: Walks | None = None,
    version: int | None = None,
) -> tuple[list[str], Claimed]:
    applied = _finish(db, outcomes, now)
    return applied, _claim(db, request, now, walks, version)
