"""The SQL of ``PostgresStore``'s claims: taking due jobs with ``FOR UPDATE SKIP
LOCKED``, so concurrent workers never wait on each other's rows (through the groups,
a job of a group at a time; under limits, the jobs ``_postgres_limits`` chose), and
handing out again, or giving back, what claims whose answer never came took.

Each function runs on one asyncpg connection, inside the transaction the store opened
where noted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from asyncjobs.stores._admission import has_limits
from asyncjobs.stores._postgres_finish import finish
from asyncjobs.stores._postgres_limits import (
    GROUP_IDLE,
    GROUP_TURN,
    GROUP_WALK,
    HEADS_GROUP,
    GroupWalk,
)
from asyncjobs.stores._postgres_limits import choose as choose_limited
from asyncjobs.stores._postgres_sql import COLUMNS, SELECT, job_row
from asyncjobs.stores._protocol import Claimed, ClaimRequest, JobRow, Outcome, OutcomeKind

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection


# The rows that the claims of worker $1 with the claim tokens $2 took, if it still holds
# them. Each claim (and each insert of jobs dispatched to a free slot) marks the rows it
# takes with a token of its own: no other write of this worker takes a row under it, not
# even one at the same clock reading (a started_at would match those too: a job
# dispatched here, or taken by an answered claim, that this worker runs). Rows asked to
# stop meanwhile are left to lease recovery, which ends them cancelled, never run.
_CLAIMED_BY = """status = 'running' AND worker = $1 AND claim_token = ANY($2::text[])
    AND cancel_requested_at IS NULL"""
_CLAIMED_UNSEEN = f"SELECT id, attempts FROM asyncjobs_jobs WHERE {_CLAIMED_BY} FOR UPDATE"  # noqa: S608
# ...taken again as if claimed now ($3) with a lease ending at $4 and by this claim ($5),
# so a later claim that hands out this one's rows (its answer lost too) finds them.
_CLAIMED_BEFORE = f"""UPDATE asyncjobs_jobs SET started_at = $3, lease_until = $4,
    claim_token = $5 WHERE {_CLAIMED_BY} RETURNING {SELECT}"""  # noqa: S608 - constants


async def claim_after(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    earlier: Sequence[tuple[str, float]],
    *,
    again: bool,
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """``claim`` (marking what it takes with ``claim_token``), or ``claim_again`` after
    claims that may have committed unseen: those in ``earlier``, and this claim's own
    first try if this is its retry (``again``; both tries carry the same token)."""
    moments = [*earlier, (claim_token, now + request.lease)] if again else earlier
    if moments:
        return await claim_again(conn, request, now, claim_token, moments, walk)
    return await claim(conn, request, now, claim_token, walk)


async def claim_again(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    earlier: Sequence[tuple[str, float]],
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """A claim after claims of this worker whose answer never came (a lost reply, a
    timeout): each may have committed. ``earlier`` holds the claim token and lease end
    of each. The rows they took (still running under this worker, unseen by it) come
    back with the claim's own, leased anew, so they run now rather than wait out their
    leases and spend an attempt they never had. The runner drops any it already holds
    (``handed_back``)."""
    tokens = [taken_by for taken_by, _ in earlier]
    records = await conn.fetch(
        _CLAIMED_BEFORE, request.worker, tokens, now, now + request.lease, claim_token
    )
    lost = [job_row(r) for r in records]
    limit = max(0, request.limit - len(lost))
    rows = await claim(
        conn,
        replace(request, limit=limit, ahead=min(request.ahead, limit)),
        now,
        claim_token,
        walk,
    )
    next_token_at = rows.next_token_at if isinstance(rows, Claimed) else None
    unkeyed = isinstance(rows, Claimed) and rows.unkeyed
    return Claimed(
        [*lost, *rows], next_token_at=next_token_at, handed_back=bool(lost), unkeyed=unkeyed
    )


async def release_claimed(
    conn: Connection, worker: str, earlier: Sequence[tuple[str, float]], now: float
) -> None:
    """Give back, attempt unspent, the rows the claims of a stopped ``worker`` whose
    answer never came took (``earlier``: claim token and lease end of each), as the
    runner gives back jobs it claimed ahead (inside a transaction)."""
    tokens = [taken_by for taken_by, _ in earlier]
    rows = await conn.fetch(_CLAIMED_UNSEEN, worker, tokens)
    outcomes = [
        Outcome(job_id=r["id"], worker=worker, attempt=r["attempts"], kind=OutcomeKind.RELEASE)
        for r in rows
    ]
    if outcomes:
        await finish(conn, outcomes, now)


async def claim(
    conn: Connection,
    request: ClaimRequest,
    now: float,
    claim_token: str,
    walk: GroupWalk | None = None,
) -> list[JobRow]:
    """Take up to ``request.limit`` due jobs for ``request.worker``, marked with
    ``claim_token``, this claim's own (``_CLAIMED_BY``); past a full window, through the
    groups from where ``walk`` stopped (None: from the first), moving it on."""
    if has_limits(request) and not conn.is_in_transaction():
        async with conn.transaction():  # flow control counts and takes tokens atomically
            return await claim(conn, request, now, claim_token, walk)
    # Due scheduled jobs become queued; rows another claimer holds are left to it.
    await conn.execute(
        "UPDATE asyncjobs_jobs SET status = 'queued' WHERE seq IN (SELECT seq FROM "
        "asyncjobs_jobs WHERE status = 'scheduled' AND run_at <= $1 FOR UPDATE SKIP LOCKED)",
        now,
    )
    # Of ``limit``, the ``ahead`` last in claim order skip jobs on their last attempt
    # (not under concurrency or rate limits, which take none ahead).
    limited = has_limits(request)
    limit = request.limit - request.ahead if limited else request.limit
    slots = limit if limited else limit - request.ahead
    if limit <= 0:
        return Claimed()
    names = list(request.tasks)
    attempts = json.dumps(  # non-ASCII names as themselves, as json_rows sends them
        {name: limits.max_attempts for name, limits in request.tasks.items()}, ensure_ascii=False
    )
    params: list[Any] = [now, now + request.lease, request.worker, names, attempts, slots]
    params.append(claim_token)  # $7
    queue_filter = ""
    in_queues = ""  # the queue test on any alias (_PICK_READY)
    queues = ""  # their array
    if request.queues is not None:
        params.append(sorted(set(request.queues)))  # each once: a seek each (_TAKE_READY)
        queues = f"${len(params)}::text[]"
        in_queues = f".queue = ANY({queues})"
        queue_filter = "AND j" + in_queues
    next_token_at, unkeyed = None, False
    if limited:  # concurrency, rate limits: chosen by _postgres_limits
        walk = GroupWalk() if walk is None else walk
        admission = await choose_limited(conn, replace(request, limit=limit), now, walk)
        next_token_at, unkeyed = admission.wake_at, admission.unkeyed
        if not admission.chosen:
            return Claimed(next_token_at=next_token_at, unkeyed=unkeyed)
        params.append(admission.chosen)
    turn = "NULL::text"  # (limited: no walk)
    if limited:
        taken = _TAKE_CHOSEN.format(chosen=f"${len(params)}", queues=queue_filter)
    else:
        walk = GroupWalk() if walk is None else walk
        params.append(limit)
        limit_at = len(params)
        params.append(limit + WINDOW_MORE)
        window = f"${len(params)}"
        params.append(walk.after)
        after = f"${len(params)}::text"
        taken = _TAKE_READY.format(
            plain_next=_PLAIN_NEXT_IN_QUEUES.format(queues=queues) if queues else _PLAIN_NEXT,
            grouped_first=(
                _GROUPED_FIRST_IN_QUEUES.format(queues=queues) if queues else _GROUPED_FIRST
            ),
            grouped_next=(
                _GROUPED_NEXT_IN_QUEUES.format(queues=queues) if queues else _GROUPED_NEXT
            ),
            queues_w="AND w" + in_queues if in_queues else "",
            queues_f="AND f" + in_queues if in_queues else "",
            limit=f"${limit_at}",
            window=window,
            after=after,
        )
        turn = _TURN
    # The claimed rows, each with the walk's next turn; the turn alone when it took none.
    records = await conn.fetch(
        f"""
        WITH RECURSIVE {taken}, claimed AS (
            UPDATE asyncjobs_jobs AS t SET
                status = 'running', attempts = t.attempts + 1, started_at = $1,
                lease_until = $2, worker = $3, claim_token = $7, progress = NULL,
                progress_message = NULL,
                -- never below this attempt (a manual retry allows one more)
                max_attempts = GREATEST(t.attempts + 1, {_MAX_ATTEMPTS})
            -- by seq, one seek a row (joined to taken, on a table never analysed, the
            -- whole table was read and hashed)
            WHERE t.seq = ANY(ARRAY(SELECT got FROM taken WHERE got IS NOT NULL))
            RETURNING {", ".join("t." + c for c in COLUMNS)}
        )
        SELECT claimed.*, turn.turn_after
        FROM (SELECT {turn} AS turn_after) AS turn LEFT JOIN claimed ON true
        """,  # noqa: S608 - only constants are interpolated
        *params,
    )
    if walk is not None and records and records[0]["turn_after"] is not None:
        walk.after = records[0]["turn_after"]
    claimed = [job_row(r) for r in records if r["seq"] is not None]
    claimed.sort(key=lambda r: (-r.priority, r.seq))
    return Claimed(claimed, next_token_at=next_token_at, unkeyed=unkeyed)


# A job's attempts under this claim: the claimer's definition applies unless retries
# were given at enqueue (options is written only by json.dumps; a text test cannot fail
# on a corrupt row the way a ::jsonb cast would). $5 maps each task name to its attempts:
# a jsonb object finds a name by binary search, where a table of them was read through
# once per claimed job (200 tasks: 1.3 ms a claim of 100).
_MAX_ATTEMPTS_OF = """CASE
                WHEN {t}.options LIKE '%"retries"%' THEN {t}.max_attempts
                ELSE coalesce(($5::jsonb ->> {t}.task)::int, {t}.max_attempts)
                END"""
_MAX_ATTEMPTS = _MAX_ATTEMPTS_OF.format(t="t")


# Whether job j, read by its seq (a seek in the primary key), is still queued. Not an
# index condition ("IS TRUE"): as one, on a table never analysed, PostgreSQL could read
# the job from any index on the queued jobs instead, each row it locked a read of them
# all: asyncjobs_jobs_counts, whose queued jobs of one task and queue PostgreSQL keeps
# as one key (a page, up to about 1,300 jobs), looked cheaper than the primary key.
_STILL_QUEUED = "(j.status = 'queued') IS TRUE"


# The jobs a claim under limits takes (got): those _postgres_limits chose ({chosen}), if
# still ready and heads of their group, each read by its seq (joined to the chosen
# instead, on a table never analysed the rows were read from asyncjobs_jobs_ready_task:
# the tasks' whole backlog; a subquery that locks is planned on its own). It chose
# as many as its limit at most ($6: its slots, all of it), so each row it locks it takes.
_TAKE_CHOSEN = f"""taken AS (
    SELECT j.seq AS got FROM unnest({{chosen}}::bigint[]) AS c(seq) CROSS JOIN LATERAL (
        SELECT j.seq, j.priority FROM asyncjobs_jobs AS j
        WHERE j.seq = c.seq AND {_STILL_QUEUED} AND j.task = ANY($4::text[]) {{queues}}
          AND (j.group_key IS NULL OR {HEADS_GROUP.format(j="j")})
        FOR UPDATE SKIP LOCKED) AS j
    ORDER BY j.priority DESC, j.seq LIMIT $6)"""  # noqa: S608 - constants

WINDOW_MORE = 16
"""A claim of n reads the first n + WINDOW_MORE ready jobs of groups (_TAKE_READY)."""


# The {columns} of the first job (alias j) to pass the tests {where} after row {cursor}
# in claim order: a seek in the index in claim order (priority DESC, seq) whatever the
# statistics. Not "j.priority = p AND j.seq > s ORDER BY j.seq": that order PostgreSQL
# read from the primary key, testing each later job on the way (5,000 rows a step
# behind a group's backlog); nor one test "after the cursor", which reads again every
# job before it of the same priority.
_NEXT = """(SELECT {columns} FROM asyncjobs_jobs AS j
         WHERE {where} AND j.priority >= {cursor}.priority AND j.priority <= {cursor}.priority
           AND j.seq > {cursor}.seq ORDER BY j.priority DESC, j.seq LIMIT 1)
        UNION ALL
        (SELECT {columns} FROM asyncjobs_jobs AS j
         WHERE {where} AND j.priority < {cursor}.priority ORDER BY j.priority DESC, j.seq LIMIT 1)
        LIMIT 1"""

# Whether row {x} (an alias) comes after row {y} in claim order.
_AFTER = "({x}.priority < {y}.priority OR {x}.priority = {y}.priority AND {x}.seq > {y}.seq)"


# Whether the claim at row t of taken looked past its window (where h and p, the next
# head of the window and the next job of no group, are): the window is full (e, its
# last job), none of its heads is left, and no job of no group comes before its end.
# Past that point a group's head may come first that the window does not hold.
_PAST_WINDOW = (
    f"h.seq IS NULL AND e.seq IS NOT NULL AND (p.seq IS NULL OR {_AFTER.format(x='p', y='e')})"
)

# The group a claim that read the heads past its window stopped at, the next one's
# {after}: the last of GROUPS_PER_CLAIM groups, or '' when it read every group (the next
# starts from the first); NULL when it read none (the walk stays where it was).
_TURN = f"CASE WHEN (SELECT bool_or(walked) FROM taken) THEN {GROUP_TURN} END"  # noqa: S608

# The jobs a plain claim takes (got), locked: the first {limit} ready jobs in claim
# order (priority, then enqueue order) that it may take, of the jobs of no group and of
# the heads of the groups. Only a group's head can run (one job at a time, in enqueue
# order), so walking the ready jobs in claim order walked the backlog of a large group,
# every one of them unclaimable.
#
# The heads are read from the first {window} ready jobs of any group (of the claim's
# queues, if it serves some: _GROUPED_NEXT_IN_QUEUES), in claim order (first_grouped),
# one seek each (_NEXT): read in one "ORDER BY ... LIMIT {window}", on
# a table never analysed PostgreSQL read every ready job of a group and sorted them (a
# bitmap scan: 40,000 rows a claim behind 20,000 jobs of groups). The heads among them
# that this claim may take (its tasks, its queues) come first among all heads up to the
# window's last job (window_end, when the window is full: jobs of groups may follow it).
# Past that point (a group's backlog filled the window, and the claim still wants jobs)
# the heads are read one group at a time: each group's first unfinished job (a loose
# scan of asyncjobs_jobs_group, a seek a group), if it is ready and its group runs none,
# of GROUPS_PER_CLAIM groups at most (group_first, GROUP_WALK): those after the group
# the store's last such claim stopped at ({after}: GroupWalk), then from the first. The
# claim order between groups holds among those a claim looks at, as on SQLite. The task
# and queue are tested on the rows as read (they never change): tested on the row
# joined by seq, a table never analysed had the join driven from
# asyncjobs_jobs_ready_task.
#
# taken walks the jobs in claim order, one a step from where the step before stopped
# (t): the next job of no group (p: a seek in asyncjobs_jobs_ready_plain), the next head
# of the window (h) or past it (w), whichever comes first (c); and locks it, skipping it
# if another claim holds it (or took it meanwhile), so a concurrent claim takes the next
# ones instead of coming back short. The heads are arrays in claim order, read at
# next_h and next_w (not scanned and sorted again at every step). Only the rows it
# takes are locked: locking every candidate as it was read (the first {limit} jobs of
# no group and the window's heads: up to twice {limit} and 16 more, held to the commit)
# left a concurrent claim only the jobs past them, none at all when they were every
# job. Of {limit}, those past $6 (the slots: the rest are claimed ahead) leave a job on
# its last attempt where it is, unlocked (spare), but count it (considered), so the
# claim stops where it did, as on SQLite. The walk through the groups (walk_heads,
# GROUP_WALK) runs only once a step looks past the window (walked). The first row of
# taken is no job: the start.
# {queues_w}, {queues_f}: the queue filter on w and f ("" for every queue).
#
# The task is no index condition in _PLAIN's seeks ("IS TRUE"): as one, on a table never
# analysed, PostgreSQL read the first step's jobs from asyncjobs_jobs_ready_task_plain
# (by task) and sorted them, every queued job of the claim's tasks (a million rows).
_PLAIN = "j.status = 'queued' AND j.group_key IS NULL AND (j.task = ANY($4::text[])) IS TRUE"
_PLAIN_NEXT = _NEXT.format(where=_PLAIN, cursor="t", columns="j.priority, j.seq")

# ...of a claim from some queues ({queues}: their array, each once): the first of each
# queue's next job of no group, each a seek in asyncjobs_jobs_ready_queue (migration
# 17). One walk of asyncjobs_jobs_ready_plain testing the queue read through every
# other queue's jobs before (100,000 rows a claim of 100 behind 100,000 in another).
_PLAIN_NEXT_IN_QUEUES = f"""SELECT n.priority, n.seq FROM unnest({{queues}}) AS q(queue)
        CROSS JOIN LATERAL ({
    _NEXT.format(where=_PLAIN + " AND j.queue = q.queue", cursor="t", columns="j.priority, j.seq")
}) AS n ORDER BY n.priority DESC, n.seq LIMIT 1"""  # noqa: S608 - constants
_GROUPED = "j.status = 'queued' AND j.group_key IS NOT NULL"
_GROUPED_COLUMNS = "j.seq, j.priority, j.group_key, j.task, j.queue"
_GROUPED_FIRST = f"""SELECT 1, {_GROUPED_COLUMNS} FROM asyncjobs_jobs AS j
     WHERE {_GROUPED} ORDER BY j.priority DESC, j.seq LIMIT 1"""  # noqa: S608 - constants
_GROUPED_NEXT = _NEXT.format(where=_GROUPED, cursor="f", columns=_GROUPED_COLUMNS)
# ...of a claim from some queues ({queues}): each queue's first or next job of a group,
# a seek each in asyncjobs_jobs_ready_queue_grouped (migration 20), and the first of
# them. The window of every queue's was filled by other queues' groups: the claim then
# found its queues' heads only on its walk through the groups past the window
# (GROUPS_PER_CLAIM a claim, in name order), none at all while those were others'.
_GROUPED_FIRST_IN_QUEUES = f"""SELECT 1, n.* FROM unnest({{queues}}) AS q(queue)
     CROSS JOIN LATERAL (SELECT {_GROUPED_COLUMNS} FROM asyncjobs_jobs AS j
        WHERE {_GROUPED} AND j.queue = q.queue ORDER BY j.priority DESC, j.seq LIMIT 1) AS n
     ORDER BY n.priority DESC, n.seq LIMIT 1"""  # noqa: S608 - constants
_GROUPED_NEXT_IN_QUEUES = f"""SELECT n.* FROM unnest({{queues}}) AS q(queue)
        CROSS JOIN LATERAL ({
    _NEXT.format(where=_GROUPED + " AND j.queue = q.queue", cursor="f", columns=_GROUPED_COLUMNS)
}) AS n ORDER BY n.priority DESC, n.seq LIMIT 1"""  # noqa: S608 - constants
_TAKE_READY = f"""first_grouped (n, seq, priority, group_key, task, queue) AS (
    ({{grouped_first}})
    UNION ALL
    SELECT f.n + 1, x.* FROM first_grouped AS f CROSS JOIN LATERAL (
        {{grouped_next}}) AS x
    WHERE f.n < {{window}}
), window_heads AS MATERIALIZED (
    SELECT array_agg(w.seq ORDER BY w.priority DESC, w.seq) AS seqs,
        array_agg(w.priority ORDER BY w.priority DESC, w.seq) AS priorities
    FROM first_grouped AS w
    WHERE w.task = ANY($4::text[]) {{queues_w}} AND {HEADS_GROUP.format(j="w")}
), window_end AS MATERIALIZED (
    SELECT w.seq, w.priority FROM first_grouped AS w
    WHERE (SELECT count(*) FROM first_grouped) >= {{window}}
    ORDER BY w.priority, w.seq DESC LIMIT 1
), {GROUP_WALK}, walk_heads AS MATERIALIZED (
    SELECT array_agg(f.seq ORDER BY f.priority DESC, f.seq) AS seqs,
        array_agg(f.priority ORDER BY f.priority DESC, f.seq) AS priorities
    FROM group_first AS f, window_end AS e  -- past the window: those in it are its heads
    WHERE {_AFTER.format(x="f", y="e")}
      AND f.status = 'queued' AND f.task = ANY($4::text[]) {{queues_f}}
      AND {GROUP_IDLE.format(j="f")}
), taken (priority, seq, considered, got, walked, next_h, next_w) AS (
    SELECT 2147483647, 0::bigint, 0, NULL::bigint, false, 1, 1
    UNION ALL
    SELECT c.priority, c.seq, t.considered + (l.seq IS NOT NULL OR a.spare IS TRUE)::int,
        l.seq, t.walked OR {_PAST_WINDOW},
        t.next_h + (c.seq = h.seq IS TRUE)::int, t.next_w + (c.seq = w.seq IS TRUE)::int
    FROM taken AS t
    LEFT JOIN window_end AS e ON true
    LEFT JOIN LATERAL (
        {{plain_next}}
    ) AS p ON true
    LEFT JOIN LATERAL (
        SELECT h.priorities[t.next_h] AS priority, h.seqs[t.next_h] AS seq
        FROM window_heads AS h
    ) AS h ON true
    LEFT JOIN LATERAL (
        SELECT w.priorities[t.next_w] AS priority, w.seqs[t.next_w] AS seq
        FROM walk_heads AS w WHERE {_PAST_WINDOW}
        LIMIT 1  -- (one row: kept a subquery, so the walk runs only past the window)
    ) AS w ON true
    LEFT JOIN LATERAL (
        SELECT n.priority, n.seq
        FROM (VALUES (p.priority, p.seq), (h.priority, h.seq), (w.priority, w.seq))
            AS n(priority, seq)
        WHERE n.seq IS NOT NULL ORDER BY n.priority DESC, n.seq LIMIT 1
    ) AS c ON true
    LEFT JOIN LATERAL (
        SELECT CASE WHEN t.considered >= $6 THEN (
            SELECT j.attempts + 1 >= {_MAX_ATTEMPTS_OF.format(t="j")} FROM asyncjobs_jobs AS j
            WHERE j.seq = c.seq) END AS spare
    ) AS a ON true
    LEFT JOIN LATERAL (
        SELECT j.seq FROM asyncjobs_jobs AS j
        WHERE a.spare IS NOT TRUE AND j.seq = c.seq AND {_STILL_QUEUED}
          AND (t.considered < $6 OR j.attempts + 1 < {_MAX_ATTEMPTS_OF.format(t="j")})
        FOR UPDATE SKIP LOCKED
    ) AS l ON true
    WHERE t.seq IS NOT NULL AND t.considered < {{limit}}
)"""  # noqa: S608 - constants
