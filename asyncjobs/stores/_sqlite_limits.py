"""Flow control inside a SQLite claim: concurrency limits, rate-limit buckets, groups.

``choose`` runs in the connection thread, inside the claim's ``BEGIN IMMEDIATE``
transaction, so what it counts and the tokens it takes hold across every process
sharing the file. It reads the head of each task's ready jobs (one index seek per
task, see migration 0002), merges them in priority then enqueue order, lets an
``Admission`` (asyncjobs/stores/_admission.py) decide, and writes the buckets back. A
task blocked as a whole (its concurrency is full or its own bucket is empty) is not
read at all, so a held-back backlog costs one seek however long it is. The ready
indexes leave out the jobs behind another of their group (migration 0012): a group's
backlog is never read, only its first job. Past the first ``WINDOW`` ready jobs of a
task, a claim finds the heads of groups (``_group_heads``) and the jobs of keys
(``_past_window``) a bounded number at a time, going round them in turn (``Walk``, in
``_sqlite_walks`` with the scans that find those groups and keys).
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from asyncjobs._ratelimit import BucketState
from asyncjobs.stores._admission import (
    Admission,
    BucketId,
    Candidate,
    has_limits,
    limiter_bucket,
    needs_running_counts,
)
from asyncjobs.stores._claims import ClaimRequest
from asyncjobs.stores._sqlite_walks import _GROUPS_WALK, Walks, _groups_past, _keys_past

__all__ = ["WINDOW", "choose", "has_limits"]

WINDOW = 1000
"""How many of a task's ready jobs one claim looks through in claim order (a group's
backlog is not among them, only its first job). Behind them, the heads of other groups
are found by group (``_group_heads``) and, under a keyed limiter whose keys filled them
without tokens, the keys' jobs by key (``_past_window``); other jobs behind this many
held back (by a group, a full queue, the shared bucket) wait for the head of the line
to move."""

_GROUP_HEAD = (
    "(j.group_key IS NULL OR NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS g "
    "WHERE g.group_key = j.group_key AND g.status IN ('scheduled', 'queued', 'running') "
    "AND (g.seq < j.seq OR g.status = 'running')))"
)


def choose(
    db: sqlite3.Connection, request: ClaimRequest, now: float, walks: Walks | None = None
) -> Admission:
    """Pick the jobs to claim under every limit and take their tokens.

    Returns the admission: ``chosen``, their ``seq`` in claim order; ``wake_at``, when
    a ready job was held back by an empty bucket, the earliest time one of those
    buckets gets a token; ``unkeyed``, whether a pending key held a limiter back.
    ``walks``: how far the store's claims went past the window (None: from the start).
    """
    walks = Walks() if walks is None else walks

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
        elif admission.wake_at != wake_at and not _has_ready(db, request, task):
            admission.wake_at = wake_at  # its bucket is empty but nothing here waits on it
    page = request.limit + 16
    streams = [_candidates(db, admission, task, page, walks) for task in open_tasks]
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


_READY = (
    "SELECT 1 FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_ready_task "
    "WHERE status = 'queued' AND behind IS NULL AND task = ? LIMIT 1"
)

_READY_IN_QUEUES = (
    "SELECT 1 FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_counts WHERE status = 'queued' "
    "AND queue IN (SELECT value FROM json_each(?)) AND task = ? LIMIT 1"
)
"""Whether a job of a task is ready (in the queues a claim serves): a seek (per queue).
In the queues, a job behind another of its group counts too (the index of counts does
not know it): at worst the runner wakes once for a bucket it cannot use yet."""


def _has_ready(db: sqlite3.Connection, request: ClaimRequest, task: str) -> bool:
    """Whether a ready job of ``task`` waits in a queue this claim serves (one it could
    take once its bucket has a token)."""
    if request.queues is None:
        row = db.execute(_READY, (task,)).fetchone()
    else:
        row = db.execute(_READY_IN_QUEUES, (json.dumps(list(request.queues)), task)).fetchone()
    return row is not None


def _candidates(
    db: sqlite3.Connection, admission: Admission, task: str, page: int, walks: Walks
) -> Iterator[Candidate]:
    """The task's ready jobs that may be admitted, in claim order, read page by page:
    those of the window (the first ``WINDOW`` in claim order), then those past it that
    head their group (``_group_heads``) and, under a keyed limiter, those of the keys
    past it (``_past_window``), each once."""
    wake_at = admission.wake_at
    keyed_only = admission.keyed_only(task)
    if admission.wake_at != wake_at and not _has_ready(db, admission.request, task):
        admission.wake_at = wake_at  # its limiter's shared bucket is empty: none waits here
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
    if task in admission.blocked_tasks:
        return
    last, last_params = _ready(admission, task, keyed_only, last=True)
    end = db.execute(last, (*last_params, WINDOW - 1)).fetchone()
    if end is None:
        return  # the window held every ready job
    past = [_group_heads(db, admission, task, keyed_only, (end[0], end[1]), walks)]
    if admission.request.tasks[task].limiter in admission.request.keyed and (
        admission.blocked_keys_of(task)  # keys without tokens filled the window
    ):
        past.append(_past_window(db, admission, task, (end[0], end[1]), walks))
    offered: set[int] = set()  # a group's head may be its key's next job too: offer it once
    for job in heapq.merge(*past, key=lambda c: c.order):
        if job.seq not in offered:
            offered.add(job.seq)
            yield job


def _ready(
    admission: Admission, task: str, keyed_only: bool, *, last: bool = False
) -> tuple[str, list[Any]]:
    """A select of the task's ready jobs this claim may take (in its queues), in claim
    order, among its first ``WINDOW``, and its parameters; it ends in a ``LIMIT ?``, whose
    value the caller adds (``last``: the priority and seq of one, ``LIMIT 1 OFFSET ?``).

    From some queues, a walk of asyncjobs_jobs_ready_task_queue (migration 0017) a
    queue, merged in claim order: one walk of the task's ready jobs testing the queue
    read every other queue's jobs of the task on the way (214,000 VM steps a claim of
    100 behind 20,000 in another, 34,000 alone)."""
    columns = "priority, seq" if last else "seq, priority, queue, rate_key, group_key, key_pending"
    tail = "LIMIT 1 OFFSET ?" if last else "LIMIT ?"
    where = "status = 'queued' AND behind IS NULL AND task = ?"
    if keyed_only:
        where += " AND rate_key IS NOT NULL"
    queues = admission.request.queues
    if queues is None:
        return (
            f"SELECT {columns} FROM asyncjobs_jobs WHERE {where} "  # noqa: S608 - constants
            f"ORDER BY priority DESC, seq {tail}",
            [task],
        )
    arms: list[str] = []
    params: list[Any] = []
    names: list[str | None] = [*sorted(set(queues))] or [None]  # []: "queue = NULL", none
    for queue in names:
        arms.append(
            f"SELECT {columns} FROM asyncjobs_jobs "  # noqa: S608 - constants
            f"INDEXED BY asyncjobs_jobs_ready_task_queue WHERE {where} AND queue = ?"
        )
        params.extend((task, queue))
    # A compound's ORDER BY merges its arms, each read in the index's order, and stops
    # at the LIMIT; arms of their own ORDER BY ... LIMIT were each sorted again.
    union = " UNION ALL ".join(arms)
    return f"{union} ORDER BY priority DESC, seq {tail}", params


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
    head, head_params = _ready(admission, task, keyed_only)
    where, params = _filters(admission, task, keys=True)
    if after is not None:
        where.append("(j.priority < ? OR (j.priority = ? AND j.seq > ?))")
        params.extend((after[0], after[0], after[1]))
    # Only fixed terms with ? placeholders are joined; values go in params.
    sql = (
        f"WITH head AS ({head}) "  # noqa: S608 - fixed terms, ? placeholders
        "SELECT j.seq, j.priority, j.queue, j.rate_key, j.key_pending FROM head AS j "
        f"WHERE {' AND '.join(where)} ORDER BY j.priority DESC, j.seq LIMIT ?"
    )
    return db.execute(sql, (*head_params, WINDOW, *params, page)).fetchall()


_KEY_PAGE = 16
"""Jobs of one key read at a time past the window. A key whose next this many are all
held back (by their group, a full queue, a queue this worker does not serve) is left
for this claim, so a claim reads a bounded number of rows per key."""

_KEY_PAGE_SQL = (
    "WITH page AS (SELECT * FROM (SELECT seq, priority, queue, group_key FROM asyncjobs_jobs "
    "INDEXED BY asyncjobs_jobs_ready_key WHERE status = 'queued' AND rate_key IS NOT NULL "
    "AND behind IS NULL AND task = ? AND rate_key = ? AND priority = ? AND seq > ? "
    "ORDER BY seq LIMIT ?) "
    "UNION ALL SELECT * FROM (SELECT seq, priority, queue, group_key FROM asyncjobs_jobs "
    "INDEXED BY asyncjobs_jobs_ready_key WHERE status = 'queued' AND rate_key IS NOT NULL "
    "AND behind IS NULL AND task = ? AND rate_key = ? AND priority < ? "
    "ORDER BY priority DESC, seq LIMIT ?) "
    "ORDER BY priority DESC, seq LIMIT ?) "
)
"""The next ``_KEY_PAGE`` ready jobs of a key after a point in claim order (two seeks,
as in ``_KEYS_STEP``), as ``page``."""


@dataclass(slots=True)
class _KeyRead:
    """Past the window, how far one key's jobs have been read in this claim."""

    after: tuple[int, int]  # (priority, seq): its jobs after this point are not read yet
    jobs: list[Candidate] = field(default_factory=list)  # read, not yet handed out
    more: bool = True  # more of its jobs may follow ``after``


def _past_window(
    db: sqlite3.Connection, admission: Admission, task: str, end: tuple[int, int], walks: Walks
) -> Iterator[Candidate]:
    """The keyed jobs of ``task`` behind the window (after ``end``, its last job in
    claim order), when keys of its jobs were found without tokens (this claim got this
    far: it could take too few jobs there).

    One statement finds up to ``KEYS_PER_CLAIM`` keys besides those found empty, one
    index seek each (``_keys_past``), with the first job of each past the window, and
    one more reads their buckets. Their jobs are then handed out in claim order; a
    key's are read ``_KEY_PAGE`` at a time, only once the merge gets to it, and only
    while its bucket has a token."""
    blocked = admission.blocked_keys_of(task)
    heads = {
        key: (priority, seq)
        for key, priority, seq in _keys_past(db, admission, task, end, walks)
        if priority is not None and seq is not None and key not in blocked
    }
    _preload_buckets(db, admission, task, heads)
    # A heap of (claim order of the key's next job, or a point before it; key; read).
    heap = [((-p, s), key, _KeyRead(after=(p, s - 1))) for key, (p, s) in heads.items()]
    heapq.heapify(heap)
    while heap and task not in admission.blocked_tasks:
        _, key, read = heapq.heappop(heap)
        if key in admission.blocked_keys_of(task) or admission.key_empty(task, key):
            continue  # none of its jobs can be taken now
        if not read.jobs:
            _read_page(db, admission, task, key, read)
            if read.jobs:  # else none, or its next page all held back: left for now
                heapq.heappush(heap, (read.jobs[0].order, key, read))
            continue
        yield read.jobs.pop(0)
        if read.jobs:
            heapq.heappush(heap, (read.jobs[0].order, key, read))
        elif read.more:
            heapq.heappush(heap, ((-read.after[0], read.after[1]), key, read))


def _preload_buckets(
    db: sqlite3.Connection, admission: Admission, task: str, heads: dict[str, tuple[int, int]]
) -> None:
    """Read the buckets of the keys in ``heads`` in one query, rather than one by one as
    their jobs come up."""
    limits, named = admission.limits_of(task)
    if named is None or not limits.limiter:
        return
    name = limiter_bucket(limits.limiter, "")[0]
    states: dict[BucketId, BucketState | None] = {(name, key): None for key in heads}
    for key, tokens, updated_at in db.execute(
        "SELECT key, tokens, updated_at FROM asyncjobs_rate_buckets "
        "WHERE name = ? AND key IN (SELECT value FROM json_each(?))",
        (name, json.dumps(list(heads))),
    ):
        states[(name, key)] = BucketState(tokens, updated_at)
    admission.preload(named, states)


def _read_page(
    db: sqlite3.Connection, admission: Admission, task: str, key: str, read: _KeyRead
) -> None:
    """Read the next ``_KEY_PAGE`` jobs of ``key`` after ``read.after``: those a claim may
    take now (not held back by their group, a full queue, a queue not served) go to
    ``read.jobs``."""
    where, params = _filters(admission, task, keys=False)
    queues = admission.request.queues
    if queues is not None:
        where.append("j.queue IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(queues)))
    priority, seq = read.after
    # Only fixed terms with ? placeholders are joined; values go in params.
    takeable = f"({' AND '.join(where)})"
    rows = db.execute(
        _KEY_PAGE_SQL + "SELECT j.seq, j.priority, j.queue, " + takeable + " FROM page AS j "  # noqa: S608
        "ORDER BY j.priority DESC, j.seq",
        (task, key, priority, seq, _KEY_PAGE, task, key, priority, _KEY_PAGE, _KEY_PAGE, *params),
    ).fetchall()
    read.jobs = [Candidate(s, p, task, q, key) for s, p, q, ok in rows if ok]
    read.more = len(rows) == _KEY_PAGE
    if rows:
        read.after = (rows[-1][1], rows[-1][0])


_RUNNING_IN_GROUPS = (
    "SELECT DISTINCT group_key FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_status "
    "WHERE status = 'running' AND group_key IN (SELECT value FROM json_each(?))"
)
"""Which of some groups run a job: read through the running jobs, which are few (every
process's concurrency at most), not through each group's backlog."""


def _group_heads(
    db: sqlite3.Connection,
    admission: Admission,
    task: str,
    keyed_only: bool,
    end: tuple[int, int],
    walks: Walks,
) -> Iterator[Candidate]:
    """The heads of groups of ``task`` behind the window (after ``end``, its last job in
    claim order), in claim order: a group's backlog that filled the window does not
    hold up the other groups (this claim got this far: it could take too few jobs
    there).

    One statement finds up to ``GROUPS_PER_CLAIM`` groups, in name order after the
    last a claim looked at (``Walk``) and then from the first, each with its head; a head is
    a candidate if it is queued, of this task, in a queue this claim serves, after
    ``end``, and no job of its group runs (one more query, over the running jobs)."""
    if task in admission.blocked_tasks:
        return
    queues = admission.request.queues
    heads: dict[str, Candidate] = {}
    groups = _groups_past(db, walks.walk(_GROUPS_WALK + task), walks)
    for group, seq, priority, status, of, queue, rate_key, pending in groups:
        if (
            status != "queued"
            or of != task
            or (queues is not None and queue not in queues)
            or (keyed_only and rate_key is None)
            or (-priority, seq) <= (-end[0], end[1])
        ):
            continue
        heads[group] = Candidate(seq, priority, task, queue, rate_key or "", bool(pending))
    if heads:
        for (running,) in db.execute(_RUNNING_IN_GROUPS, (json.dumps(list(heads)),)):
            heads.pop(running, None)
    for job in sorted(heads.values(), key=lambda c: c.order):
        if task in admission.blocked_tasks:
            return
        yield job
