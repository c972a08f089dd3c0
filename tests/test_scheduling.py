"""Cron and periodic schedules: slots run once, across processes, DST, after downtime."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from asyncjobs import ConfigurationError, Job, Jobs, JobStatus, ScheduleInfo, StoreError
from asyncjobs._retention import prune_expired
from asyncjobs.stores._job_rows import Inserted, NewJob
from asyncjobs.testing import FakeClock, drain

MakeJobs = Callable[..., Jobs]

ROME = ZoneInfo("Europe/Rome")
DAY = 86_400


def at(year: int, month: int, day: int, hour: int, minute: int, tz: tzinfo = ROME) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def register_counter(jobs: Jobs, runs: list[float], *, every: float | timedelta | None = None,
                     cron: str | None = None, timezone: str = "UTC",
                     catch_up: bool = True) -> None:  # fmt: skip
    """Register the task "tick" on ``jobs``; each run appends the clock's time to ``runs``."""

    async def tick() -> None:
        runs.append(jobs.clock.now())

    if every is not None:
        jobs.periodic(every=every, name="tick", catch_up=catch_up)(tick)
    else:
        assert cron is not None
        jobs.cron(cron, timezone=timezone, name="tick", catch_up=catch_up)(tick)


async def run_for(jobs_list: list[Jobs], clock: FakeClock, total: float, step: float) -> None:
    """Advance the clock by ``step`` until ``total`` passed, draining every Jobs each step."""
    for _ in range(round(total / step)):
        clock.advance(step)
        for jobs in jobs_list:
            await drain(jobs)


async def test_a_five_minute_periodic_over_an_hour_runs_twelve_times(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs()
    runs: list[float] = []
    register_counter(jobs, runs, every=timedelta(minutes=5))
    await drain(jobs)
    await run_for([jobs], clock, 3600, 60)
    assert len(runs) == 12
    slots = {info.run_at.timestamp() for info in await jobs.list(task="tick")}
    assert len(slots) == 12
    assert all(slot % 300 == 0 for slot in slots), "slots are multiples of 5 minutes"


async def test_a_ten_minute_cron_over_an_hour_with_two_processes_runs_six_times(
    make_jobs: MakeJobs, db_url: str
) -> None:
    clock = FakeClock(start=datetime(2026, 11, 23, 9, 3, tzinfo=UTC))
    first, second = make_jobs(db_url, clock=clock), make_jobs(db_url, clock=clock)
    runs: list[float] = []
    register_counter(first, runs, cron="*/10 * * * *")
    register_counter(second, runs, cron="*/10 * * * *")
    await drain(first)
    await drain(second)
    await run_for([first, second], clock, 3600, 60)
    assert sorted(runs) == [at(2026, 11, 23, 9, m, tz=UTC) for m in (10, 20, 30, 40, 50)] + [
        at(2026, 11, 23, 10, 0, tz=UTC)
    ]
    assert len(await first.list(task="tick")) == 6


async def test_two_processes_ticking_the_same_slot_store_one_job(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    first, second = make_jobs(db_url), make_jobs(db_url)
    register_counter(first, [], every=60)
    register_counter(second, [], every=60)
    await first.scheduler.tick()
    await second.scheduler.tick()
    clock.advance(60)
    assert await first.scheduler.tick() == 1
    # The store records the slot as enqueued: the second does not ask again (ticking at
    # once, both would, and the slot's idempotency key would keep one job).
    assert await second.scheduler.tick() == 0
    (job,) = await first.list(task="tick")
    assert job.idempotency_key is not None
    assert job.idempotency_key.startswith("cron:tick:")
    assert job.run_at.timestamp() % 60 == 0


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # Spring forward (2026-03-29 02:00 -> 03:00): 02:30 does not exist; runs once at 03:30.
        (
            datetime(2026, 3, 28, 3, 0, tzinfo=ROME),
            [(2026, 3, 29, 3, 30), (2026, 3, 30, 2, 30), (2026, 3, 31, 2, 30)],
        ),
        # Fall back (2026-10-25 03:00 -> 02:00): 02:30 happens twice; runs once, the first.
        (
            datetime(2026, 10, 24, 3, 0, tzinfo=ROME),
            [(2026, 10, 25, 2, 30), (2026, 10, 26, 2, 30), (2026, 10, 27, 2, 30)],
        ),
    ],
    ids=["spring-forward", "fall-back"],
)
async def test_a_daily_0230_job_runs_once_each_day_across_a_dst_change(
    make_jobs: MakeJobs, start: datetime, expected: list[tuple[int, ...]]
) -> None:
    clock = FakeClock(start=start)
    jobs = make_jobs(clock=clock)
    runs: list[float] = []
    register_counter(jobs, runs, cron="30 2 * * *", timezone="Europe/Rome")
    await drain(jobs)
    await run_for([jobs], clock, 3 * 86400 + 7200, 1800)
    local = [datetime.fromtimestamp(t, ROME) for t in runs]
    assert [d.timetuple()[:5] for d in local] == expected
    if start.month == 10:
        assert local[0].utcoffset() == timedelta(hours=2), "the first 02:30 (summer time)"


async def test_an_hourly_cron_follows_the_real_clock_through_the_repeated_hour(
    make_jobs: MakeJobs,
) -> None:
    clock = FakeClock(start=datetime(2026, 10, 25, 0, 30, tzinfo=ROME))
    jobs = make_jobs(clock=clock)
    runs: list[float] = []
    register_counter(jobs, runs, cron="0 * * * *", timezone="Europe/Rome")
    await drain(jobs)
    await run_for([jobs], clock, 5 * 3600, 600)
    assert [r - runs[0] for r in runs] == [0, 3600, 7200, 10800, 14400], "hourly in real time"


async def missed_slot_setup(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock, *, catch_up: bool
) -> tuple[Jobs, list[float]]:
    """Run an hourly schedule once in one process, stop it for five hours, start another."""
    clock.advance(3600 - clock.now() % 3600 + 120)  # 2 minutes past an hour
    first = make_jobs(db_url)
    runs: list[float] = []
    register_counter(first, runs, every=3600, catch_up=catch_up)
    await drain(first)
    await run_for([first], clock, 3600, 600)
    assert len(runs) == 1
    await first.close()
    clock.advance(5 * 3600)  # down over five slots
    second = make_jobs(db_url)
    register_counter(second, runs, every=3600, catch_up=catch_up)
    return second, runs


async def test_after_downtime_the_most_recent_missed_slot_runs_once_at_start(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    second, runs = await missed_slot_setup(make_jobs, db_url, clock, catch_up=True)
    await drain(second)
    await drain(second)
    latest = clock.now() // 3600 * 3600
    assert runs[1:] == [clock.now()]
    (caught_up, _) = await second.list(task="tick")
    assert caught_up.run_at.timestamp() == latest
    assert caught_up.idempotency_key == f"cron:tick:{int(latest)}"
    clock.advance(3600)  # and the schedule goes on
    await drain(second)
    assert len(runs) == 3


async def test_after_downtime_longer_than_retention_the_missed_slot_still_runs(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    clock.advance(DAY - clock.now() % DAY + 120)
    first = make_jobs(db_url, retention=3600)
    runs: list[float] = []
    register_counter(first, runs, every=DAY)
    await run_for([first], clock, DAY, 3600)
    assert len(runs) == 1
    clock.advance(2 * 3600)
    await prune_expired(first)  # the slot's job is gone, as a weekly prune would do
    assert await first.list(task="tick") == []
    await first.close()
    clock.advance(2 * DAY)  # down over two slots
    second = make_jobs(db_url)
    register_counter(second, runs, every=DAY)
    await drain(second)
    assert runs[1:] == [clock.now()]  # the latest missed slot, once


async def test_a_pruned_slot_is_not_run_again_after_a_restart(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    """An older slot kept longer (dead) than the newer one (succeeded, pruned) is not
    taken for the last that ran: the newer one is not run a second time."""
    clock.advance((DAY - clock.now() % DAY - 60) % DAY)  # to a minute before midnight
    first = make_jobs(db_url, retention=3600, dead_retention=30 * DAY)
    runs: list[float] = []

    @first.periodic(every=DAY, name="payout", retries=0)
    async def payout() -> None:
        runs.append(first.clock.now())
        if len(runs) == 1:
            raise RuntimeError("bank offline")

    await drain(first)
    await run_for([first], clock, DAY + 3600, 3600)  # two slots: dead, then succeeded
    assert len(runs) == 2
    clock.advance(2 * 3600)
    await prune_expired(first)
    assert [i.status for i in await first.list(task="payout")] == ["dead"]
    await first.close()
    clock.advance(3600)  # a restart the same day: no slot missed
    second = make_jobs(db_url)
    second.periodic(every=DAY, name="payout")(payout.fn)
    await drain(second)
    assert len(runs) == 2


async def test_after_downtime_missed_slots_are_skipped_without_catch_up(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    second, runs = await missed_slot_setup(make_jobs, db_url, clock, catch_up=False)
    await drain(second)
    assert len(runs) == 1
    clock.advance(3600)
    await drain(second)
    assert len(runs) == 2


async def test_a_new_schedule_does_not_run_a_slot_from_before_it_existed(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    clock.advance(3600 - clock.now() % 3600 + 120)
    jobs = make_jobs()
    runs: list[float] = []
    register_counter(jobs, runs, every=3600)
    await drain(jobs)
    assert runs == []
    assert await jobs.list() == []


async def test_a_slot_missed_while_down_is_caught_up_even_before_the_schedule_first_ran(
    make_jobs: MakeJobs, db_url: str
) -> None:
    """A nightly job deployed at 10:00 whose app is down over its first 02:00: that slot
    was missed after the schedule existed, so it runs at the restart."""
    clock = FakeClock(start=datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
    first = make_jobs(db_url, clock=clock)
    runs: list[float] = []
    register_counter(first, runs, cron="0 2 * * *")
    await drain(first)
    await run_for([first], clock, 15 * 3600, 3600)  # until 01:00: no slot yet
    assert runs == []
    await first.close()
    clock.advance(2 * 3600)  # down over 02:00
    second = make_jobs(db_url, clock=clock)
    register_counter(second, runs, cron="0 2 * * *")
    await drain(second)
    assert runs == [clock.now()]
    (caught_up,) = await second.list(task="tick")
    assert caught_up.run_at == datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("down_over", [1, 3], ids=["one-slot", "three-slots"])
async def test_a_slot_missed_after_only_a_process_without_catch_up_saw_the_schedule_is_caught_up(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock, *, down_over: int
) -> None:
    """Only a process with catch_up=False ran the schedule, and it ended before any slot
    came (a crash: no stop record; ``drain`` ticks without the loop that writes one). The
    app was down over the next slots: they came after the schedule was seen, so a process
    with catch_up=True runs the latest of them once, and none from before."""
    clock.advance(3600 - clock.now() % 3600 + 120)  # 2 minutes past an hour
    first = make_jobs(backend_url)
    runs: list[float] = []
    register_counter(first, runs, every=3600, catch_up=False)
    await drain(first)
    await run_for([first], clock, 1800, 600)  # no slot yet
    assert runs == []
    await first.close()
    clock.advance(down_over * 3600)
    second = make_jobs(backend_url)
    register_counter(second, runs, every=3600)
    await drain(second)
    assert runs == [clock.now()]
    (caught_up,) = await second.list(task="tick")
    assert caught_up.run_at.timestamp() == clock.now() // 3600 * 3600


@pytest.mark.parametrize("slot_ran", [False, True], ids=["no-slot-ran", "a-slot-ran"])
@pytest.mark.parametrize("stopped", [False, True], ids=["crashed", "stopped"])
async def test_a_slot_skipped_by_the_first_start_without_catch_up_is_not_run_by_a_later_start(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock, *, stopped: bool, slot_ran: bool
) -> None:
    """The app was down over a slot; the first process to start after it has
    catch_up=False and skips it. A process started later with catch_up=True does not run
    it: whether the first stopped (its stop record) or crashed (none), and whether or not
    a slot ran before, the first start after the downtime decided."""
    clock.advance(3600 - clock.now() % 3600 + 120)  # 2 minutes past an hour
    first = make_jobs(backend_url)
    runs: list[float] = []
    register_counter(first, runs, every=3600)
    await drain(first)  # the schedule is seen
    if slot_ran:
        await run_for([first], clock, 3600, 600)
        assert len(runs) == 1
    await first.close()  # no stop record: drain ticks without the loop
    clock.advance(3600)  # down over a slot
    skipping = make_jobs(backend_url)
    register_counter(skipping, runs, every=3600, catch_up=False)
    if stopped:
        async with skipping:
            pass
    else:
        await drain(skipping)
    await skipping.close()
    clock.advance(600)
    later = make_jobs(backend_url)
    register_counter(later, runs, every=3600)
    await drain(later)
    assert len(runs) == (1 if slot_ran else 0)
    assert len(await later.list(task="tick")) == len(runs)


async def test_a_schedule_moved_to_a_later_time_does_not_run_again_at_the_next_start(
    make_jobs: MakeJobs, db_url: str
) -> None:
    """The nightly job ran at 02:00; at 10:00 the app is stopped and the next version,
    which runs it at 03:00, started: today's 03:00 was not missed while the app was
    down (it was running then), so the job does not run a second time today."""
    clock = FakeClock(start=datetime(2026, 11, 23, 1, 30, tzinfo=UTC))
    first = make_jobs(db_url, clock=clock)
    runs: list[float] = []
    register_counter(first, runs, cron="0 2 * * *")
    async with first:
        with anyio.fail_after(5):
            clock.advance(1800)
            while not runs:
                await anyio.lowlevel.checkpoint()
            # Once the scheduler sleeps (its next look a minute on), run until 10:00.
            while not any(entry[0] == clock.now() + 60 for entry in clock._sleepers):
                await anyio.lowlevel.checkpoint()
            clock.advance(8 * 3600)  # running until 10:00; then stopped for the deploy
            while first.scheduler._schedules["tick"].cursor != clock.now():
                await anyio.lowlevel.checkpoint()
    second = make_jobs(db_url, clock=clock)
    register_counter(second, runs, cron="0 3 * * *")
    async with second:
        pass
    assert len(runs) == 1
    assert len(await second.list(task="tick")) == 1


async def test_a_new_schedule_moved_before_it_first_ran_does_not_run_at_the_next_start(
    make_jobs: MakeJobs, db_url: str
) -> None:
    """Deployed at 10:00, nightly at 02:00, stopped at 12:00 for the next version, which
    runs it at 11:00: today's 11:00 was not missed while the app was down (it was running
    then), though no slot ran yet: the stop records the time it was seen up to."""
    clock = FakeClock(start=datetime(2026, 11, 23, 10, 0, tzinfo=UTC))
    first = make_jobs(db_url, clock=clock)
    runs: list[float] = []
    register_counter(first, runs, cron="0 2 * * *")
    async with first:
        with anyio.fail_after(5):
            clock.advance(2 * 3600)
            while first.scheduler._schedules["tick"].cursor != clock.now():
                await anyio.lowlevel.checkpoint()
    second = make_jobs(db_url, clock=clock)
    register_counter(second, runs, cron="0 11 * * *")
    async with second:
        pass
    assert runs == []
    assert await second.list(task="tick") == []


async def test_a_slot_missed_by_another_running_process_is_not_run_twice(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    """A process joining late sees the slot already stored by the one that runs."""
    first = make_jobs(db_url)
    runs: list[float] = []
    register_counter(first, runs, every=600)
    await drain(first)
    await run_for([first], clock, 1200, 300)
    second = make_jobs(db_url)
    register_counter(second, runs, every=600)
    await drain(second)
    await drain(first)
    assert len(runs) == 2


async def test_a_slot_pruned_before_another_process_ticks_is_not_run_twice(
    make_jobs: MakeJobs, backend_url: str, clock: FakeClock
) -> None:
    """With a short retention, the slot's job ran and was pruned before the second process
    ticked through the slot (it lagged: busy, or its clock behind): the idempotency key
    is free again, but the store's record of the slot says it ran."""
    clock.advance((3600 - clock.now() % 3600 - 30) % 3600)  # to 30 s before an hour
    first = make_jobs(backend_url, retention=0)
    second = make_jobs(backend_url, retention=0)
    runs: list[float] = []
    register_counter(first, runs, every=3600)
    register_counter(second, runs, every=3600)
    await drain(first)
    await drain(second)
    clock.advance(30)
    await drain(first)
    assert len(runs) == 1
    clock.advance(1)
    await prune_expired(first)
    assert await first.list(task="tick") == []
    await drain(second)
    assert len(runs) == 1
    clock.advance(3600)  # the next slot still runs, once
    await drain(second)
    await drain(first)
    assert len(runs) == 2


async def test_a_slot_skipped_at_a_start_without_catch_up_still_runs_in_a_process_running(
    make_jobs: MakeJobs, backend_url: str
) -> None:
    """A process started just after a slot with catch_up=False skips it (missed while it
    was stopped), and stopped within the second: the other process, running all along
    but whose tick for the slot comes later (its clock a little behind, or busy), still
    runs it. The stop recorded the time of its last tick, after the slot, and the
    running process took the slot for one run elsewhere: it ran nowhere."""
    slot = at(2026, 11, 23, 10, 0, tz=UTC)
    behind = FakeClock(start=slot - 30)
    running = make_jobs(backend_url, clock=behind)
    runs: list[float] = []
    register_counter(running, runs, every=3600)
    await drain(running)  # ticking, the slot not come yet by its clock
    restarted = make_jobs(backend_url, clock=FakeClock(start=slot + 0.5))
    register_counter(restarted, runs, every=3600, catch_up=False)
    async with restarted:
        assert await restarted.list(task="tick") == []  # skipped here
    behind.advance(30)
    await drain(running)
    assert runs == [slot]


@pytest.mark.parametrize("stopped", [False, True], ids=["ticking", "stopped"])
@pytest.mark.parametrize("previous", [False, True], ids=["this-release", "previous-release"])
async def test_a_slot_just_before_a_catch_up_process_starts_runs_once_though_another_ticks_late(
    make_jobs: MakeJobs, backend_url: str, monkeypatch: pytest.MonkeyPatch, *,
    stopped: bool, previous: bool,
) -> None:  # fmt: skip
    """Mid-deploy, processes disagree on catch_up: one with catch_up=False runs the
    schedule, no slot come since it started. One with catch_up=True starts just after a
    slot, before the first one's tick for that slot (its clock a little behind, or busy).
    The first one's first tick recorded the time it saw the schedule: the slot came after
    it, and the second, which cannot tell a process ticking late from one that crashed,
    runs it as missed; the first finds it recorded and leaves it. On the previous release
    the first recorded nothing: for the second the slot came before the schedule existed,
    and the first runs it. When the second recorded the time it first saw the schedule as
    a slot handled, the first took the slot for one run elsewhere: it ran nowhere."""
    slot = at(2026, 11, 23, 10, 0, tz=UTC)
    behind = FakeClock(start=slot - 30)
    running = make_jobs(backend_url, clock=behind)
    runs: list[float] = []
    register_counter(running, runs, every=3600, catch_up=False)
    if previous:  # its catch_up=False start records nothing
        seen_until = running.store.seen_until

        async def reads_only(schedule: str, at: int | None = None) -> int | None:
            return await seen_until(schedule)

        monkeypatch.setattr(running.store, "seen_until", reads_only)
    await drain(running)  # ticking, the slot not come yet by its clock
    started = make_jobs(backend_url, clock=FakeClock(start=slot + 0.5))
    register_counter(started, runs, every=3600)
    if stopped:
        async with started:
            pass
    else:
        await drain(started)
    if previous:
        assert await started.list(task="tick") == []  # not run there: before it existed
    behind.advance(30)
    await drain(running)
    assert len(runs) == 1
    (job,) = await running.list(task="tick")
    assert job.run_at.timestamp() == slot


async def test_a_process_that_skipped_a_slot_at_start_records_its_stop_once_the_slot_ran(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    """Once the slot it skipped ran elsewhere, a stop records its last tick as ever (a
    definition changed meanwhile must not take a slot that passed while this one ran
    for one missed while stopped)."""
    clock.advance((3600 - clock.now() % 3600 - 30) % 3600)  # to 30 s before an hour
    running = make_jobs(db_url)
    runs: list[float] = []
    register_counter(running, runs, every=3600)
    await drain(running)
    clock.advance(35)  # 5 s past the slot
    restarted = make_jobs(db_url)
    register_counter(restarted, runs, every=3600, catch_up=False)
    await restarted.start()  # its first tick skips the slot
    await drain(running)  # which enqueues it
    assert len(await running.list(task="tick")) == 1
    await restarted.stop()
    assert await restarted.store.last_slot("tick") == math.floor(clock.now())


async def test_schedules_lists_each_with_its_next_run_time(
    make_jobs: MakeJobs,
) -> None:
    clock = FakeClock(start=datetime(2026, 11, 23, 9, 3, tzinfo=UTC))
    jobs = make_jobs(clock=clock)

    @jobs.cron("0 2 * * *", timezone="Europe/Rome", catch_up=False)
    async def nightly() -> None: ...

    @jobs.periodic(every=timedelta(minutes=5), name="sweep")
    async def sweep() -> None: ...

    by_task = {s.task: s for s in jobs.schedules()}
    assert by_task["sweep"] == ScheduleInfo(
        task="sweep",
        cron=None,
        timezone=None,
        every=300.0,
        catch_up=True,
        next_run_at=datetime(2026, 11, 23, 9, 5, tzinfo=UTC),
    )
    night = by_task[nightly.name]
    assert (night.cron, night.timezone, night.every, night.catch_up) == (
        "0 2 * * *",
        "Europe/Rome",
        None,
        False,
    )
    assert night.next_run_at == datetime(2026, 11, 24, 2, 0, tzinfo=ROME)


async def test_scheduled_jobs_use_the_task_options(jobs: Jobs, clock: FakeClock) -> None:
    @jobs.periodic(every=60, name="report", queue="reports", retries=7, priority=3)
    async def report() -> None: ...

    await drain(jobs)
    clock.advance(60)
    await jobs.scheduler.tick()
    (info,) = await jobs.list(task="report")
    assert (info.queue, info.max_attempts, info.priority) == ("reports", 8, 3)
    assert info.status == JobStatus.QUEUED


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda jobs: jobs.cron("61 * * * *"), "invalid cron expression"),
        (lambda jobs: jobs.cron("not cron"), "invalid cron expression"),
        (lambda jobs: jobs.cron("* * * * *", timezone="Mars/Olympus"), "unknown timezone"),
        (lambda jobs: jobs.periodic(every=0), "at least 1 second"),
        (lambda jobs: jobs.periodic(every=1.5), "whole number of seconds"),
        (lambda jobs: jobs.periodic(every="5m"), "timedelta or a number"),
        (lambda jobs: jobs.periodic(every=60, catch_up="yes"), "catch_up"),
    ],
)
async def test_bad_schedules_are_refused_when_declared(
    jobs: Jobs, register: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        register(jobs)  # type: ignore[operator]


async def test_a_scheduled_task_must_take_no_arguments(jobs: Jobs) -> None:
    async def needs(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="no arguments"):
        jobs.periodic(every=60)(needs)  # type: ignore[arg-type]
    assert jobs.registry == {}


async def test_a_scheduled_task_whose_decorator_supplies_its_arguments_is_accepted(
    jobs: Jobs, clock: FakeClock
) -> None:
    """Judged as enqueue judges arguments: by the function registered, which the runner
    calls, not by the signature ``functools.wraps`` copies from the one it wraps."""
    runs: list[str] = []

    def with_connection(fn: Callable[[str], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        @functools.wraps(fn)
        async def wrapper() -> None:
            await fn("conn")

        return wrapper

    @jobs.periodic(every=60, name="cleanup")
    @with_connection
    async def cleanup(connection: str) -> None:
        runs.append(connection)

    await jobs.scheduler.tick()  # the first tick only starts the schedule
    clock.advance(60)
    await jobs.scheduler.tick()
    await drain(jobs)
    assert runs == ["conn"]


async def test_started_workers_run_slots_as_the_clock_reaches_them(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    jobs = make_jobs()
    ran = anyio.Event()
    runs: list[float] = []

    @jobs.periodic(every=60, name="tick")
    async def tick() -> None:
        runs.append(clock.now())
        ran.set()

    async with jobs:
        with anyio.fail_after(5):
            next_slot = jobs.schedules()[0].next_run_at.timestamp()
            clock.advance(next_slot - clock.now())
            await ran.wait()
    assert runs == [next_slot]


async def test_a_schedule_declared_after_start_runs_its_first_slot(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """Declared while the scheduler sleeps (up to a minute, its hourly schedule not due):
    its first tick is not put off past its first slot, which that tick would take for
    one from before the schedule existed, and skip."""
    clock.advance(60 - clock.now() % 60 + 10)
    jobs = make_jobs()
    register_counter(jobs, [], every=3600)
    ran = anyio.Event()
    runs: list[float] = []

    async def tick() -> None:
        runs.append(clock.now())
        ran.set()

    async with jobs:
        with anyio.fail_after(5):
            jobs.periodic(every=60, name="late")(tick)
            next_slot = clock.now() + 50
            for _ in range(5):  # in steps: the scheduler's tick may write in between
                clock.advance(10)
                await anyio.lowlevel.checkpoint()
            await ran.wait()
    assert runs == [next_slot]


async def test_a_schedule_declared_while_a_tick_reads_the_store_does_not_fail_the_tick(
    make_jobs: MakeJobs, clock: FakeClock
) -> None:
    """The tick goes through the schedules with awaits in between (the store's record
    of each): one declared meanwhile changed the dict it was going through."""
    clock.advance((60 - clock.now() % 60 - 1) % 60)  # to a second before a minute
    jobs = make_jobs()
    runs: list[float] = []
    register_counter(jobs, runs, every=60)
    await jobs.scheduler.tick()
    record = jobs.store.last_slot

    async def late() -> None:
        runs.append(-clock.now())

    async def declaring_record(schedule: str, slot: int | None = None) -> int | None:
        if "late" not in jobs.registry:
            jobs.periodic(every=60, name="late")(late)
        return await record(schedule, slot)

    jobs.store.last_slot = declaring_record  # type: ignore[method-assign]
    clock.advance(1)
    assert await jobs.scheduler.tick() == 1
    await drain(jobs)
    assert clock.now() in runs
    clock.advance(60)  # and both go on
    await drain(jobs)
    assert sorted(runs[-2:]) == [-clock.now(), clock.now()]


async def test_started_workers_catch_up_a_missed_slot_before_start_returns(
    make_jobs: MakeJobs, db_url: str, clock: FakeClock
) -> None:
    second, runs = await missed_slot_setup(make_jobs, db_url, clock, catch_up=True)
    async with second:
        caught_up, _ = await second.list(task="tick")
        assert caught_up.idempotency_key == f"cron:tick:{int(clock.now() // 3600 * 3600)}"
        await Job(second, caught_up.id).result(timeout=5)
    assert runs[1:] == [clock.now()]


@pytest.mark.parametrize("catch_up", [True, False])
async def test_slots_missed_while_the_same_jobs_was_stopped_follow_catch_up(
    make_jobs: MakeJobs, clock: FakeClock, *, catch_up: bool
) -> None:
    clock.advance(3600 - clock.now() % 3600 + 120)  # 2 minutes past an hour
    jobs = make_jobs()
    runs: list[float] = []
    register_counter(jobs, runs, every=3600, catch_up=catch_up)
    await drain(jobs)
    await run_for([jobs], clock, 3600, 600)
    assert len(runs) == 1
    clock.advance(5 * 3600)  # stopped over five slots; then the same Jobs starts
    await jobs.start()  # its first tick runs before start() returns
    await jobs.stop()
    assert len(await jobs.list(task="tick")) == (2 if catch_up else 1)


async def test_a_slot_that_passes_while_a_tick_writes_is_enqueued_when_the_tick_ends(
    make_jobs: MakeJobs,
) -> None:
    """A tick that outlasts the period (the store was slow to write) is followed at once
    by one for the slot that came meanwhile: it is not skipped for the slot after."""
    clock = FakeClock(start=datetime(2026, 11, 23, 9, 0, 59, tzinfo=UTC))
    first = int(at(2026, 11, 23, 9, 1, tz=UTC))
    jobs = make_jobs(clock=clock)
    register_counter(jobs, [], every=60)
    record = jobs.store.last_slot

    async def slow_record(schedule: str, slot: int | None = None) -> int | None:
        if slot == first:
            clock.advance(61)  # the write ends after the next slot
        return await record(schedule, slot)

    jobs.store.last_slot = slow_record  # type: ignore[method-assign]

    async def slots() -> list[int]:
        return sorted(int(info.run_at.timestamp()) for info in await jobs.list(task="tick"))

    async with jobs:
        clock.advance(1)
        with anyio.fail_after(5):  # until the scheduler sleeps towards the third slot
            while not any(entry[0] == first + 120 for entry in clock._sleepers):
                await anyio.lowlevel.checkpoint()
        assert await slots() == [first, first + 60]


async def test_a_slot_whose_enqueue_failed_is_enqueued_after_the_poll_interval(
    make_jobs: MakeJobs,
) -> None:
    clock = FakeClock(start=datetime(2026, 11, 23, 9, 0, 59, tzinfo=UTC))
    slot = int(at(2026, 11, 23, 9, 1, tz=UTC))
    jobs = make_jobs(clock=clock, poll_interval=5)
    register_counter(jobs, [], every=60)
    insert = jobs.store.insert
    failures = 0

    async def down_once(new: Sequence[NewJob], *, now: float) -> Inserted:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise StoreError("the database is restarting")
        return await insert(new, now=now)

    jobs.store.insert = down_once  # type: ignore[method-assign, assignment]
    async with jobs:
        clock.advance(1)
        with anyio.fail_after(5):  # until the scheduler waits to try again
            while not any(entry[0] == slot + 5 for entry in clock._sleepers):
                await anyio.lowlevel.checkpoint()
        assert failures == 1
        assert await jobs.list(task="tick") == []
        clock.advance(5)
        with anyio.fail_after(5):
            while not await jobs.list(task="tick"):
                await anyio.lowlevel.checkpoint()
    (info,) = await jobs.list(task="tick")
    assert info.run_at.timestamp() == slot


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["overlapping", "queue-of-one"])
async def test_a_slot_runs_while_the_one_before_still_runs_unless_its_queue_takes_one(
    make_jobs: MakeJobs, clock: FakeClock, *, one_at_a_time: bool
) -> None:
    """As with Sidekiq's or Oban's cron, each slot's job is enqueued and run whether or
    not the one before has ended; a queue of its own limited to one keeps the runs apart
    (the README says so)."""
    clock.advance(60 - clock.now() % 60 + 1)  # just past a minute
    jobs = make_jobs()
    if one_at_a_time:
        jobs.queue("report", concurrency=1)
    release = anyio.Event()
    runs: list[bool] = []  # for each run as it starts: had the one before ended?

    @jobs.periodic(every=60, name="report", queue="report")
    async def report() -> None:
        runs.append(release.is_set())
        await release.wait()

    async with jobs:
        try:
            with anyio.fail_after(5):
                clock.advance(59)  # the first slot
                while not runs:
                    await anyio.lowlevel.checkpoint()
                clock.advance(60)  # the next, the first still running
                while len(await jobs.list(task="report")) < 2:
                    await anyio.lowlevel.checkpoint()
                if one_at_a_time:
                    await claimed_once_more(jobs)  # the second was there to be claimed
                    second, _ = await jobs.list(task="report")
                    assert second.status == JobStatus.QUEUED
                while not one_at_a_time and len(runs) < 2:
                    await anyio.lowlevel.checkpoint()
            assert runs == ([False] if one_at_a_time else [False, False])
        finally:
            release.set()
        with anyio.fail_after(5):
            while len(runs) < 2:
                await anyio.lowlevel.checkpoint()
    assert runs == ([False, True] if one_at_a_time else [False, False])


async def claimed_once_more(jobs: Jobs) -> None:
    """Wake the workers and wait until a claim that began now has ended."""
    store: Any = jobs.store
    claim, finish_and_claim = store.claim, store.finish_and_claim
    ended = anyio.Event()

    async def spy_claim(request: Any, *, now: float) -> Any:
        rows = await claim(request, now=now)
        ended.set()
        return rows

    async def spy_finish_and_claim(outcomes: Any, request: Any, *, now: float) -> Any:
        result = await finish_and_claim(outcomes, request, now=now)
        ended.set()
        return result

    store.claim, store.finish_and_claim = spy_claim, spy_finish_and_claim
    try:
        jobs.runner.wake()
        await ended.wait()
    finally:
        store.claim, store.finish_and_claim = claim, finish_and_claim
