"""Hostile input to enqueue, options, names and ``jobs.list`` filters, fuzzed with hypothesis.

Every input is either accepted and round-trips exactly (enqueue, run with an echo task,
compare the result and ``JobInfo``) or refused with a clear error, with no row written.

Each test owns one ``Jobs`` on a temporary SQLite file for all its examples, built in a
context manager inside the test body (hypothesis runs many examples per test function,
so function-scoped fixtures would be shared by all of them anyway).
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncjobs import (
    AsyncJobsError,
    ConfigurationError,
    Job,
    Jobs,
    JobStatus,
    NotSerializable,
    PayloadTooLarge,
)
from asyncjobs.testing import FakeClock, drain

T = TypeVar("T")

CLEAR_ERRORS = (NotSerializable, PayloadTooLarge, ConfigurationError, ValueError, TypeError)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@dataclass
class Harness:
    """One Jobs on a temporary file, driven from a synchronous hypothesis test."""

    jobs: Jobs
    path: Path
    runner: asyncio.Runner

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def rows(self) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT count(*) FROM asyncjobs_jobs").fetchone()[0])

    def refused(self, call: Callable[[], Coroutine[Any, Any, Any]]) -> BaseException | None:
        """Run ``call``; if it raises, check the error is clear and nothing was written."""
        before = self.rows()
        try:
            self.run(call())
        except Exception as error:
            refusal: BaseException | None = error
        else:
            return None
        assert refusal is not None
        assert_clear(refusal)
        assert self.rows() == before, f"a refused call wrote rows: {refusal!r}"
        return refusal


def assert_clear(error: BaseException) -> None:
    """A refusal users can act on: one of our errors (or a plain ValueError/TypeError) with
    a message, never a driver/codec/overflow error leaking through."""
    assert isinstance(error, CLEAR_ERRORS), f"unclear error type: {error!r}"
    assert not isinstance(error, UnicodeError | sqlite3.Error | OverflowError | RecursionError), (
        f"a low-level error leaked: {error!r}"
    )
    assert str(error).strip(), f"error without a message: {error!r}"


@contextmanager
def harness(**jobs_options: Any) -> Iterator[Harness]:
    with tempfile.TemporaryDirectory() as folder, asyncio.Runner() as runner:
        path = Path(folder) / "jobs.db"
        jobs = Jobs("sqlite:///" + str(path), clock=FakeClock(), **jobs_options)

        @jobs.task(name="echo")
        async def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return {"args": list(args), "kwargs": kwargs}

        h = Harness(jobs, path, runner)
        try:
            h.run(jobs.store.open())
            yield h
        finally:
            h.run(jobs.close())


# -- what strict JSON means, independently of asyncjobs' codec ------------------------


def same(a: Any, b: Any) -> bool:
    """Exactly equal: same types all the way down (True is not 1, 1.0 is not 1, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value inside ``value`` with its nesting level (iterative: values may be deep)."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        yield item, level
        if level > 1000:
            return  # deeper than anything accepted (and circular values never end)
        if type(item) is list:
            stack.extend((v, level + 1) for v in item)
        elif type(item) is dict:
            stack.extend((v, level + 1) for v in item.values())


def depth(value: Any) -> int:
    return max(level for _, level in _walk(value))


def strict_json(value: Any) -> bool:
    """Only exact JSON types: None, bool, int, finite float, str, list, dict with str keys."""
    for item, level in _walk(value):
        kind = type(item)
        if level > 1000:
            return False
        if item is None or kind in (bool, list):
            continue
        if kind is str:
            if SURROGATE_PAIR.search(item):
                return False  # JSON reads "\\ud800\\udc00" back as one character
            continue
        if kind is int:
            if abs(item) >= 10 ** sys.get_int_max_str_digits():  # too many digits for str()
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind is dict:
            if any(type(k) is not str or SURROGATE_PAIR.search(k) for k in item):
                return False
        else:
            return False
    return True


# -- strategies ------------------------------------------------------------------------


class Colour(enum.IntEnum):
    RED = 1


class Text(str):
    __slots__ = ()


def nested(levels: int, dicts: bool) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": value} if dicts else [value]
    return value


def circular() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


# Surrogates, controls and quoting characters are rare in all of Unicode: ask for them.
hostile_chars = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),  # lone surrogates
    st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Co"]),
    st.sampled_from(list("'\"\\%_;-/.<>&*\x00\u202e\ufeff")),
)
any_text = st.lists(hostile_chars, max_size=20).map("".join)  # text() drops surrogates
huge_ints = st.builds(
    lambda digits, sign: sign * 10**digits,
    st.integers(min_value=18, max_value=4400),
    st.sampled_from([1, -1]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)
hostile_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not math.isfinite(f)),
    st.binary(max_size=8),
    st.binary(max_size=8).map(bytearray),
    st.just(Colour.RED),
    any_text.map(Text),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.datetimes(timezones=st.just(UTC)),
    st.builds(circular),
    st.just(object()),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(any_text, inner, max_size=4),
    ),
    max_leaves=20,
)
hostile_values = st.recursive(
    st.one_of(json_scalars, hostile_scalars),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(any_text, inner, max_size=3),
        st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans()), inner, max_size=2),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=12,
)
arguments = st.one_of(json_values, hostile_values, st.just("x" * 300_000))


# -- arguments -------------------------------------------------------------------------


def test_fuzzed_arguments_round_trip_exactly_or_are_refused_clearly() -> None:
    with harness() as h:

        @FUZZ
        @given(
            args=st.lists(arguments, max_size=3),
            kwargs=st.dictionaries(any_text, arguments, max_size=3),
            deep=st.one_of(
                st.none(), st.tuples(st.integers(min_value=0, max_value=1500), st.booleans())
            ),
        )
        def check(args: list[Any], kwargs: dict[str, Any], deep: tuple[int, bool] | None) -> None:
            # deep nesting is built here: hypothesis cannot print a 1500-level value
            if deep is not None:
                args = [*args, nested(*deep)]
            error = h.refused(lambda: h.jobs.enqueue("echo", *args, **kwargs))
            strict = strict_json(args) and strict_json(kwargs)  # kwargs: its keys too
            too_deep = any(depth(v) > 100 for v in [*args, *kwargs.values()])
            if error is not None:
                if isinstance(error, PayloadTooLarge):
                    return
                assert isinstance(error, NotSerializable), repr(error)
                # refused only when something really is not strict JSON (or absurdly deep)
                assert not strict or too_deep, f"strict JSON refused: {error}"
                return
            assert strict, "a non-JSON value was accepted"
            h.run(drain(h.jobs))
            (info,) = h.run(h.jobs.list(limit=1))
            assert info.status == JobStatus.SUCCEEDED, info.error
            assert same(info.args, args)
            assert same(info.kwargs, kwargs)
            assert same(info.result, {"args": args, "kwargs": kwargs})

        check()
        assert h.rows() > 0, "no example was accepted: the strategy is broken"


def test_strict_json_oracle_agrees_with_known_cases() -> None:
    """The oracle above is what the fuzz test trusts: pin it on obvious cases."""
    assert strict_json({"a": [1, 2.5, None, True, "\ud800", "\U00010000"]})
    assert not strict_json(["\ud800\udc00"])
    for bad in (b"x", (1,), {1: 2}, float("nan"), Colour.RED, Text("x"), Decimal(1), {1}):
        assert not strict_json(bad), bad
    assert not same(True, 1)
    assert not same(1.0, 1)
    assert not same(-0.0, 0.0)


# -- task and queue names --------------------------------------------------------------

names = st.one_of(
    any_text,
    st.text(min_size=190, max_size=210),
    st.sampled_from(["", " ", "a ", "\x00", "a\nb", "../etc", "q'; DROP TABLE asyncjobs_jobs;--"]),
    st.integers(),
    st.none(),
    st.binary(max_size=4),
)


def test_fuzzed_task_and_queue_names_round_trip_or_are_refused() -> None:
    with harness() as h:
        echo = h.jobs.registry["echo"]

        @FUZZ
        @given(task=names, queue=names)
        def check(task: Any, queue: Any) -> None:
            # by name (a task this process may lack): stored, not run
            error = h.refused(lambda: h.jobs.enqueue(task, 1))
            if error is None:
                (info,) = h.run(h.jobs.list(limit=1))
                assert info.task == task
                assert type(task) is str
            error = h.refused(lambda: echo.options(queue=queue).enqueue(queue))
            if error is None:
                assert queue is None or type(queue) is str
                h.run(drain(h.jobs))
                (info,) = h.run(h.jobs.list(task="echo", limit=1))
                assert info.status == JobStatus.SUCCEEDED
                assert same(info.result, {"args": [queue], "kwargs": {}})
                stored = "default" if queue is None else queue  # None means "not given"
                assert info.queue == stored
                assert [j.id for j in h.run(h.jobs.list(queue=stored, task="echo"))][:1] == [
                    info.id
                ]

        check()


# -- options ---------------------------------------------------------------------------

seconds_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.builds(
        timedelta,
        days=st.integers(min_value=-999_999_999, max_value=999_999_999),
        seconds=st.integers(min_value=0, max_value=86_399),
    ),
    st.sampled_from(["10", None, True]),
)
zones = st.one_of(
    st.none(),
    st.just(UTC),
    st.builds(
        lambda minutes: timezone(timedelta(minutes=minutes)),
        st.integers(min_value=-1439, max_value=1439),
    ),
)
run_ats = st.one_of(st.none(), st.datetimes(timezones=zones), st.just("2026-01-01T00:00:00Z"))
priorities = st.one_of(
    st.none(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.booleans(),
    st.floats(), st.just("5"),
)  # fmt: skip
keys = st.one_of(st.none(), any_text, st.text(min_size=490, max_size=510), st.integers())


OPTIONS = {
    "delay": seconds_values,
    "run_at": run_ats,
    "priority": priorities,
    "retries": st.one_of(st.integers(min_value=-5, max_value=2000), st.floats(), st.just("1")),
    "timeout": seconds_values,
    "idempotency_key": keys,
    "group": names,
}


def check_options(h: Harness, options: dict[str, Any]) -> None:
    """Enqueue with ``options``: refused clearly, or stored exactly and readable."""
    echo = h.jobs.registry["echo"]
    given_options = {k: v for k, v in options.items() if v is not None}
    before = h.rows()
    try:
        task = echo.options(**given_options)
    except Exception as error:
        assert_clear(error)
        return
    returned: list[Job[Any]] = []

    async def enqueue() -> None:
        returned.append(await task.enqueue("x"))

    if h.refused(enqueue) is not None:
        return
    h.run(h.jobs.list(limit=1000))  # every job stays readable, whatever was given
    info = h.run(returned[0].info())
    key = options.get("idempotency_key")
    if key is not None and h.rows() == before:
        assert info.idempotency_key == key  # an existing job with that key came back
        return
    assert h.rows() == before + 1
    assert info.idempotency_key == key
    assert info.priority == (options.get("priority") or 0)
    assert info.group == options.get("group")
    retries = options.get("retries")
    assert info.max_attempts == (3 if retries is None else retries) + 1
    run_at, delay = options.get("run_at"), options.get("delay")
    if run_at is not None:
        assert abs(info.run_at.timestamp() - run_at.timestamp()) < 1e-3
    elif delay is not None:
        wanted = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        assert wanted >= 0
        assert math.isclose(info.run_at.timestamp() - h.jobs.clock.now(), wanted, abs_tol=1e-3)
    assert info.run_at.tzinfo is not None
    again = h.run(h.jobs.get(info.id))
    assert again is not None
    assert again.run_at == info.run_at


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_fuzzed_option_is_stored_exactly_or_refused(option: str) -> None:
    with harness() as h:

        @FUZZ
        @given(value=OPTIONS[option])
        def check(value: Any) -> None:
            check_options(h, {option: value})

        check()
        assert h.rows() > 0, "no example was accepted: the strategy is broken"


def test_fuzzed_option_combinations_are_stored_exactly_or_refused() -> None:
    with harness() as h:

        @FUZZ
        @given(st.fixed_dictionaries({}, optional=OPTIONS))
        def check(options: dict[str, Any]) -> None:
            check_options(h, options)

        check()


def test_naive_datetime_and_negative_delay_are_refused() -> None:
    """Pinned cases the fuzzer should hit anyway."""
    with harness() as h:
        echo = h.jobs.registry["echo"]
        for bad in (
            {"run_at": datetime(2030, 1, 1)},  # naive on purpose
            {"delay": -1},
            {"delay": timedelta(seconds=-1)},
            {"delay": float("nan")},
            {"priority": 2**63},
            {"retries": -1},
        ):
            error = h.refused(lambda bad=bad: echo.options(**bad).enqueue())  # type: ignore[misc]
            assert isinstance(error, ConfigurationError), bad
        assert h.rows() == 0


# -- jobs.list filters -----------------------------------------------------------------

filters = st.one_of(
    st.none(),
    any_text,
    st.sampled_from([
        "queued' OR '1'='1", "x\" OR 1=1 --", "%", "_", "*", "default; DELETE FROM asyncjobs_jobs",
        "<script>alert(1)</script>", "../../etc/passwd", "\x00", "queued",
    ]),
    st.integers(),
)  # fmt: skip


LIST_FILTERS = {
    "status": st.one_of(filters, st.sampled_from(list(JobStatus))),
    "queue": st.one_of(filters, st.sampled_from(["default", "other"])),
    "task": st.one_of(filters, st.just("echo")),
    "limit": st.one_of(
        st.integers(min_value=-5, max_value=2**70), st.floats(), st.just("3"), st.booleans()
    ),
}


def check_list(h: Harness, kwargs: dict[str, Any], total: int) -> None:
    """``jobs.list(**kwargs)`` returns exactly the matching jobs, or refuses clearly."""
    try:
        found = h.run(h.jobs.list(**kwargs))
    except Exception as error:
        assert_clear(error)
        return
    status, queue, task = (kwargs.get(k) for k in ("status", "queue", "task"))
    limit = kwargs.get("limit", 100)
    everything = h.run(h.jobs.list(limit=1000))
    wanted = [
        j.id
        for j in everything
        if (status is None or j.status == status)
        and (queue is None or j.queue == queue)
        and (task is None or j.task == task)
    ]
    assert [j.id for j in found] == wanted[:limit]
    assert h.rows() == total


@contextmanager
def listed_harness() -> Iterator[tuple[Harness, int]]:
    with harness() as h:
        echo = h.jobs.registry["echo"]
        for queue in ("default", "other"):
            for _ in range(2):
                h.run(echo.options(queue=queue).enqueue(queue))
        h.run(drain(h.jobs))
        h.run(echo.enqueue("waiting"))
        yield h, h.rows()


@pytest.mark.parametrize("name", list(LIST_FILTERS))
def test_each_fuzzed_list_filter_matches_exactly_or_is_refused(name: str) -> None:
    with listed_harness() as (h, total):

        @FUZZ
        @given(value=LIST_FILTERS[name])
        def check(value: Any) -> None:
            check_list(h, {name: value}, total)

        check()


def test_fuzzed_list_filter_combinations_match_exactly_or_are_refused() -> None:
    with listed_harness() as (h, total):

        @FUZZ
        @given(st.fixed_dictionaries({}, optional=LIST_FILTERS))
        def check(kwargs: dict[str, Any]) -> None:
            check_list(h, kwargs, total)

        check()


def test_admin_calls_with_hostile_job_ids_touch_nothing() -> None:
    with harness() as h:
        job = h.run(h.jobs.enqueue("echo", 1))
        total = h.rows()

        @FUZZ
        @given(job_id=st.one_of(filters, st.just(job.id + "' OR '1'='1"), st.just("%")))
        def check(job_id: Any) -> None:
            for call in (h.jobs.get, h.jobs.cancel, h.jobs.retry):
                try:
                    outcome = h.run(call(job_id))
                except Exception as error:
                    assert_clear(error)
                    continue
                assert outcome in (None, False), f"{call.__name__}({job_id!r}) -> {outcome!r}"
            assert h.rows() == total
            info = h.run(h.jobs.get(job.id))
            assert info is not None
            assert info.status == JobStatus.QUEUED

        check()


def test_harness_counts_rows_and_flags_an_unclear_error() -> None:
    """The checks above can fail: a leaked driver error is not a clear refusal."""
    with harness() as h:
        assert h.rows() == 0
        h.run(h.jobs.enqueue("echo", 1))
        assert h.rows() == 1
    for leaked in (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates"), OverflowError("x")):
        try:
            assert_clear(leaked)
        except AssertionError:
            continue
        raise AssertionError(f"{leaked!r} passed as a clear error")
    assert isinstance(ConfigurationError("x"), AsyncJobsError)
