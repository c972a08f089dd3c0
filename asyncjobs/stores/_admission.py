"""Which ready jobs a claim may take under flow control: shared by every store.

No I/O: a store reads the running counts, the bucket states and the candidate rows
inside its claim transaction, hands them to an ``Admission``, and writes back the
buckets it changed. The rules:

- a task's ``concurrency`` and a queue's ``queue_concurrency`` bound the jobs running
  in the whole store (counted before the claim, plus those it admits);
- a job of a task with its own ``rate_limit`` takes a token from ``task:<task>``; of a
  task with a named ``limiter``, from ``limiter:<name>`` under the job's rate key ('' if
  none, or if the limiter has no key function now: a key stored while it had one counts
  for nothing); it needs every bucket it uses to hold a token, or it is skipped;
- a skipped job is simply left queued (no attempt spent); ``wake_at`` records when the
  first empty bucket that held a job back gets its next token;
- while a job under a keyed limiter waits for its key (enqueued by name where its
  task was not defined), no job of that limiter behind it in claim order is taken, so
  none of its key overtakes it, whatever the state of the buckets; ``unkeyed`` tells
  the runner to compute the keys (``Runner.assign_keys``) and claim again.

Groups are filtered by the stores' SQL (only the oldest unfinished job of a group is
a candidate).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from asyncjobs._errors import ConfigurationError
from asyncjobs._ratelimit import (
    BucketState,
    RateLimit,
    bounded,
    full,
    has_token,
    next_token_at,
    refill,
    take,
)
from asyncjobs.stores._claims import ClaimRequest, TaskLimits

BucketId = tuple[str, str]
"""(name, key) of a row in asyncjobs_rate_buckets."""


MAX_EMPTY_KEYS = 10_000
"""The most keys without tokens a claimer remembers (``ClaimRequest.empty_keys``); the
others are looked at on each claim, as before."""


def has_limits(request: ClaimRequest) -> bool:
    """Whether a claim needs admission (else a store's plain claim applies)."""
    for limits in request.tasks.values():
        if limits.concurrency is not None or limits.rate_limit is not None or limits.limiter:
            return True
    if not request.queue_concurrency:
        return False
    return request.queues is None or any(q in request.queue_concurrency for q in request.queues)


def needs_running_counts(request: ClaimRequest) -> bool:
    return bool(request.queue_concurrency) or any(
        t.concurrency is not None for t in request.tasks.values()
    )


def own_bucket(task: str) -> BucketId:
    return ("task:" + task, "")


def limiter_bucket(limiter: str, key: str) -> BucketId:
    return ("limiter:" + limiter, key)


@dataclass(slots=True)
class Candidate:
    """A ready job as a claim sees it, in claim order (priority desc, seq)."""

    seq: int
    priority: int
    task: str
    queue: str
    rate_key: str  # '' when the job has none
    key_pending: bool = False  # its limiter's key waits for a worker (``unkeyed``)

    @property
    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


@dataclass(slots=True)
class Admission:
    request: ClaimRequest
    now: float
    load: Callable[[BucketId], BucketState | None]  # the stored state, None if never used
    running_tasks: Counter[str] = field(default_factory=Counter)
    running_queues: Counter[str] = field(default_factory=Counter)
    buckets: dict[BucketId, BucketState] = field(default_factory=dict)
    taken: set[BucketId] = field(default_factory=set)
    rebased: set[BucketId] = field(default_factory=set)  # counted too far ahead: bounded
    blocked_tasks: set[str] = field(default_factory=set)
    full_queues: set[str] = field(default_factory=set)
    blocked_keys: dict[str, set[str]] = field(default_factory=dict)  # limiter -> keys
    wake_at: float | None = None
    unkeyed: bool = False
    held_from: dict[str, tuple[int, int]] = field(default_factory=dict)  # limiter -> order
    chosen: list[int] = field(default_factory=list)  # the seq of the jobs admitted

    def __post_init__(self) -> None:
        """Block at once the keys an earlier claim found empty, until their next token
        (``ClaimRequest.empty_keys``): the stores' reads leave their jobs out."""
        known = self.request.empty_keys
        if not known:
            return
        limiters = {limiter_bucket(name, "")[0]: name for name in self.request.limiters}
        for (bucket, key), (limit, at) in list(known.items()):
            if at <= self.now:
                known.pop((bucket, key), None)  # due: look at it again
                continue
            limiter = limiters.get(bucket)
            if limiter is None:
                continue
            now_limit = self.request.limiters[limiter]
            if now_limit is not limit and now_limit != limit:
                continue  # the limiter was defined anew since
            self.blocked_keys.setdefault(limiter, set()).add(key)
            self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def count_running(self, rows: list[tuple[str, str, int]]) -> None:
        """Jobs running now in the whole store, as (task, queue, count) rows."""
        for task, queue, n in rows:
            self.running_tasks[task] += n
            self.running_queues[queue] += n
        for queue, limit in self.request.queue_concurrency.items():
            if self.running_queues[queue] >= limit:
                self.full_queues.add(queue)

    # -- buckets -------------------------------------------------------------------

    def bucket(self, bucket_id: BucketId, limit: RateLimit) -> BucketState:
        state = self.buckets.get(bucket_id)
        if state is None:
            state = self._loaded(bucket_id, limit, self.load(bucket_id))
        return state

    def preload(self, limit: RateLimit, states: dict[BucketId, BucketState | None]) -> None:
        """Bucket states read at once (a claim reads those of many keys in one query),
        as ``bucket`` would load them one by one; None: never used, so full."""
        for bucket_id, state in states.items():
            if bucket_id not in self.buckets:
                self._loaded(bucket_id, limit, state)

    def _loaded(
        self, bucket_id: BucketId, limit: RateLimit, state: BucketState | None
    ) -> BucketState:
        """Keep a bucket as read (None: never used, so full). One counted more than a
        refill ahead of ``now`` is bounded (``bounded``) and written back so: left as
        stored, every claim would bound it anew from its own ``now``, and it would get
        no token until the clocks caught up with it."""
        if state is None:
            state = full(limit, self.now)
        elif (trusted := bounded(limit, state, self.now)) != state:
            state = trusted
            self.rebased.add(bucket_id)
        self.buckets[bucket_id] = state
        return state

    def empty(self, bucket_id: BucketId, limit: RateLimit) -> bool:
        """Whether the bucket has no token now; if so, note when it gets one."""
        state = self.bucket(bucket_id, limit)
        if has_token(limit, refill(limit, state, self.now)):
            return False
        at = next_token_at(limit, state, self.now)
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)
        known = self.request.empty_keys
        # As stored, not as this claim left it: a claim rolled back gives its tokens back.
        if bucket_id[1] and bucket_id not in self.taken and len(known) < MAX_EMPTY_KEYS:
            known[bucket_id] = (limit, at)
        return True

    def changed_buckets(self) -> list[tuple[str, str, float, float]]:
        """(name, key, tokens, updated_at) of every bucket this claim took from or
        bounded (``_loaded``)."""
        changed = sorted(self.taken | self.rebased)
        return [(*b, self.buckets[b].tokens, self.buckets[b].updated_at) for b in changed]

    # -- tasks -----------------------------------------------------------------------

    def limits_of(self, task: str) -> tuple[TaskLimits, RateLimit | None]:
        limits = self.request.tasks[task]
        if not limits.limiter:
            return limits, None
        named = self.request.limiters.get(limits.limiter)
        if named is None:
            raise ConfigurationError(
                f"task {task!r} uses limiter {limits.limiter!r}, which is not defined; "
                f"define it with jobs.limiter({limits.limiter!r}, '10/s')"
            )
        return limits, named

    def task_open(self, task: str) -> bool:
        """Whether jobs of ``task`` may be admitted at all (checked before reading them)."""
        limits, named = self.limits_of(task)
        if limits.concurrency is not None and self.running_tasks[task] >= limits.concurrency:
            return False
        own = limits.rate_limit
        if own is not None and self.empty(own_bucket(task), own):
            return False
        # Under a limiter without keys every job draws from its shared bucket: empty, it
        # holds the task back as the task's own bucket does.
        return named is None or self.keyed(task) or not self.key_empty(task, "")

    def keyed(self, task: str) -> bool:
        """Whether ``task``'s limiter gives each key its own bucket now. Keys stored with
        jobs while the limiter had a key function (an earlier deploy) are not used once
        it has none: each would take a bucketful past the limit now set."""
        return self.request.tasks[task].limiter in self.request.keyed

    def keyed_only(self, task: str) -> bool:
        """Whether only keyed jobs of ``task`` can run: its limiter's shared bucket is empty."""
        return self.key_empty(task, "")

    def key_empty(self, task: str, key: str) -> bool:
        """Whether ``key``'s bucket of ``task``'s limiter has no token now; if so, the
        key is blocked for this claim (as ``admit`` would find it)."""
        limits, named = self.limits_of(task)
        if named is None or not limits.limiter:
            return False
        if not self.empty(limiter_bucket(limits.limiter, key), named):
            return False
        self.blocked_keys.setdefault(limits.limiter, set()).add(key)
        return True

    def blocked_keys_of(self, task: str) -> set[str]:
        limiter = self.request.tasks[task].limiter
        return self.blocked_keys.get(limiter, set()) if limiter else set()

    def keyed_tasks(self) -> list[str]:
        """The tasks whose limiter has a key function (``ClaimRequest.keyed``)."""
        keyed = self.request.keyed
        return sorted(t for t, limits in self.request.tasks.items() if limits.limiter in keyed)

    def key_pending(self, task: str, order: tuple[int, int]) -> None:
        """A job of ``task`` at ``order`` in claim order waits for its key: none of its
        limiter's jobs after it is taken in this claim (one of its key would overtake
        it), and the runner computes the keys (``unkeyed``)."""
        self.unkeyed = True
        limiter = self.request.tasks[task].limiter or ""
        held = self.held_from.get(limiter)
        self.held_from[limiter] = order if held is None else min(held, order)

    # -- one job ---------------------------------------------------------------------

    def admit(self, job: Candidate) -> bool:
        """Take the job if its task, queue and buckets allow it now."""
        if job.task in self.blocked_tasks or job.queue in self.full_queues:
            return False
        limits, named = self.limits_of(job.task)
        wanted: list[tuple[BucketId, RateLimit]] = []
        if limits.rate_limit is not None:
            own = own_bucket(job.task)
            if self.empty(own, limits.rate_limit):
                self.blocked_tasks.add(job.task)
                return False
            wanted.append((own, limits.rate_limit))
        if named is not None and limits.limiter in self.request.keyed:
            if job.key_pending:  # enqueued since the claim began
                self.key_pending(job.task, job.order)
            held = self.held_from.get(limits.limiter or "")
            if held is not None and job.order >= held:
                # Every later job of the limiter comes after it too: read none of them.
                self.blocked_tasks.update(
                    t for t, of in self.request.tasks.items() if of.limiter == limits.limiter
                )
                return False
        if named is not None and limits.limiter:
            key = job.rate_key if self.keyed(job.task) else ""
            blocked = self.blocked_keys.setdefault(limits.limiter, set())
            shared = limiter_bucket(limits.limiter, key)
            if key in blocked or self.empty(shared, named):
                blocked.add(key)
                return False
            wanted.append((shared, named))
        for bucket_id, limit in wanted:
            state = take(limit, self.buckets[bucket_id], self.now)
            if state is not None:  # always: empty() just found a token
                self.buckets[bucket_id] = state
                self.taken.add(bucket_id)
        self.running_tasks[job.task] += 1
        self.running_queues[job.queue] += 1
        if limits.concurrency is not None and self.running_tasks[job.task] >= limits.concurrency:
            self.blocked_tasks.add(job.task)
        queue_limit = self.request.queue_concurrency.get(job.queue)
        if queue_limit is not None and self.running_queues[job.queue] >= queue_limit:
            self.full_queues.add(job.queue)
        return True
