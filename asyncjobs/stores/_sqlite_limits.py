"""Flow control inside a SQLite claim: concurrency limits, rate-limit buckets, groups.

``choose`` runs in the connection thread, inside the claim's ``BEGIN IMMEDIATE``
transaction, so what it counts and the tokens it takes hold across every process
sharing the file. It reads the head of each task's ready jobs (one index seek per
task, see migration 0002), merges them in priority then enqueue order, lets an
``Admission`` (asyncjobs/stores/_admission.py) decide, and writes the buckets back. A
task blocked as a whole (its concurrency is full or its own bucket is empty) is not
read at all, so a held-back backlog costs one seek however long it is.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from asyncjobs._ratelimit import BucketState
from asyncjobs.stores._admission import (
    Admission,
    BucketId,
    Candidate,
    has_limits,
    needs_running_counts,
)
from asyncjobs.stores._protocol import ClaimRequest

__all__ = ["WINDOW", "choose", "has_limits"]

WINDOW = 1000
"""How many of a task's ready jobs one claim looks through in claim order. Under a keyed
limiter, the keys behind them are then found by key (``_past_window``, up to this many
keys); other jobs behind this many held back (by a group, a full queue, the shared
bucket) wait for the head of the line to move."""

_GROUP_HEAD = (
    "(j.group_key IS NULL OR NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS g "
    "WHERE g.group_key = j.group_key AND g.status IN ('scheduled', 'queued', 'running') "
    "AND (g.seq < j.seq OR g.status = 'running')))"
)


def choose(db: sqlite3.Connection, request: ClaimRequest, now: float) -> Admission:
    """Pick the jobs to claim under every limit and take their tokens.

    Returns the admission: ``chosen``, their ``seq`` in claim order; ``wake_at``, when
    a ready job was held back by an empty bucket, the earliest time one of those
    buckets gets a token; ``unkeyed``, whether a pending key held a limiter back.
    """

    def load(bucket_id: BucketId) -> BucketState | None:
        row = db.execute(
            "SELECT tokens, updated_at FROM asyncjobs_rate_buckets WHERE name = ? AND key = ?",
            bucket_id,
        ).fetchone()
        return None if row is None else BucketState(row[0], row[1])

    admission = Admission(request, now, load)
    if needs_running_counts(request):
        admission.count_running(
            db.execute(
                "SELECT task, queue, count(*) FROM asyncjobs_jobs WHERE status = 'running' "
                "GROUP BY task, queue"
            ).fetchall()
        )
    for task in admission.keyed_tasks():
        first = db.execute(_FIRST_PENDING_KEY, (task,)).fetchone()
        if first is not None:
            admission.key_pending(task, (-first[0], first[1]))
    open_tasks = []
    for task in request.tasks:
        wake_at = admission.wake_at
        if admission.task_open(task):
            open_tasks.append(task)
        elif admission.wake_at != wake_at and not _has_ready(db, task):
            admission.wake_at = wake_at  # its bucket is empty but nothing waits on it
    page = request.limit + 16
    streams = [_candidates(db, admission, task, page) for task in open_tasks]
    chosen = admission.chosen
    for job in heapq.merge(*streams, key=lambda c: c.order):
        if admission.admit(job):
            chosen.append(job.seq)
            if len(chosen) >= request.limit:
                break
    changed = admission.changed_buckets()
    if changed:
        db.executemany(
            "INSERT INTO asyncjobs_rate_buckets (name, key, tokens, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (name, key) DO UPDATE SET "
            "tokens = excluded.tokens, updated_at = excluded.updated_at",
            changed,
        )
    return admission


_FIRST_PENDING_KEY = (
    "SELECT priority, seq FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_key_pending "
    "WHERE key_pending IS NOT NULL AND status = 'queued' AND task = ? "
    "ORDER BY priority DESC, seq LIMIT 1"
)
"""The first job of a task in claim order whose rate-limit key is pending: one seek."""


def _has_ready(db: sqlite3.Connection, task: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM asyncjobs_jobs WHERE status = 'queued' AND task = ? LIMIT 1", (task,)
    ).fetchone()
    return row is not None


def _candidates(
    db: sqlite3.Connection, admission: Admission, task: str, page: int
) -> Iterator[Candidate]:
    """The task's ready jobs that may be admitted, in claim order, read page by page:
    those of the window (the first ``WINDOW`` in claim order), then, under a keyed
    limiter, those of the keys past it (``_past_window``)."""
    keyed_only = admission.keyed_only(task)
    after: tuple[int, int] | None = None
    while True:
        if task in admission.blocked_tasks:
            return
        rows = _page(db, admission, task, page, after, keyed_only)
        for seq, priority, queue, rate_key, pending in rows:
            yield Candidate(seq, priority, task, queue, rate_key or "", bool(pending))
        if len(rows) < page:
            break
        after = (rows[-1][1], rows[-1][0])
    if admission.request.tasks[task].limiter in admission.request.keyed:
        yield from _past_window(db, admission, task, keyed_only)


def _head(admission: Admission, task: str, keyed_only: bool) -> tuple[list[str], list[Any]]:
    """The terms (and their parameters) that pick the task's ready jobs for this claim."""
    where = ["status = 'queued'", "task = ?"]
    params: list[Any] = [task]
    if keyed_only:
        where.append("rate_key IS NOT NULL")
    queues = admission.request.queues
    if queues is not None:
        where.append("queue IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(queues)))
    return where, params


def _filters(admission: Admission, task: str, *, keys: bool) -> tuple[list[str], list[Any]]:
    """The terms (and their parameters) that drop the jobs no claim can take now: those
    behind another of their group, in a full queue, or (``keys``) of a key whose bucket
    is empty."""
    where = [_GROUP_HEAD]
    params: list[Any] = []
    if admission.full_queues:
        where.append("j.queue NOT IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(sorted(admission.full_queues)))
    blocked = admission.blocked_keys_of(task) if keys else None
    if blocked:
        where.append("coalesce(j.rate_key, '') NOT IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(sorted(blocked)))
    return where, params


def _page(
    db: sqlite3.Connection,
    admission: Admission,
    task: str,
    page: int,
    after: tuple[int, int] | None,
    keyed_only: bool,
) -> list[Any]:
    head_where, head_params = _head(admission, task, keyed_only)
    where, params = _filters(admission, task, keys=True)
    if after is not None:
        where.append("(j.priority < ? OR (j.priority = ? AND j.seq > ?))")
        params.extend((after[0], after[0], after[1]))
    # Only fixed terms with ? placeholders are joined; values go in params.
    sql = (
        "WITH head AS (SELECT seq, priority, queue, rate_key, group_key, key_pending "  # noqa: S608
        f"FROM asyncjobs_jobs WHERE {' AND '.join(head_where)} "
        "ORDER BY priority DESC, seq LIMIT ?) "
        "SELECT j.seq, j.priority, j.queue, j.rate_key, j.key_pending FROM head AS j "
        f"WHERE {' AND '.join(where)} ORDER BY j.priority DESC, j.seq LIMIT ?"
    )
    return db.execute(sql, (*head_params, WINDOW, *params, page)).fetchall()


_KEY_PAGE = 16
"""Jobs of one key read at a time past the window: a key with tokens rarely has more."""

_KEYS = (
    "WITH RECURSIVE keys(key) AS ("
    "SELECT (SELECT rate_key FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_ready_key "
    "WHERE status = 'queued' AND rate_key IS NOT NULL AND task = ? ORDER BY rate_key LIMIT 1) "
    "UNION ALL SELECT (SELECT rate_key FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_ready_key "
    "WHERE status = 'queued' AND rate_key IS NOT NULL AND task = ? AND rate_key > keys.key "
    "ORDER BY rate_key LIMIT 1) FROM keys WHERE keys.key IS NOT NULL LIMIT ?) "
)
"""The distinct keys of a task's ready keyed jobs, one index seek each (a loose index
scan), at most ``?`` of them: the head of ``_past_window``'s statement."""

_KEY_JOBS = (
    "FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready_key WHERE j.status = 'queued' "
    "AND j.rate_key IS NOT NULL AND j.task = ? AND j.rate_key = {key} "
    "AND (j.priority < ? OR (j.priority = ? AND j.seq > ?)) "
)
"""A key's ready jobs after a point in claim order: the common part of the statements
of ``_past_window`` (the key from ``keys``) and ``_key_candidates`` (a parameter)."""


def _past_window(
    db: sqlite3.Connection, admission: Admission, task: str, keyed_only: bool
) -> Iterator[Candidate]:
    """The keyed jobs of ``task`` behind the window, when the window is full (a claim
    got this far: it found too few jobs there it could take, its keys' buckets empty).

    One statement finds the keys of the task's ready jobs (one index seek each,
    ``WINDOW`` keys at most) and, for each key whose bucket is not known to be empty,
    its first job past the window that a claim may take; each such key then gives its
    later jobs page by page as the merge, in claim order, gets to them."""
    head_where, head_params = _head(admission, task, keyed_only)
    end = db.execute(
        "SELECT priority, seq FROM asyncjobs_jobs "  # noqa: S608 - fixed terms, ? placeholders
        f"WHERE {' AND '.join(head_where)} ORDER BY priority DESC, seq LIMIT 1 OFFSET ?",
        (*head_params, WINDOW - 1),
    ).fetchone()
    if end is None:
        return  # the window held every ready job
    where, params = _job_filters(admission, task)
    blocked = json.dumps(sorted(admission.blocked_keys_of(task)))
    # Only fixed terms with ? placeholders are joined; values go in params.
    first = f"AND {' AND '.join(where)} ORDER BY j.priority DESC, j.seq LIMIT 1) "
    heads = db.execute(
        _KEYS + "SELECT keys.key, h.seq, h.priority, h.queue FROM keys "  # noqa: S608
        "JOIN asyncjobs_jobs AS h ON h.seq = (SELECT j.seq "
        + _KEY_JOBS.format(key="keys.key")
        + first
        + "WHERE keys.key IS NOT NULL AND keys.key NOT IN (SELECT value FROM json_each(?))",
        (task, task, WINDOW, task, end[0], end[0], end[1], *params, blocked),
    ).fetchall()
    streams = [
        _key_candidates(db, admission, Candidate(seq, priority, task, queue, key))
        for key, seq, priority, queue in heads
    ]
    yield from heapq.merge(*streams, key=lambda c: c.order)


def _job_filters(admission: Admission, task: str) -> tuple[list[str], list[Any]]:
    """``_filters`` without the keys' (a key's jobs are read while its bucket has
    tokens), with the claim's queues."""
    where, params = _filters(admission, task, keys=False)
    queues = admission.request.queues
    if queues is not None:
        where.append("j.queue IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(queues)))
    return where, params


def _key_candidates(
    db: sqlite3.Connection, admission: Admission, first: Candidate
) -> Iterator[Candidate]:
    """``first``, then the later ready jobs of its key in claim order, read page by page
    until the key's bucket or the task is found blocked."""
    task, key = first.task, first.rate_key
    yield first
    after = (first.priority, first.seq)
    while task not in admission.blocked_tasks and key not in admission.blocked_keys_of(task):
        where, params = _job_filters(admission, task)
        # Only fixed terms with ? placeholders are joined; values go in params.
        rows = db.execute(
            "SELECT j.seq, j.priority, j.queue "
            + _KEY_JOBS.format(key="?")
            + f"AND {' AND '.join(where)} ORDER BY j.priority DESC, j.seq LIMIT ?",
            (task, key, after[0], after[0], after[1], *params, _KEY_PAGE),
        ).fetchall()
        for seq, priority, queue in rows:
            yield Candidate(seq, priority, task, queue, key)
        if len(rows) < _KEY_PAGE:
            return
        after = (rows[-1][1], rows[-1][0])
