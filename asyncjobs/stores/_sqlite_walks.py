"""The walks of a SQLite claim past its window (``_sqlite_limits``): which groups, and
which keys of a keyed limiter, a claim looks at behind the first ``WINDOW`` ready jobs
of a task.

Each is found by a loose index scan in name order, a bounded number a claim
(``KEYS_PER_CLAIM``, ``GROUPS_PER_CLAIM``), going on after the last one the store's
claims looked at (``Walk``), so that each gets its turn. ``Walks`` holds a store's
walks, in its process's memory.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from asyncjobs.stores._admission import Admission

__all__ = ["GROUPS_PER_CLAIM", "KEYS_PER_CLAIM", "Walk", "Walks"]

KEYS_PER_CLAIM = 256
"""Past the window, how many keys one claim looks at (besides those it found empty in
the window): one index seek each. The next claim goes on from the last (``Walk``), so
with more keys than this each gets its turn, and the claim order between keys holds
among those a claim looks at."""

_KEYS_STEP = (
    "UNION ALL SELECT (SELECT rate_key FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_ready_key "
    "WHERE status = 'queued' AND rate_key IS NOT NULL AND behind IS NULL AND task = ? "
    "AND rate_key > keys.key ORDER BY rate_key LIMIT 1) FROM keys WHERE keys.key IS NOT NULL "
    "LIMIT ?) "
    "SELECT keys.key, h.priority, h.seq FROM keys LEFT JOIN asyncjobs_jobs AS h ON h.seq = "
    "coalesce((SELECT j.seq FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready_key "
    "WHERE j.status = 'queued' AND j.rate_key IS NOT NULL AND j.behind IS NULL AND j.task = ? "
    "AND j.rate_key = keys.key AND j.priority = ? AND j.seq > ? ORDER BY j.seq LIMIT 1), "
    "(SELECT j.seq FROM asyncjobs_jobs AS j INDEXED BY asyncjobs_jobs_ready_key "
    "WHERE j.status = 'queued' AND j.rate_key IS NOT NULL AND j.behind IS NULL AND j.task = ? "
    "AND j.rate_key = keys.key AND j.priority < ? ORDER BY j.priority DESC, j.seq LIMIT 1)) "
    "WHERE keys.key IS NOT NULL"
)
"""The common part of ``_KEYS_AFTER`` and ``_KEYS_FIRST``. A key's first job after a
point in claim order is two seeks (the rest of its priority, then the lower ones): an
``OR`` of the two would read the key's jobs from its first, the backlog of a key found
empty among them."""

_KEYS_AFTER = (
    "WITH RECURSIVE keys(key) AS (SELECT (SELECT rate_key FROM asyncjobs_jobs "  # noqa: S608
    "INDEXED BY asyncjobs_jobs_ready_key WHERE status = 'queued' AND rate_key IS NOT NULL "
    "AND behind IS NULL AND task = ? AND rate_key > ? ORDER BY rate_key LIMIT 1) " + _KEYS_STEP
)
"""The keys of a task's ready keyed jobs after a key, in key order, one index seek each
(a loose index scan), at most ``?`` of them; with each, the first of its jobs after a
point in claim order (NULL if none)."""

_KEYS_FIRST = (
    "WITH RECURSIVE keys(key) AS (SELECT (SELECT rate_key FROM asyncjobs_jobs "  # noqa: S608
    "INDEXED BY asyncjobs_jobs_ready_key WHERE status = 'queued' AND rate_key IS NOT NULL "
    "AND behind IS NULL AND task = ? ORDER BY rate_key LIMIT 1) " + _KEYS_STEP
)
"""``_KEYS_AFTER`` from the first key."""

_KEYS_WALK = "keys past the window:"
"""The ``Walk`` (with the task's name) through the keys past the window."""


def _keys_past(
    db: sqlite3.Connection, admission: Admission, task: str, end: tuple[int, int], walks: Walks
) -> list[tuple[str, int | None, int | None]]:
    """(key, priority, seq): up to ``KEYS_PER_CLAIM`` keys of ``task``'s ready keyed jobs besides
    those found empty, in key order after the last a claim looked at (``Walk``) and
    then from the first key, each with its first job after ``end`` (priority and seq
    None if none)."""
    limit = KEYS_PER_CLAIM + len(admission.blocked_keys_of(task))
    walk = walks.walk(_KEYS_WALK + task)
    after = walk.after
    tail = (task, limit, task, end[0], end[1], task, end[0])
    if after is None:
        keys = db.execute(_KEYS_FIRST, (task, *tail)).fetchall()
        at_end = len(keys) < limit
    else:
        keys = db.execute(_KEYS_AFTER, (task, after, *tail)).fetchall()
        at_end = len(keys) < limit
        if at_end:  # the last key: go round to the first ones
            first = db.execute(_KEYS_FIRST, (task, task, limit - len(keys), *tail[2:]))
            keys += [k for k in first.fetchall() if k[0] <= after]
    walks.moved(walk, keys, limit, at_end)
    return keys


GROUPS_PER_CLAIM = 256
"""Past the window, how many groups one claim looks at: one index seek each for the
group and one for its head. The next claim goes on from the last (``Walk``), so
with more groups than this each gets its turn, and the claim order between groups holds
among those a claim looks at."""

_GROUPS_STEP = (
    "UNION ALL SELECT (SELECT group_key FROM asyncjobs_jobs INDEXED BY asyncjobs_jobs_group "
    "WHERE group_key IS NOT NULL AND status IN ('scheduled', 'queued', 'running') "
    "AND group_key > groups.key ORDER BY group_key LIMIT 1) "
    "FROM groups WHERE groups.key IS NOT NULL LIMIT ?) "
    "SELECT groups.key, h.seq, h.priority, h.status, h.task, h.queue, h.rate_key, "
    "h.key_pending FROM groups LEFT JOIN asyncjobs_jobs AS h ON h.seq = "
    "(SELECT g.seq FROM asyncjobs_jobs AS g INDEXED BY asyncjobs_jobs_group "
    "WHERE g.group_key = groups.key AND g.status IN ('scheduled', 'queued', 'running') "
    "ORDER BY g.seq LIMIT 1) WHERE groups.key IS NOT NULL"
)
"""The common part of ``_GROUPS_AFTER`` and ``_GROUPS_FIRST``: with each group, its head
(its unfinished job enqueued first) and what a claim needs to know of it."""

_GROUPS_AFTER = (
    "WITH RECURSIVE groups(key) AS (SELECT (SELECT group_key FROM asyncjobs_jobs "  # noqa: S608
    "INDEXED BY asyncjobs_jobs_group WHERE group_key IS NOT NULL "
    "AND status IN ('scheduled', 'queued', 'running') AND group_key > ? "
    "ORDER BY group_key LIMIT 1) " + _GROUPS_STEP
)
"""The groups with an unfinished job after a group, in name order, one index seek each
(a loose index scan of ``asyncjobs_jobs_group``), at most ``?`` of them, each with its
head."""

_GROUPS_FIRST = (
    "WITH RECURSIVE groups(key) AS (SELECT (SELECT group_key FROM asyncjobs_jobs "  # noqa: S608
    "INDEXED BY asyncjobs_jobs_group WHERE group_key IS NOT NULL "
    "AND status IN ('scheduled', 'queued', 'running') "
    "ORDER BY group_key LIMIT 1) " + _GROUPS_STEP
)
"""``_GROUPS_AFTER`` from the first group."""

_GROUPS_WALK = "groups past the window:"
"""The ``Walk`` (with the task's name) through the groups past the window."""


def _groups_past(db: sqlite3.Connection, walk: Walk, walks: Walks) -> list[Any]:
    """(group, and its head's seq, priority, status, task, queue, rate_key, key_pending):
    up to ``GROUPS_PER_CLAIM`` groups after the last a claim looked at, then from the
    first."""
    after = walk.after
    if after is None:
        groups = db.execute(_GROUPS_FIRST, (GROUPS_PER_CLAIM,)).fetchall()
        at_end = len(groups) < GROUPS_PER_CLAIM
    else:
        groups = db.execute(_GROUPS_AFTER, (after, GROUPS_PER_CLAIM)).fetchall()
        at_end = len(groups) < GROUPS_PER_CLAIM
        if at_end:  # the last group: go round to the first ones
            first = db.execute(_GROUPS_FIRST, (GROUPS_PER_CLAIM - len(groups),)).fetchall()
            groups += [g for g in first if g[0] <= after]
    walks.moved(walk, groups, GROUPS_PER_CLAIM, at_end)
    return groups


@dataclass(slots=True)
class Walk:
    """How far a store's claims went through the groups (or keys) of a task past the
    window, in name order, a bounded number a claim: the next claim goes on after
    ``after`` (None: from the first), so each gets its turn.

    After a change, the walk goes round once (``turning``): from where it then was
    (``start``), past the last name (``passed_end``), and back there. A group it looked at
    before the change may take a job now; one it looks at after, it sees as it is."""

    after: str | None = None
    turning: bool = True  # a new walk has not been round yet
    start: str | None = None
    passed_end: bool = False

    def turn(self) -> None:
        """Go round once more, from here."""
        self.turning, self.start, self.passed_end = True, self.after, False

    def moved(self, rows: list[Any], limit: int, at_end: bool) -> None:
        """A claim read ``rows`` (name first), ``limit`` at most, after ``after`` and, if
        it came to the last name (``at_end``), then from the first."""
        again = self.passed_end and at_end  # past the end twice: round, whatever came
        self.after = rows[-1][0] if len(rows) >= limit else None
        self.passed_end = self.passed_end or at_end
        back = self.start is None or self.after is None or self.after >= self.start
        if again or (self.passed_end and back):
            self.turning = False


class Walks:
    """A store's walks past the window (``Walk``), by task, in its process's memory.

    Not in the file: a claim that took nothing and moved a cursor stored there still
    wrote, and a worker's check for other processes' writes (``PRAGMA data_version``)
    took that write for a change: behind more groups than a claim looks at, an idle
    worker claimed every 0.1 s, for good. Each process goes round on its own (every
    group still gets its turn in each); a claim that takes nothing writes nothing.

    Each walk goes round once after the file changed (``claiming``): until it is
    round, ``more`` asks the worker to claim again soon (``Claimed.partial``). Once round,
    its claims look further only at their poll or the next change."""

    def __init__(self) -> None:
        self._walks: dict[str, Walk] = {}
        self._version: int | None = None
        self.more = False  # a walk this claim moved has not been round since the change

    def claiming(self, version: int | None) -> None:
        """A claim begins; ``version``: the file's ``data_version`` before it (None:
        unknown), which changes with every write of any connection but the reader's."""
        if version is None or version != self._version:
            for walk in self._walks.values():
                walk.turn()
        self._version = version
        self.more = False

    def walk(self, name: str) -> Walk:
        return self._walks.setdefault(name, Walk())

    def moved(self, walk: Walk, rows: list[Any], limit: int, at_end: bool) -> None:
        walk.moved(rows, limit, at_end)
        self.more = self.more or walk.turning
