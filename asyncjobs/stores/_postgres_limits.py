"""Flow control inside a PostgreSQL claim: the counterpart of ``_sqlite_limits``.

``choose`` runs inside the claim's transaction. It first takes a transaction-level
advisory lock for the store's schema, so claims under limits from every host are
serialised (a plain claim, with no limits configured, never takes it): the running
counts it reads and the tokens it takes cannot race another claimer. Then it reads
the head of each open task's ready jobs in one round trip (of a group, only its head:
``_HEADS``), merges them in priority then enqueue order, and lets an ``Admission``
(asyncjobs/stores/_admission.py) decide; a task whose page was all held back by keyed
buckets is read further, up to ``WINDOW`` rows.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

from asyncjobs._ratelimit import BucketState
from asyncjobs.stores._admission import (
    Admission,
    BucketId,
    Candidate,
    limiter_bucket,
    needs_running_counts,
    own_bucket,
)
from asyncjobs.stores._protocol import ClaimRequest
from asyncjobs.stores._sqlite_limits import WINDOW

if TYPE_CHECKING:
    import asyncpg

    from asyncjobs.stores._postgres_sql import Connection

# Whether the group of {j} (an alias) runs no job: a seek in asyncjobs_jobs_group_busy.
# OFFSET 0 keeps it a subquery run for each row, with the group as its index condition:
# as a join, planned while the statistics said no job of a group ran, each test read
# every running job of any group (the index whole), even those of another claim not yet
# committed (each fetched from the table to be found invisible): a claim of 100 beside
# 100 running read 11,600 index entries, 35,000 past a full window.
GROUP_IDLE = """NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS g
        WHERE g.group_key = {j}.group_key AND g.group_key IS NOT NULL AND g.status = 'running'
        OFFSET 0)"""

# Whether job {j} (an alias) heads its group: no earlier job of its group unfinished,
# and none running. Two tests of a seek each (asyncjobs_jobs_group,
# asyncjobs_jobs_group_busy): one test of both ("earlier or running") read every
# unfinished job of the group to find none running. OFFSET 0, as in GROUP_IDLE: as an
# anti-join, on a table never analysed, the first test read every unfinished job of any
# group for each job it tested (a bitmap scan of asyncjobs_jobs_group, the group and seq
# only a join filter: 116,000 index entries for a claim of 100 beside 1,000 groups).
HEADS_GROUP = (
    """NOT EXISTS (SELECT 1 FROM asyncjobs_jobs AS g
        WHERE g.group_key = {j}.group_key AND g.status IN ('scheduled', 'queued', 'running')
        AND g.seq < {j}.seq OFFSET 0)
    AND """  # noqa: S608 - constants
    + GROUP_IDLE
)

_GROUP_FIRST = """group_key, seq, status, task, queue, priority, rate_key, key_pending
     FROM asyncjobs_jobs"""

GROUPS_PER_CLAIM = 256
"""Past a full window, how many groups one claim looks at (``GROUP_WALK``): a seek each.
The next claim goes on from the last (``GroupWalk``), so with more groups than this each
gets its turn, as on SQLite (asyncjobs/stores/_sqlite_walks.py)."""


class GroupWalk:
    """How far a store's claims went through the groups past a full window, in name
    order (``GROUP_WALK``): the next such claim looks at the groups after ``after`` ('':
    from the first), then from the first, ``GROUPS_PER_CLAIM`` at most.

    Kept in the store's memory, not in the database: a cursor written by every claim
    would make concurrent claims wait on its row. Each store goes round on its own."""

    __slots__ = ("after",)

    def __init__(self) -> None:
        self.after = ""


# group_first: the first unfinished job of GROUPS_PER_CLAIM groups at most (a loose scan
# of asyncjobs_jobs_group, a seek a group), numbered (depth) in name order from the
# group after {after} ('' at first), then from the first up to {after}. Reading every
# group read 60,000 rows a claim behind 10,000 groups.
GROUP_WALK = f"""group_after AS (
    (SELECT 1 AS depth, {_GROUP_FIRST}
     WHERE group_key > {{after}} AND status IN ('scheduled', 'queued', 'running')
     ORDER BY group_key, seq LIMIT 1)
    UNION ALL
    SELECT f.depth + 1, n.* FROM group_after AS f CROSS JOIN LATERAL (
        SELECT {_GROUP_FIRST}
        WHERE group_key > f.group_key AND status IN ('scheduled', 'queued', 'running')
        ORDER BY group_key, seq LIMIT 1) AS n
    WHERE f.depth < {GROUPS_PER_CLAIM}
), group_before AS (
    (SELECT (SELECT count(*) FROM group_after) + 1 AS depth, {_GROUP_FIRST}
     WHERE group_key <= {{after}} AND status IN ('scheduled', 'queued', 'running')
       AND (SELECT count(*) FROM group_after) < {GROUPS_PER_CLAIM}
     ORDER BY group_key, seq LIMIT 1)
    UNION ALL
    SELECT f.depth + 1, n.* FROM group_before AS f CROSS JOIN LATERAL (
        SELECT {_GROUP_FIRST}
        WHERE group_key > f.group_key AND group_key <= {{after}}
          AND status IN ('scheduled', 'queued', 'running')
        ORDER BY group_key, seq LIMIT 1) AS n
    WHERE f.depth < {GROUPS_PER_CLAIM}
), group_first AS (
    SELECT * FROM group_after UNION ALL SELECT * FROM group_before
)"""  # noqa: S608 - constants
GROUP_TURN = f"""coalesce((SELECT group_key FROM group_first
    WHERE depth = {GROUPS_PER_CLAIM}), '')"""  # noqa: S608 - constants
"""Where the next walk goes on (its {after}), once group_first was read: after the last
of GROUPS_PER_CLAIM groups, or from the first ('') when it read every group."""

# The next {page} ($3) ready jobs of each task ($1, with $2: whether only its keyed jobs
# may run) in claim order that can run by their group: of no group, or their group's
# head. Only a group's head can run, so walking a task's ready jobs walked the backlog
# of its large groups, every one of them unclaimable. The first {walk} ($4) of them are
# walked: the heads among them come first among the task's heads, so when there are
# {page} of them, or the walk read every ready job of the task, they are the answer.
# Otherwise (a group's backlog fills the walk) the task's jobs of no group are read
# (asyncjobs_jobs_ready_task_plain), and each group's first unfinished job (a loose
# scan of asyncjobs_jobs_group, a seek a group, read once for all tasks and only if a
# task needs it), if it is ready and its group runs none, of GROUPS_PER_CLAIM groups
# (GROUP_WALK, from the one after $5); such a task also gives a row of no job whose
# turn is where the next claim's walk goes on. {where_j}, {where_h}: further tests
# (_heads), on the walked jobs and the groups' heads; {walk}, {plain}: the walk and the
# task's jobs of no group (_WALK, _PLAIN; from some queues, _WALK_IN_QUEUES and
# _PLAIN_IN_QUEUES).
_HEADS = (
    "WITH RECURSIVE "  # noqa: S608 - constants
    + GROUP_WALK
    + """, group_heads AS MATERIALIZED (
    SELECT f.* FROM group_first AS f WHERE f.status = 'queued' AND """
    + GROUP_IDLE.format(j="f")
    + """
)
SELECT t.name, c.seq, c.priority, c.queue, c.rate_key, c.key_pending,
    CASE WHEN c.seq IS NULL THEN """
    + GROUP_TURN
    + """ END AS turn
FROM unnest($1::text[], $2::bool[]) AS t(name, keyed_only) CROSS JOIN LATERAL (
    WITH walk AS MATERIALIZED (
        {walk}
    ), heads AS MATERIALIZED (
        SELECT w.seq, w.priority, w.queue, w.rate_key, w.key_pending FROM walk AS w
        WHERE w.group_key IS NULL OR {heads_w}
    ), enough AS MATERIALIZED (
        SELECT (SELECT count(*) FROM heads) >= $3 OR (SELECT count(*) FROM walk) < $4 AS yes
    )
    (SELECT * FROM heads WHERE (SELECT yes FROM enough)
     UNION ALL
     ({plain})
     UNION ALL
     SELECT h.seq, h.priority, h.queue, h.rate_key, h.key_pending FROM group_heads AS h
     WHERE NOT (SELECT yes FROM enough) AND h.task = t.name {where_h}
     ORDER BY priority DESC, seq LIMIT $3)
    UNION ALL  -- the task read the groups past its walk: where the next claim goes on
    SELECT NULL, NULL, NULL, NULL, NULL WHERE NOT (SELECT yes FROM enough)
) AS c"""
)

_COLUMNS = "j.seq, j.priority, j.queue, j.rate_key, j.key_pending"
_WALK = f"""SELECT {_COLUMNS}, j.group_key
        FROM asyncjobs_jobs AS j WHERE j.status = 'queued' AND j.task = t.name {{where_j}}
        ORDER BY j.priority DESC, j.seq LIMIT $4"""  # noqa: S608 - constants
_PLAIN = f"""SELECT {_COLUMNS} FROM asyncjobs_jobs AS j
      WHERE NOT (SELECT yes FROM enough)
        AND j.status = 'queued' AND j.group_key IS NULL AND j.task = t.name {{where_j}}
      ORDER BY j.priority DESC, j.seq LIMIT $3"""  # noqa: S608 - constants

# From some queues ({queues}: their array, each once), the same a queue at a time, each
# queue's first in claim order, then the first of them all: the jobs of no group and of
# groups apart, a walk each of asyncjobs_jobs_ready_task_queue_plain and _grouped
# (migration 20). Read through the task's ready jobs of every queue, testing the queue,
# a claim of 100 read 20,200 rows behind 20,000 jobs of the task in another queue.
_IN_QUEUE = "j.status = 'queued' AND j.task = t.name AND j.queue = q.queue"
_WALK_IN_QUEUES = f"""SELECT w.* FROM unnest({{queues}}) AS q(queue) CROSS JOIN LATERAL (
            (SELECT {_COLUMNS}, j.group_key FROM asyncjobs_jobs AS j
             WHERE {_IN_QUEUE} AND j.group_key IS NULL {{where_j}}
             ORDER BY j.priority DESC, j.seq LIMIT $4)
            UNION ALL
            (SELECT {_COLUMNS}, j.group_key FROM asyncjobs_jobs AS j
             WHERE {_IN_QUEUE} AND j.group_key IS NOT NULL {{where_j}}
             ORDER BY j.priority DESC, j.seq LIMIT $4)
        ) AS w ORDER BY w.priority DESC, w.seq LIMIT $4"""  # noqa: S608 - constants
_PLAIN_IN_QUEUES = f"""SELECT p.* FROM unnest({{queues}}) AS q(queue) CROSS JOIN LATERAL (
          SELECT {_COLUMNS} FROM asyncjobs_jobs AS j
          WHERE NOT (SELECT yes FROM enough) AND {_IN_QUEUE} AND j.group_key IS NULL {{where_j}}
          ORDER BY j.priority DESC, j.seq LIMIT $3) AS p
      ORDER BY p.priority DESC, p.seq LIMIT $3"""  # noqa: S608 - constants

WALK = 4
"""A task's next n heads are looked for among its next WALK * n ready jobs (_HEADS)."""

_FIRST_PENDING_KEYS = (
    "SELECT t.task, p.priority, p.seq FROM unnest($1::text[]) AS t(task) CROSS JOIN LATERAL "
    "(SELECT priority, seq FROM asyncjobs_jobs WHERE key_pending IS NOT NULL "
    "AND status = 'queued' AND task = t.task ORDER BY priority DESC, seq LIMIT 1) AS p"
)
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('asyncjobs claim ' || current_schema()))"

# Of the chosen jobs ($1), those this claim locks: still queued, heads of their group,
# and held by no other transaction (a plain claim's, a cancel's). Each read by its seq,
# as the claim's take reads them (_postgres_claim._TAKE_CHOSEN), which then skips none.
_LOCK_CHOSEN = f"""SELECT j.seq FROM unnest($1::bigint[]) AS c(seq) CROSS JOIN LATERAL (
    SELECT j.seq FROM asyncjobs_jobs AS j
    WHERE j.seq = c.seq AND (j.status = 'queued') IS TRUE
      AND (j.group_key IS NULL OR {HEADS_GROUP.format(j="j")})
    FOR UPDATE SKIP LOCKED) AS j"""  # noqa: S608 - constants


async def choose(conn: Connection, request: ClaimRequest, now: float, walk: GroupWalk) -> Admission:
    """Pick the jobs to claim under every limit and take their tokens (in a transaction);
    past a task's walk, through the groups from where ``walk`` stopped, moving it on.

    Returns the admission: ``chosen``, their ``seq`` in claim order, each locked by this
    transaction; ``wake_at``, when a ready job was held back by an empty bucket, the
    earliest time one of those buckets gets a token; ``unkeyed``, whether a pending key
    held a limiter back.

    Other claimers are serialised, but not the other writers of queued rows (a plain
    claim, a cancel): a chosen job one of them holds the take would skip, and its token
    was spent for nothing (the task ran below its rate while others claimed). So the
    chosen are locked before their tokens are written, and if any was held, the choice
    is made again without it (rare: another round trip or two).
    """
    await conn.execute(_LOCK)
    after, held = walk.after, set[int]()
    while True:
        walk.after = after
        admission = await _admit(conn, request, now, walk, held)
        chosen = admission.chosen
        locked = {r["seq"] for r in await conn.fetch(_LOCK_CHOSEN, chosen)} if chosen else set()
        if len(locked) == len(chosen):
            break
        held.update(seq for seq in chosen if seq not in locked)
    changed = admission.changed_buckets()
    if changed:
        await conn.executemany(
            "INSERT INTO asyncjobs_rate_buckets (name, key, tokens, updated_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (name, key) DO UPDATE SET "
            "tokens = excluded.tokens, updated_at = excluded.updated_at",
            changed,
        )
    return admission


async def _admit(
    conn: Connection, request: ClaimRequest, now: float, walk: GroupWalk, held: set[int]
) -> Admission:
    """``choose``'s choice, its tokens not yet written, passing over the jobs in
    ``held`` (locked by another transaction)."""
    stored: dict[BucketId, BucketState] = {}
    admission = Admission(request, now, stored.get)
    if needs_running_counts(request):
        rows = await conn.fetch(
            "SELECT task, queue, count(*) AS n FROM asyncjobs_jobs WHERE status = 'running' "
            "GROUP BY task, queue"
        )
        admission.count_running([(r["task"], r["queue"], int(r["n"])) for r in rows])
    wanted = [own_bucket(t) for t, lim in request.tasks.items() if lim.rate_limit is not None]
    wanted += [limiter_bucket(lim.limiter, "") for lim in request.tasks.values() if lim.limiter]
    await _load(conn, stored, wanted)

    keyed = admission.keyed_tasks()
    if keyed:  # the first job of each task whose key is pending: a seek each
        for r in await conn.fetch(_FIRST_PENDING_KEYS, keyed):
            admission.key_pending(r["task"], (-r["priority"], r["seq"]))
    open_tasks: list[str] = []
    for task in request.tasks:
        wake_at = admission.wake_at
        if admission.task_open(task):
            open_tasks.append(task)
        elif admission.wake_at != wake_at and not await _has_ready(conn, request, task):
            admission.wake_at = wake_at  # its bucket is empty but nothing here waits on it
    keyed_only: dict[str, bool] = {}
    for task in open_tasks:
        wake_at = admission.wake_at
        keyed_only[task] = admission.keyed_only(task)
        if admission.wake_at != wake_at and not await _has_ready(conn, request, task):
            admission.wake_at = wake_at  # its limiter's shared bucket is empty: none waits here
    page = request.limit + 16
    buffers, turn = await _first_pages(conn, request, open_tasks, keyed_only, page, walk.after)
    await _load_keyed(conn, admission, stored, [c for b in buffers.values() for c in b])
    read = {task: len(rows) for task, rows in buffers.items()}
    exhausted = {task: len(rows) < page for task, rows in buffers.items()}
    heap = [(rows[0].order, task) for task, rows in buffers.items() if rows]
    heapq.heapify(heap)
    chosen = admission.chosen
    while heap and len(chosen) < request.limit:
        _, task = heapq.heappop(heap)
        job = buffers[task].popleft()
        if job.seq not in held and admission.admit(job):
            chosen.append(job.seq)
        if (
            not buffers[task]
            and not exhausted[task]
            and read[task] < WINDOW
            and task not in admission.blocked_tasks
        ):
            more, next_turn = await _next_page(
                conn, admission, task, keyed_only[task], job, page, walk.after
            )
            turn = next_turn if turn is None else turn
            await _load_keyed(conn, admission, stored, more)
            buffers[task].extend(more)
            read[task] += len(more)
            exhausted[task] = len(more) < page
        if buffers[task]:
            heapq.heappush(heap, (buffers[task][0].order, task))
    if turn is not None:  # (every page of this claim read the same groups)
        walk.after = turn
    return admission


async def _load(
    conn: Connection, stored: dict[BucketId, BucketState], wanted: list[BucketId]
) -> None:
    wanted = [b for b in dict.fromkeys(wanted) if b not in stored]
    if not wanted:
        return
    rows = await conn.fetch(
        "SELECT b.name, b.key, b.tokens, b.updated_at FROM asyncjobs_rate_buckets AS b "
        "JOIN unnest($1::text[], $2::text[]) AS w(name, key) "
        "ON b.name = w.name AND b.key = w.key",
        [b[0] for b in wanted],
        [b[1] for b in wanted],
    )
    for r in rows:
        stored[(r["name"], r["key"])] = BucketState(r["tokens"], r["updated_at"])


async def _load_keyed(
    conn: Connection,
    admission: Admission,
    stored: dict[BucketId, BucketState],
    jobs: list[Candidate],
) -> None:
    """Read the buckets of the keys these candidates draw from, in one query."""
    wanted = []
    for job in jobs:
        limiter = admission.request.tasks[job.task].limiter
        if limiter and job.rate_key:
            wanted.append(limiter_bucket(limiter, job.rate_key))
    await _load(conn, stored, wanted)


# Whether task $1 has a ready job (in queues $2): its first in claim order, a seek in
# asyncjobs_jobs_ready_task. Not any first one ("LIMIT 1" alone): a task that had none,
# on an analysed table of many finished jobs, PostgreSQL expected to meet soon in a read
# of the table from the start, and read it whole (200,000 rows).
_READY = (
    "SELECT 1 FROM asyncjobs_jobs WHERE status = 'queued' AND task = $1 "
    "ORDER BY priority DESC, seq LIMIT 1"
)
# In queues: the queue is only a filter there (of the indexes of queued jobs only
# asyncjobs_jobs_ready_queue has it, migration 17, without the task: the plain claim's),
# so a task whose ready jobs all wait in other queues has them all read (100,000 rows,
# 1,539-1,925 pages), as the limited claim's own walk does (_HEADS).
_READY_IN_QUEUES = (
    "SELECT 1 FROM asyncjobs_jobs WHERE status = 'queued' AND task = $1 "
    "AND queue = ANY($2::text[]) ORDER BY priority DESC, seq LIMIT 1"
)


async def _has_ready(conn: Connection, request: ClaimRequest, task: str) -> bool:
    """Whether a ready job of ``task`` waits in a queue this claim serves (one it could
    take once its bucket has a token)."""
    if request.queues is None:
        row = await conn.fetchval(_READY, task)
    else:
        row = await conn.fetchval(_READY_IN_QUEUES, task, list(request.queues))
    return row is not None


async def _first_pages(
    conn: Connection,
    request: ClaimRequest,
    tasks: list[str],
    keyed_only: dict[str, bool],
    page: int,
    after: str,
) -> tuple[dict[str, deque[Candidate]], str | None]:
    """The head of every open task's ready jobs, in one round trip; and where the next
    claim's walk through the groups goes on if this one read them (``after``: where
    this one's starts), else None."""
    buffers: dict[str, deque[Candidate]] = {task: deque() for task in tasks}
    if not tasks:
        return buffers, None
    params: list[Any] = [tasks, [keyed_only[t] for t in tasks], page, WALK * page, after]
    queues = None
    if request.queues is not None:
        params.append(sorted(set(request.queues)))  # each once: a walk each
        queues = f"${len(params)}::text[]"
    turn = None
    for r in await conn.fetch(_heads([], queues), *params):
        if r["seq"] is None:
            turn = r["turn"]
        else:
            buffers[r["name"]].append(_candidate(r, r["name"]))
    return buffers, turn


async def _next_page(
    conn: Connection,
    admission: Admission,
    task: str,
    keyed_only: bool,
    after: Candidate,
    page: int,
    groups_after: str,
) -> tuple[list[Candidate], str | None]:
    """The task's next ready jobs after ``after``, skipping full queues and empty keys
    (past its walk, of the groups after ``groups_after``, then from the first); and
    where the next claim's walk goes on if this page read the groups, else None."""
    params: list[Any] = [
        [task], [keyed_only], page, WALK * page, groups_after, after.priority, after.seq
    ]  # fmt: skip
    where = ["({x}.priority < $6 OR ({x}.priority = $6 AND {x}.seq > $7))"]
    queues = None
    if admission.request.queues is not None:  # those not full, each once: a walk each
        served = set(admission.request.queues) - admission.full_queues
        params.append(sorted(served))
        queues = f"${len(params)}::text[]"
    if admission.full_queues:
        params.append(sorted(admission.full_queues))
        where.append(f"NOT ({{x}}.queue = ANY(${len(params)}::text[]))")
    blocked = admission.blocked_keys_of(task)
    if blocked:
        params.append(sorted(blocked))
        where.append(f"NOT (coalesce({{x}}.rate_key, '') = ANY(${len(params)}::text[]))")
    rows = await conn.fetch(_heads(where, queues), *params)
    turn = next((r["turn"] for r in rows if r["seq"] is None), None)
    return [_candidate(r, task) for r in rows if r["seq"] is not None], turn


def _heads(where: list[str], queues: str | None = None) -> str:
    """_HEADS with the tests ``where`` (of alias ``{x}``, values in parameters); from some
    queues, ``queues``: their array (a parameter)."""
    where = ["(NOT t.keyed_only OR {x}.rate_key IS NOT NULL)", *where]
    where_j = "".join(" AND " + w.format(x="j") for w in where)
    where_h = "".join(" AND " + w.format(x="h") for w in where)
    if queues is None:
        walk, plain = _WALK.format(where_j=where_j), _PLAIN.format(where_j=where_j)
    else:
        walk = _WALK_IN_QUEUES.format(queues=queues, where_j=where_j)
        plain = _PLAIN_IN_QUEUES.format(queues=queues, where_j=where_j)
        where_h += f" AND h.queue = ANY({queues})"
    return _HEADS.format(
        walk=walk,
        plain=plain,
        where_h=where_h,
        heads_w=HEADS_GROUP.format(j="w"),
        after="$5::text",
    )


def _candidate(record: asyncpg.Record, task: str) -> Candidate:
    return Candidate(
        record["seq"], record["priority"], task, record["queue"], record["rate_key"] or "",
        bool(record["key_pending"]),
    )  # fmt: skip
