"""The statuses a stored job can have, and the SQL terms both stores filter them with.

``STATUSES`` is the one list: ``JobStatus`` names the same values (a test holds them
equal), and the terms below are built from it. A row whose status is not in it was
written by hand, or by a newer asyncjobs sharing the store: no claim ever picks it, it
reads as ``dead`` (``info_from_row``), and so every filter on dead jobs and every bulk
action on them (``list(status="dead")``, ``purge(status="dead")``, ``retry_dead``)
takes it too, as ``DEAD_AS_READ`` does.

A ``NOT IN`` uses no index: a dead list, a ``retry_dead`` or a purge of dead jobs reads
the table newest (or oldest) first until it has its page or batch, every row when few
are dead (about 11 ms per 300,000 jobs on SQLite). These are an operator's calls, not
the job path: a partial index holding the dead rows made them index reads, but cost
every insert and finish about 1 and 2 µs per job (``bench/bench_per_job.py``, 10% of
the two statements), so there is none.
"""

from __future__ import annotations

STATUSES = ("waiting", "scheduled", "queued", "running", "succeeded", "dead", "cancelled")
"""Every status asyncjobs writes, in the order of a job's life."""

DEAD_AS_READ = "status NOT IN (" + ", ".join(f"'{s}'" for s in STATUSES if s != "dead") + ")"
"""The jobs that read as dead: dead ones, and those with a status not in ``STATUSES``."""

RETRYABLE = (
    "status NOT IN ("
    + ", ".join(f"'{s}'" for s in STATUSES if s not in ("dead", "cancelled"))
    + ")"
)
"""The jobs a manual retry takes back: those that read as dead, and cancelled ones."""

PURGEABLE = (
    "(status NOT IN ('waiting', 'scheduled', 'queued', 'cancelled') "
    "OR status = 'cancelled' AND attempts > 0 "
    "OR NOT coalesce((SELECT asyncjobs_jobs.status <> 'cancelled' "
    "OR before_it.status <> 'succeeded' FROM asyncjobs_jobs AS before_it "
    "WHERE before_it.chain_next = asyncjobs_jobs.id LIMIT 1), FALSE))"
)
"""The jobs a purge may take at first: all but a chain member after the first that has
not finished, or was cancelled before it ran behind one that did not succeed (a dead
or cancelled one). Deleted with the members after it (a purge of ``waiting`` jobs
takes them all), or as the last one, an unfinished member left no member to show the
chain broke, and the chain read ``succeeded`` though they never ran. A cancelled one
is kept, as retention keeps it, while the member before it is stored: a retry of that
one takes it back (``_RESUME_REST``), and without it finished the chain. It goes when
the same purge takes that member (each store's ``_PURGE_FOLLOWERS``). A chain's first
member may go: cancelling it first cancels the rest, which show it. (Discarding a job
by id still takes any of them.)

The member before a job is one scalar subquery, a seek in ``asyncjobs_jobs_chain_next``
per candidate row: as ``NOT EXISTS``, PostgreSQL may hash every chain member once."""

PURGE_FOLLOWER = "status = 'cancelled' AND attempts = 0"
"""A chain member that ``PURGEABLE`` (and retention's prune) keeps while the member
before it is stored, and that a purge (a prune) then takes after that member, walking
the run of them from its ``chain_next`` by id (each store's ``_PURGE_FOLLOWERS``, and
``_PRUNE_FOLLOWERS`` in its admin module), if the purge's condition (past retention)
matches it too."""
