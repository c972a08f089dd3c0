"""What a claim asks of a store and gets back: ``ClaimRequest``, with each task's
``TaskLimits``, and ``Claimed``; and ``RateKeyed``, the rate-limit key a worker computed
for a job whose key was pending.

Values of the contract between asyncjobs and a database (``_protocol``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import NamedTuple

from asyncjobs._ratelimit import RateLimit
from asyncjobs.stores._job_rows import JobRow


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskLimits:
    """What the claiming process knows of one task it can run."""

    max_attempts: int  # from the worker's definition; per-job options win
    concurrency: int | None = None  # across all processes
    limiter: str | None = None  # name of the shared limiter (ClaimRequest.limiters) it draws from
    rate_limit: RateLimit | None = None  # the task's own bucket


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRequest:
    worker: str
    tasks: Mapping[str, TaskLimits]
    queues: Collection[str] | None  # None: every queue
    limit: int
    lease: float  # seconds
    queue_concurrency: Mapping[str, int] = field(default_factory=dict)
    limiters: Mapping[str, RateLimit] = field(default_factory=dict)  # named, shared buckets
    # Of ``limit``, how many are claimed ahead of a free slot (the runner's look-ahead).
    # Those skip jobs on their last attempt: a claim spends the attempt, and a crash
    # before the job starts would leave it dead without ever running. Claims under
    # concurrency or rate limits take none ahead: ``limit - ahead`` at most.
    ahead: int = 0
    # Named limiters with a key function: while a job of theirs waits for its key, the
    # claim takes none of the limiter's jobs (``Claimed.unkeyed``).
    keyed: frozenset[str] = frozenset()
    # The claimer's clock (epoch seconds), for a store whose claim waits for a lock
    # (SQLite's write lock): read once the lock is held, it gives the lease, started_at
    # and which jobs are due, instead of the claim's ``now``. None: ``now``.
    clock: Callable[[], float] | None = None
    # The claimer's memory across its claims, which a claim reads and adds to: the
    # limiter buckets of keys found without a token, each with its limit and when it
    # next gets one (``Admission``). Only time brings a token, so until then their
    # jobs are left out of a claim's reads, not tried one key at a time on each poll.
    empty_keys: MutableMapping[tuple[str, str], tuple[RateLimit, float]] = field(
        default_factory=dict
    )


class Claimed(list[JobRow]):
    """What ``claim`` may return: the claimed rows, plus ``next_token_at``, the
    earliest time a due job held back by an empty rate-limit bucket can get a
    token (None when none was held back), so the runner sleeps until then, and
    ``handed_back``: the rows include those of an earlier try whose reply was lost,
    which may match jobs the runner holds already, and ``unkeyed``: a job under a keyed
    limiter whose key is pending held back that limiter's jobs (``pending_keys``), and
    ``partial``: the claim looked at only some of the jobs it might take (SQLite, past
    its window: some of the groups or keys, the next ones at the next claim), and the
    claims have not been round them since the store last changed: claim again soon."""

    __slots__ = ("handed_back", "next_token_at", "partial", "unkeyed")

    def __init__(
        self,
        rows: Iterable[JobRow] = (),
        *,
        next_token_at: float | None = None,
        handed_back: bool = False,
        unkeyed: bool = False,
        partial: bool = False,
    ) -> None:
        super().__init__(rows)
        self.next_token_at = next_token_at
        self.handed_back = handed_back
        self.unkeyed = unkeyed
        self.partial = partial


class RateKeyed(NamedTuple):
    """The rate-limit key a worker computed for a job whose key was pending."""

    job_id: str
    rate_key: str | None  # None: the limiter's shared bucket
