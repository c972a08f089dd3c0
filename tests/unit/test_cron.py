"""Slot maths (asyncjobs/_cron.py): pure functions of a time, checked against DST changes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import pytz
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncjobs._cron import Cron, Every, to_datetime, zone
from asyncjobs._errors import ConfigurationError

ROME = ZoneInfo("Europe/Rome")


def walk(slots: Cron | Every, start: datetime, count: int) -> list[datetime]:
    t, out = start.timestamp(), []
    for _ in range(count):
        t = slots.next_after(t)
        out.append(datetime.fromtimestamp(t, UTC))
    return out


def local(year: int, month: int, day: int, hour: int, minute: int = 0, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ROME, fold=fold).astimezone(UTC)


def test_every_is_aligned_to_the_epoch() -> None:
    five = Every.parse(timedelta(minutes=5))
    assert five.next_after(600) == 900
    assert five.next_after(601.5) == 900
    assert five.latest_at_or_before(900) == 900
    assert five.latest_at_or_before(899.9) == 600


def test_a_fixed_time_skipped_by_spring_forward_runs_once_after_the_gap() -> None:
    cron = Cron("30 2 * * *", zone("Europe/Rome"))
    assert walk(cron, local(2026, 3, 28, 12), 3) == [
        local(2026, 3, 29, 3, 30),
        local(2026, 3, 30, 2, 30),
        local(2026, 3, 31, 2, 30),
    ]


def test_a_fixed_time_repeated_by_fall_back_runs_once_at_its_first_occurrence() -> None:
    cron = Cron("30 2 * * *", zone("Europe/Rome"))
    assert walk(cron, local(2026, 10, 24, 12), 3) == [
        local(2026, 10, 25, 2, 30, fold=0),
        local(2026, 10, 26, 2, 30),
        local(2026, 10, 27, 2, 30),
    ]


def test_every_hour_expressions_follow_the_real_clock_through_dst_changes() -> None:
    cron = Cron("*/30 * * * *", zone("Europe/Rome"))
    spring = walk(cron, local(2026, 3, 29, 1, 0), 4)
    assert [b - a for a, b in itertools.pairwise(spring)] == [timedelta(minutes=30)] * 3
    autumn = walk(cron, local(2026, 10, 25, 1, 0), 8)
    assert [b - a for a, b in itertools.pairwise(autumn)] == [timedelta(minutes=30)] * 7


def test_named_expressions_and_utc_work() -> None:
    cron = Cron("@daily", zone("UTC"))
    assert walk(cron, datetime(2026, 11, 23, 9, tzinfo=UTC), 1) == [
        datetime(2026, 11, 24, tzinfo=UTC)
    ]
    assert cron.latest_at_or_before(datetime(2026, 11, 23, 9, tzinfo=UTC).timestamp()) == (
        datetime(2026, 11, 23, tzinfo=UTC).timestamp()
    )


def test_a_pytz_zone_means_what_its_iana_name_means() -> None:
    """replace(tzinfo=pytz_zone) would use the zone's first offset (Rome's +0:50)."""
    start = local(2026, 3, 1, 12)
    slots = walk(Cron("0 2 * * *", zone(pytz.timezone("Europe/Rome"))), start, 3)
    assert slots == [local(2026, 3, day, 2) for day in (2, 3, 4)]
    assert zone(pytz.utc) == zone("UTC")


@pytest.mark.parametrize(
    "expr",
    [
        "", "* * *", "60 * * * *", "0 25 * * *", "every day", "@reboot",
        "0 0 2 * * *",  # six fields: croniter reads seconds last, not 02:00:00 daily
        "0 0 2 * * * 2026",
        "R * * * *", "0 R(0-5) * * *",  # random: every process would pick its own slots
        "H * * * *", "H/15 * * * *",
    ],
)  # fmt: skip
def test_invalid_expressions_are_refused(expr: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid cron expression"):
        Cron(expr, zone("UTC"))


def test_an_expression_that_never_fires_is_refused_when_declared() -> None:
    with pytest.raises(ConfigurationError, match="'0 0 30 2 \\*' never fires"):
        Cron("0 0 30 2 *", zone("UTC"))  # February 30th
    leap = Cron("0 0 29 2 *", zone("UTC"))  # once every four years is fine
    assert to_datetime(leap.next_after(datetime(2026, 3, 1, tzinfo=UTC).timestamp())) == (
        datetime(2028, 2, 29, tzinfo=UTC)
    )
    named = Cron("0 12 * MAR THU", zone("UTC"))  # names with R and H in them
    assert to_datetime(named.next_after(datetime(2026, 1, 1, tzinfo=UTC).timestamp())) == (
        datetime(2026, 3, 5, 12, tzinfo=UTC)
    )


ZONES = ["UTC", "Europe/Rome", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
EXPRS = ["*/10 * * * *", "30 2 * * *", "0 * * * *", "15 1,2,3 * * *", "0 0 * * 0", "45 23 L * *"]
# Around the 2026 DST changes of these zones, and in between.
TIMES = st.floats(
    min_value=datetime(2026, 3, 1, tzinfo=UTC).timestamp(),
    max_value=datetime(2026, 11, 15, tzinfo=UTC).timestamp(),
)


@settings(max_examples=300, deadline=None)
@given(
    tz_name=st.sampled_from(ZONES),
    expr=st.sampled_from(EXPRS),
    t=TIMES,
    offset_days=st.sampled_from([0, 0, 7, 30]),
)
def test_next_and_latest_agree_everywhere(
    tz_name: str, expr: str, t: float, offset_days: int
) -> None:
    """``next_after(t)`` is the first slot after ``t``; ``latest_at_or_before`` sees it."""
    cron = Cron(expr, zone(tz_name))
    t += offset_days * 86400
    following = cron.next_after(t)
    assert following > t
    assert cron.latest_at_or_before(following) == following
    previous = cron.latest_at_or_before(following - 1)
    assert previous is not None
    assert previous <= t, "no slot lies strictly between t and next_after(t)"
    assert cron.next_after(previous) == following


@pytest.mark.parametrize("tz_name", ZONES)
def test_fixed_time_jobs_run_once_per_local_day_for_a_whole_year(tz_name: str) -> None:
    tz = zone(tz_name)
    cron = Cron("30 2 * * *", tz)
    runs = walk(cron, datetime(2026, 1, 1, tzinfo=UTC), 365)
    days = [r.astimezone(tz).date() for r in runs]
    assert len(set(days)) == 365
    assert days == sorted(days)
