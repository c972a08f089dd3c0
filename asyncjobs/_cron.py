"""Slot maths for cron and periodic schedules: pure functions of a time, no I/O, no clock.

A *slot* is an instant (whole epoch seconds) at which a schedule fires. Both kinds
answer two questions: the first slot strictly after ``t`` and the last slot at or
before ``t``.

Cron expressions are parsed and iterated by croniter in local wall-clock time of
the schedule's time zone (naive datetimes, so croniter knows nothing of DST);
this module maps those wall-clock slots to instants, DST-correct:

- a wall-clock time that does not exist (the hour skipped in spring) runs once,
  shifted forward by the size of the gap (02:30 becomes 03:30 in Europe/Rome);
- a wall-clock time that happens twice (the hour repeated in autumn) runs once,
  at its first occurrence;
- except for expressions whose hour field matches every hour (``*/10 * * * *``,
  ``0 * * * *``): those follow the real clock, so they run through the repeated
  hour too and skip the wall-clock times that do not exist.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from asyncjobs._errors import ConfigurationError

if TYPE_CHECKING:
    from croniter import croniter

_MARGIN = timedelta(hours=3)
"""More than any DST shift: wall-clock slots further than this from ``t`` cannot
map to an instant on the other side of ``t``."""

_MAX_CANDIDATES = 100_000

_Y2K = 946_684_800.0

_RANDOM_FIELD = re.compile(r"(?<![a-z])[rh](?![a-z])", re.IGNORECASE)
"""croniter's random (``R``) or hashed (``H``) value, not part of a name like MAR or THU."""


class Slots(Protocol):
    """When a schedule fires."""

    def next_after(self, t: float) -> int:
        """The first slot strictly after ``t`` (epoch seconds)."""
        ...

    def latest_at_or_before(self, t: float) -> int | None:
        """The last slot at or before ``t``, or None if there is none."""
        ...


@dataclass(frozen=True, slots=True)
class Every:
    """Slots every ``seconds``, aligned to the Unix epoch (so all processes agree)."""

    seconds: int

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int):
            raise ConfigurationError(f"every must be whole seconds, got {self.seconds!r}")
        if self.seconds < 1:
            raise ConfigurationError(f"every must be at least 1 second, got {self.seconds!r}")

    @classmethod
    def parse(cls, every: object) -> Every:
        """Accept a ``timedelta`` or seconds; refuse fractions of a second."""
        value = every.total_seconds() if isinstance(every, timedelta) else every
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(
                f"every must be a timedelta or a number of seconds, got {every!r}"
            )
        if not math.isfinite(value) or value != int(value):
            raise ConfigurationError(f"every must be a whole number of seconds, got {every!r}")
        return cls(int(value))

    def next_after(self, t: float) -> int:
        return (math.floor(t) // self.seconds + 1) * self.seconds

    def latest_at_or_before(self, t: float) -> int | None:
        return math.floor(t) // self.seconds * self.seconds


def _croniter() -> type[croniter]:
    try:
        from croniter import croniter
    except ImportError:  # pragma: no cover - the extra is installed in CI
        raise ConfigurationError(
            "cron schedules need croniter: pip install 'asyncjobs[cron]'"
        ) from None
    return croniter


def zone(timezone: str | tzinfo) -> tzinfo:
    """A ``tzinfo`` for an IANA name ("Europe/Rome", "UTC") or a tzinfo object."""
    if isinstance(timezone, tzinfo):
        name = getattr(timezone, "zone", None)
        if hasattr(timezone, "localize") and isinstance(name, str):
            # pytz: attached with replace(tzinfo=...), its zones keep their first
            # offset in history (Rome's +0:50 of 1866); use the same zone from zoneinfo.
            return zone(name)
        return timezone
    if not isinstance(timezone, str):
        raise ConfigurationError(f"timezone must be an IANA name like 'UTC', got {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown timezone {timezone!r}; use an IANA name like 'Europe/Rome' or 'UTC' "
            "(on Windows, pip install tzdata)"
        ) from None


@dataclass(frozen=True, slots=True)
class Cron:
    """Slots of a cron expression in a time zone (see the module docstring for DST)."""

    expr: str
    tz: tzinfo
    every_hour: bool = field(init=False)

    def __post_init__(self) -> None:
        croniter = _croniter()
        expr = str(self.expr)
        fields = expr.split()
        # croniter also takes six or seven fields (seconds last, then a year) and random
        # or hashed fields (R, H): the first misreads a Quartz-style '0 0 2 * * *', the
        # second would give each process (and each call) slots of its own.
        if (
            (len(fields) != 5 and not (len(fields) == 1 and expr.startswith("@")))
            or _RANDOM_FIELD.search(expr)
            or not croniter.is_valid(expr)
        ):
            raise ConfigurationError(
                f"invalid cron expression {self.expr!r}; expected five fields "
                "'minute hour day month weekday' like '0 2 * * *', or '@daily'"
            )
        hours: list[object] = list(croniter(self.expr, datetime(2000, 1, 1)).expanded[1])
        object.__setattr__(self, "every_hour", str(hours[0]) == "*" or len(set(hours)) == 24)
        self.next_after(_Y2K)  # one that never fires (February 30th) is refused here

    def _instants(self, wall: datetime) -> list[int]:
        """The instants a wall-clock slot fires at (none, one, or two in the repeated hour)."""
        first = wall.replace(tzinfo=self.tz, fold=0)
        second = wall.replace(tzinfo=self.tz, fold=1)
        t0 = int(first.timestamp())
        exists = datetime.fromtimestamp(t0, self.tz).replace(tzinfo=None) == wall
        if not exists:  # skipped by a spring-forward change
            return [] if self.every_hour else [t0]
        t1 = int(second.timestamp())
        if t1 != t0 and self.every_hour:  # repeated by a fall-back change
            return [t0, t1]
        return [t0]

    def _near_change(self, t: float) -> bool:
        offsets = {
            datetime.fromtimestamp(t + d, self.tz).utcoffset() for d in (-10800.0, 0.0, 10800.0)
        }
        return len(offsets) > 1

    def _walls(self, start: datetime, *, forward: bool) -> Iterator[datetime]:
        it = _croniter()(self.expr, start)
        for _ in range(_MAX_CANDIDATES):
            try:
                yield it.get_next(datetime) if forward else it.get_prev(datetime)
            except ValueError:  # croniter's CroniterBadDateError: no such date for years
                return

    def next_after(self, t: float) -> int:
        local = datetime.fromtimestamp(t, self.tz).replace(tzinfo=None)
        start = local - (_MARGIN if self._near_change(t) else timedelta(seconds=1))
        best: int | None = None
        best_wall = local
        for wall in self._walls(start, forward=True):
            if best is not None and (not self._near_change(best) or wall > best_wall + _MARGIN):
                return best
            for instant in self._instants(wall):
                if instant > t and (best is None or instant < best):
                    best, best_wall = instant, wall
        if best is None:
            raise ConfigurationError(f"cron expression {self.expr!r} never fires")
        return best

    def latest_at_or_before(self, t: float) -> int | None:
        local = datetime.fromtimestamp(t, self.tz).replace(tzinfo=None)
        start = local + (_MARGIN if self._near_change(t) else timedelta(seconds=1))
        best: int | None = None
        best_wall = local
        try:
            for wall in self._walls(start, forward=False):
                if best is not None and (not self._near_change(best) or wall < best_wall - _MARGIN):
                    return best
                for instant in self._instants(wall):
                    if instant <= t and (best is None or instant > best):
                        best, best_wall = instant, wall
        except (ValueError, OverflowError):  # ran off the start of the calendar
            pass
        return best


def to_datetime(slot: int) -> datetime:
    return datetime.fromtimestamp(slot, UTC)
