"""The scheduler: turns cron and periodic slots into jobs.

Each slot is enqueued as an ordinary job whose idempotency key names the task and
the slot (``cron:{task}:{slot}``, the slot in epoch seconds), so however many
processes share a store, a slot becomes one job and runs once.

The loop (started by ``Jobs`` with the workers) wakes at the next slot of any
schedule; ``jobs.drain()`` runs one ``tick`` first, so tests with a ``FakeClock``
drive schedules by advancing the clock and draining.

Missed slots: the first tick after each start looks up the last slot this schedule
enqueued, which the store records apart from the jobs (``Store.last_slot``), so
pruning finished jobs never loses it; a schedule recorded before that existed falls
back to the idempotency keys of its recent jobs. If slots passed since then (the app
was down), the most recent one runs once at start when ``catch_up=True`` (the
default) and none runs when ``catch_up=False``. The first start after the downtime
decides: a slot it skipped (``catch_up=False``) is not run by a later start either,
whether the process that skipped it still runs, stopped or crashed. Its first tick
records the time it saw the schedule up to (``Store.seen_until``), and a first tick
counts the later of that time and the last slot. A schedule never seen in the store
has nothing to catch up: its first tick, whatever ``catch_up``, records the time it was
first seen, so that a slot missed after that, before any slot ran, is caught up (even if
the one process that saw it crashed). Not as a slot handled (``Store.seen_until``, apart
from ``Store.last_slot``): a process that saw it too without recording it (its first tick
at the same time, or an older version's ``catch_up=False`` start) may run the slot just
before that time, its tick for it late (busy, its clock behind), and would take such a
record for the slot run elsewhere. Mid-deploy, until all are replaced, processes of a
version before ``seen_until`` still record the time they first see a schedule as a slot
handled (a slot just before it that another process ticks late then runs nowhere) and
ignore ``seen_until`` (a slot missed before the first run is not caught up). A stop
records the time of the last tick as a slot: a slot of a definition changed since
(02:00 moved to 03:00) that passed while the old one ran was not missed. Unless the
last slot before that tick is one this start left alone (skipped with
``catch_up=False``, or from before the schedule was seen) and no process has recorded
it since: another process, running then, whose tick for it is late still runs it. The
stop records the time the schedule was seen up to then instead.
Later ticks enqueue the most recent slot that passed since the previous tick; if
several passed at once (the process was frozen), they are coalesced into one run. A slot
the store records as enqueued (by another process) is not enqueued again: its job may
have run and been pruned already, freeing its idempotency key, under a short retention.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from asyncjobs._arguments import Arguments
from asyncjobs._clock import within
from asyncjobs._cron import Cron, Every, Slots
from asyncjobs._cron import to_datetime as slot_datetime
from asyncjobs._errors import ConfigurationError
from asyncjobs._tasks import JobSpec, Task

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger("asyncjobs")

MAX_SLEEP = 60.0
"""Re-check at least this often (seconds), in case the wall clock jumped."""

_HISTORY_ROWS = 1000
"""How many recent jobs of a task the first tick reads to find the last slot."""


def slot_key(task: str, slot: int) -> str:
    """The idempotency key of a slot's job (``_last_slot`` parses it back)."""
    return f"cron:{task}:{slot}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleInfo:
    """A cron or periodic schedule as ``jobs.schedules()`` reports it."""

    task: str
    cron: str | None
    """The cron expression, or None for a periodic schedule."""
    timezone: str | None
    """The cron expression's time zone (IANA name), or None for a periodic schedule."""
    every: float | None
    """The period in seconds, or None for a cron schedule."""
    catch_up: bool
    next_run_at: datetime


@dataclass(slots=True, kw_only=True)
class _Schedule:
    task: Task[..., Any]
    slots: Slots
    catch_up: bool
    cursor: float | None = None  # time of this process's previous tick
    skipped: int | None = None  # the slot its first tick left alone (not run here)


class Scheduler:
    """Owns the schedules of one ``Jobs`` and enqueues their slots."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.clock = jobs.settings.clock
        self._schedules: dict[str, _Schedule] = {}
        self._nap: anyio.CancelScope | None = None  # the running loop's sleep

    # -- registration ----------------------------------------------------------------

    def decorator(
        self, slots: Slots, *, catch_up: bool, task_options: dict[str, Any]
    ) -> Callable[[Callable[[], Awaitable[Any]]], Task[[], Any]]:
        """``@jobs.cron``/``@jobs.periodic``: register the task and its schedule."""
        if not isinstance(catch_up, bool):
            raise ConfigurationError(f"catch_up must be True or False, got {catch_up!r}")

        def register(fn: Callable[[], Awaitable[Any]]) -> Task[[], Any]:
            # Judged as enqueue judges arguments: by the call the runner makes, to the
            # function registered, not by the signature a ``functools.wraps`` decorator
            # copies from the one it wraps (it may supply those arguments itself). No
            # signature to read (a builtin): the task registry judges.
            name = getattr(fn, "__qualname__", fn)
            try:
                Arguments.of(fn).check(str(name), (), {})
            except TypeError:
                raise ConfigurationError(
                    f"scheduled task {name!r} must be callable with no arguments"
                ) from None
            task: Task[[], Any] = self.jobs.task(**task_options)(fn)
            self._schedules[task.name] = _Schedule(task=task, slots=slots, catch_up=catch_up)
            # Declared while the loop sleeps (up to MAX_SLEEP, until a slot of the other
            # schedules): its first tick, now, must come before its first slot, or that
            # tick would take the slot for one from before the schedule existed.
            if self._nap is not None:
                self._nap.cancel()
            return task

        return register

    def forget_ticks(self) -> None:
        """Start every schedule afresh, as a new process would: the next tick is a first
        tick. With copies: ``replace_store`` carries the schedules of the app's own
        scheduler over, and neither the app nor a later test may see this one's ticks."""
        self._schedules = {
            name: dataclasses.replace(schedule, cursor=None, skipped=None)
            for name, schedule in self._schedules.items()
        }

    def infos(self) -> list[ScheduleInfo]:
        now = self.clock.now()
        return [
            ScheduleInfo(
                task=name,
                cron=s.slots.expr if isinstance(s.slots, Cron) else None,
                timezone=_zone_name(s.slots.tz) if isinstance(s.slots, Cron) else None,
                every=float(s.slots.seconds) if isinstance(s.slots, Every) else None,
                catch_up=s.catch_up,
                next_run_at=slot_datetime(s.slots.next_after(now)),
            )
            for name, s in sorted(self._schedules.items())
        ]

    # -- ticking ---------------------------------------------------------------------

    async def tick(self) -> int:
        """Enqueue the slots due now; return how many jobs that asked for.

        Cursors move only once the jobs are stored, so a failed tick is retried.
        """
        now = self.clock.now()
        due: list[JobSpec[Any]] = []
        slots: list[tuple[str, int]] = []
        # A copy: one declared while this tick awaits the store has its first tick next.
        schedules = list(self._schedules.items())
        for name, schedule in schedules:
            latest = schedule.slots.latest_at_or_before(now)
            if latest is None:
                continue
            if schedule.cursor is None and latest < now:  # first tick: was a slot missed?
                # Asked with catch_up=False too: it records a schedule never seen as seen.
                missed = await self._missed(name, latest, now)
                if not schedule.catch_up or not missed:
                    if missed:  # skipped for good: a later start must not run it either
                        await self.jobs.store.seen_until(name, math.floor(now))
                    schedule.skipped = latest  # left alone here (see _left_to_others)
                    continue
                logger.info(
                    "schedule %s missed its slot at %s while stopped; running it now",
                    name, slot_datetime(latest).isoformat(), extra={"task": name},
                )  # fmt: skip
            elif (
                schedule.cursor is not None and latest <= schedule.cursor
            ) or await self._ran_elsewhere(name, latest):
                continue
            spec = schedule.task.spec()
            options = dataclasses.replace(
                spec.options,
                run_at=float(latest),
                delay=None,
                idempotency_key=slot_key(name, latest),
            )
            due.append(dataclasses.replace(spec, options=options))
            slots.append((name, latest))
        if due:
            await self.jobs.enqueue_many(due)
            # After the insert: a crash in between leaves an older record, and the
            # slot's idempotency key still stops a second job at the next start.
            for name, slot in slots:
                await self.jobs.store.last_slot(name, slot)
        for _, schedule in schedules:
            schedule.cursor = now
        return len(due)

    async def _ran_elsewhere(self, task: str, slot: int) -> bool:
        """Whether another process already ticked through ``slot``, as the store records.
        Its job's idempotency key stops a second job only while that job is kept: with
        a short retention, it may have run and been pruned before this process ticks
        (busy, or its clock behind), and the key would let the slot run again."""
        recorded = await self.jobs.store.last_slot(task)
        return recorded is not None and slot <= recorded

    async def _missed(self, task: str, slot: int, now: float) -> bool:
        """Whether ``slot``, the latest before the first tick, was missed while stopped:
        it came after both the last slot recorded and the time the schedule was seen up to
        (a start with catch_up=False that skipped it recorded a time after it, as its stop
        may have: a later start leaves it too). A schedule never seen has nothing to catch
        up: its slots so far came before it existed. Its first tick records that it is seen
        from now on, so that a slot missed while the app is down before its first run is
        caught up all the same; apart from the last slot: ``slot`` may have come after
        another process saw it without recording it (see the module's docstring), whose tick
        for it is late. Asked with catch_up=False too, for that record."""
        recorded = (await self._last_slot(task, now), await self.jobs.store.seen_until(task))
        if recorded == (None, None):
            await self.jobs.store.seen_until(task, math.floor(now))
            return False
        return slot > max(time for time in recorded if time is not None)

    async def _last_slot(self, task: str, now: float) -> int | None:
        """The latest slot of ``task`` recorded, else (recorded by an older version)
        the latest in the idempotency keys of its jobs."""
        recorded = await self.jobs.store.last_slot(task)
        if recorded is not None:
            return recorded
        prefix = f"cron:{task}:"
        before: int | None = None
        seen = 0
        while seen < _HISTORY_ROWS:
            rows = await self.jobs.store.list(task=task, limit=100, before_seq=before, now=now)
            for row in rows:
                key = row.idempotency_key
                if key is not None and key.startswith(prefix) and key[len(prefix) :].isdigit():
                    return int(key[len(prefix) :])
            if len(rows) < 100:
                return None
            seen += len(rows)
            before = rows[-1].seq
        return None

    def next_wake(self) -> float:
        """The first slot after the previous tick: past already if it came while that
        tick wrote (a slow store), and then the next tick enqueues it at once."""
        now = self.clock.now()
        wake = now + MAX_SLEEP
        for schedule in self._schedules.values():
            since = now if schedule.cursor is None else min(schedule.cursor, now)
            wake = min(wake, schedule.slots.next_after(since))
        return wake

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """The scheduler loop: tick, sleep until the next slot, repeat (until cancelled).

        The first tick (catching up missed slots) happens before ``started()``. Each
        start is a first tick: slots that passed while this ``Jobs`` was stopped are
        missed slots, run or skipped as ``catch_up`` says.
        """
        for schedule in self._schedules.values():
            schedule.cursor, schedule.skipped = None, None
        ok = await self._tick_logged()
        task_status.started()
        try:
            while True:
                # After a failed tick the slots it left are due already: retry after a pause.
                if ok:
                    wake = self.next_wake()
                else:
                    wake = self.clock.now() + self.jobs.settings.poll_interval
                await self._sleep_until(wake)
                ok = await self._tick_logged()
        finally:
            with anyio.CancelScope(shield=True), within(self.clock, 5):
                await self._record_last_ticks()

    async def _sleep_until(self, wake: float) -> None:
        """Sleep until ``wake``, or until a schedule is declared (``decorator``)."""
        try:
            with anyio.CancelScope() as self._nap:
                await self.clock.sleep(max(wake - self.clock.now(), 0.0))
        finally:
            self._nap = None

    async def _record_last_ticks(self) -> None:
        """At stop: record the time of each schedule's last tick, as a slot, so that the
        next start catches up only slots that came after it. The last slot enqueued is
        not enough: a definition changed meanwhile (02:00 moved to 03:00) would take
        today's 03:00, which passed while this ran, for a slot missed while stopped.
        As the time the schedule was seen up to if that slot is left to others."""
        try:
            for name, schedule in list(self._schedules.items()):
                if schedule.cursor is None:
                    continue
                last_tick = math.floor(schedule.cursor)
                if await self._left_to_others(schedule):
                    await self.jobs.store.seen_until(name, last_tick)
                else:
                    await self.jobs.store.last_slot(name, last_tick)
        except Exception:
            logger.exception("recording the last tick of the schedules failed")

    async def _left_to_others(self, schedule: _Schedule) -> bool:
        """Whether the last slot up to the last tick is one the first tick left alone
        (``catch_up=False``: missed while stopped; or from before the schedule was seen)
        that no process has recorded yet. A process running meanwhile, whose tick for it
        comes after this stop (busy, its clock behind), runs it, unless the stop records
        a time after it as a slot: then that process takes it for a slot run here
        (``_ran_elsewhere``), and it runs nowhere. The stop records that time as the time
        the schedule was seen up to instead (``Store.seen_until``)."""
        skipped, cursor = schedule.skipped, schedule.cursor
        if skipped is None or cursor is None:
            return False
        if schedule.slots.latest_at_or_before(cursor) != skipped:
            return False  # a later tick went through a slot after it
        recorded = await self.jobs.store.last_slot(schedule.task.name)
        return recorded is None or recorded < skipped

    async def _tick_logged(self) -> bool:
        try:
            await self.tick()
        except Exception:
            logger.exception("enqueueing scheduled jobs failed; trying again shortly")
            return False
        return True


def _zone_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz)
