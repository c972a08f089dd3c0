"""The statuses a stored job can have, and the SQL terms both stores filter them with.

``STATUSES`` is the one list: ``JobStatus`` names the same values (a test holds them
equal), and the terms below are built from it. A row whose status is not in it was
written by hand, or by a newer asyncjobs sharing the store: no claim ever picks it, it
reads as ``dead`` (``info_from_row``), and so every filter on dead jobs and every bulk
action on them (``list(status="dead")``, ``purge(status="dead")``, ``retry_dead``)
takes it too, as ``DEAD_AS_READ`` does.

The migrations that create ``asyncjobs_jobs_dead`` (``migrations/*/*_dead_index.sql``)
spell ``DEAD_AS_READ`` out: a partial index is used only by a query whose condition is
the same expression, so a dead list reads that index (dead rows only), not every row.
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
