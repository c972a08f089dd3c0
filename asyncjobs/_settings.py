"""``Jobs(...)`` settings, validated once and frozen."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

from asyncjobs._clock import Clock
from asyncjobs._errors import ConfigurationError

if TYPE_CHECKING:
    from asyncjobs.stores import Store

Seconds = float | int | timedelta


def wait_timeout(timeout: float | timedelta | None) -> float | None:
    """A wait's ``timeout=`` (``Job.result``, ``Batch.wait``...) in seconds: a number,
    a timedelta, or None to wait for ever."""
    return timeout.total_seconds() if isinstance(timeout, timedelta) else timeout


def seconds(value: object, name: str, *, allow_zero: bool = True) -> float:
    """Normalise a duration (seconds or timedelta) and check it is finite, >= 0 and at
    most ``MAX_DELAY`` (100 years: a time further ahead could not be read back)."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be seconds or a timedelta, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        value = math.inf
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"{name} must be a finite number of seconds {bound}, got {value!r}"
        )
    if value > MAX_DELAY:
        raise ConfigurationError(
            f"{name} must be at most {MAX_DELAY:.0f} seconds (100 years), got {value!r}"
        )
    return value


def at_least(value: float, minimum: float, name: str, why: str) -> float:
    """``value`` (seconds), checked to be at least ``minimum``; ``why`` says what less does."""
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum:g}s ({why}), got {value!r}")
    return value


MIN_VISIBILITY_TIMEOUT = 1.0
"""The shortest lease: a job's lease is renewed every third of it (one write each), and
one shorter than a second is lost to any pause of the event loop or of the disk, the
job then run twice."""

MIN_POLL_INTERVAL = 0.01
"""The shortest poll interval: an idle runner claims once per interval, so below 10 ms
it queries the store over a hundred times a second with nothing to do (a local enqueue,
and on PostgreSQL another process's, wakes it at once anyway)."""


def lacks(value: object, protocol: type) -> list[str]:
    """The methods of ``protocol`` (``Store``, ``Clock``) that ``value`` lacks: one given
    for it that lacks them would fail only at its first use, far from the mistake."""
    methods = [name for name, member in vars(protocol).items() if callable(member)]
    return [name for name in methods if not name.startswith("_") and not _has(value, name)]


def _has(value: object, name: str) -> bool:
    return callable(getattr(value, name, None))


def check_store(store: object) -> Store:
    """``store=``: a ``Store``, one of ours or of your own with the protocol's methods."""
    from asyncjobs.stores import Store  # here: asyncjobs.stores imports this module

    missing = lacks(store, Store)
    if missing:
        hint = (
            "; a URL or path goes first: Jobs(url)" if isinstance(store, str | os.PathLike) else ""
        )
        raise ConfigurationError(
            f"store must be a Store (SQLiteStore, PostgresStore, or one of your own with "
            f"the methods of asyncjobs.stores.Store), got {store!r}: it has no "
            f"{_first(missing)}{hint}"
        )
    return cast("Store", store)


def store_url(url: str | None, store: Store) -> str:
    """The URL ``Jobs`` keeps (``settings.url``) when given a ``store``: the store's own
    place. A ``url`` given too must name that place: the jobs go to the store alone, and
    a URL naming another place would send whatever reads it there to find none."""
    from asyncjobs.stores import default_url, open_store, redacted  # as in check_store

    if url is None:
        return _url_of(store) or default_url()
    if _same_place(open_store(url), store):
        return url
    ours = _url_of(store) is not None
    which = "which is not on it" if ours else "a store of your own, which cannot say it is on it"
    raise ConfigurationError(
        f"Jobs() was given the url {redacted(url)!r} and store={store!r}, {which}: the "
        "jobs would go to the store alone. Give the store alone, or the url alone"
    )


def _same_place(named: Store, store: Store) -> bool:
    """Whether ``store`` is where ``named`` (the store of a URL) is: one of ours of its
    kind (or of a subclass) that says so, the same SQLite file or PostgreSQL database
    and schema. A store of your own cannot tell."""
    same = getattr(store, "_same_jobs", None)
    return isinstance(store, type(named)) and same is not None and bool(same(named))


def _url_of(store: Store) -> str | None:
    """The URL of one of our stores; None for a store of your own."""
    from asyncjobs.stores import SQLiteStore  # as in check_store

    if isinstance(store, SQLiteStore):
        return f"sqlite:///{store.path}"  # an absolute path: sqlite:////...
    # A PostgresStore exists only once its module (which needs asyncpg) is imported.
    postgres = sys.modules.get("asyncjobs.stores._postgres")
    if postgres is not None and isinstance(store, postgres.PostgresStore):
        return str(store.url)
    return None


class _StoreOrNormal(str):
    """The type of ``SYNCHRONOUS_DEFAULT`` alone."""

    __slots__ = ()


SYNCHRONOUS_DEFAULT: str = _StoreOrNormal("normal")
"""``Jobs(synchronous=)`` when it is not given: "normal", or with a SQLite ``store=`` that
store's own. It equals "normal" (the signature DESIGN.md fixes) but is this one object,
so that ``check_synchronous`` can tell it from a "normal" given on purpose."""


def check_synchronous(value: object, store: Store | None) -> str:
    """``synchronous=``: "normal", "full" or "extra". With a SQLite ``store=`` it is that store's,
    which opens with its own (``Jobs`` passes it none), so that ``settings.synchronous``
    tells how the jobs are written; one given that differs is refused, where the store
    ran at its own silently. PostgreSQL has no such setting (its durability is the
    server's ``synchronous_commit``): with it, and with a store of your own, the value is
    kept as given, as with a URL alone."""
    from asyncjobs.stores import SQLiteStore  # as in check_store
    from asyncjobs.stores._sqlite_connections import _SYNCHRONOUS

    ours = store.synchronous.lower() if isinstance(store, SQLiteStore) else None
    if ours is not None and value is SYNCHRONOUS_DEFAULT:
        return ours
    # What SQLiteStore takes: a Jobs given such a store reports it, and replace_store
    # passes it on to Jobs(url, synchronous=...).
    if not isinstance(value, str) or value.upper() not in _SYNCHRONOUS:
        raise ConfigurationError(f"synchronous must be 'normal', 'full' or 'extra', got {value!r}")
    if ours is not None and value.lower() != ours:
        raise ConfigurationError(
            f"Jobs() was given synchronous={value!r} and store={store!r}, which runs at "
            f"synchronous={ours!r}: the store's applies. Give it to the store "
            f"(SQLiteStore(path, synchronous={value.lower()!r})), or leave Jobs' out"
        )
    return value.lower()


def _first(names: list[str], shown: int = 4) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_clock(clock: object) -> Clock:
    """``clock=``: a ``Clock``, such as ``asyncjobs.testing.FakeClock``."""
    missing = lacks(clock, Clock)
    if missing:
        raise ConfigurationError(
            "clock must be a Clock with now(), sleep(seconds) and move_on_after(seconds), "
            f"such as asyncjobs.testing.FakeClock, got {clock!r}: it has no {', '.join(missing)}"
        )
    return cast("Clock", clock)


def positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


MAX_CONCURRENCY = 2**31 - 1
"""The most jobs at once ``Jobs(concurrency=)`` takes: recorded with the worker, in an
integer column on PostgreSQL (32 bits), which refused a larger one at every heartbeat
while SQLite (64 bits) kept it."""


def check_concurrency(value: object) -> int:
    """``Jobs(concurrency=)``: a whole number from 1 to ``MAX_CONCURRENCY``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigurationError(
            f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, got {value!r}"
        )
    return value


def check_name(value: object, what: str) -> str:
    """Task, queue and group names: non-empty printable text of at most 200 characters."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ConfigurationError(
            f"{what} must be a non-empty string of at most 200 characters, got {value!r}"
        )
    if not value.isprintable() or value != value.strip():
        raise ConfigurationError(
            f"{what} {value!r} must be printable with no surrounding white space"
        )
    return value


def is_name(value: str) -> bool:
    """Whether ``value`` could be a task or queue name (``check_name`` without raising)."""
    return 0 < len(value) <= 200 and value.isprintable() and value == value.strip()


MAX_DELAY = 100 * 365.25 * 86400.0
"""The furthest ahead a job can be scheduled (100 years): beyond it dates stop being
representable as ``datetime`` and every read of the job would fail."""


def check_instant(value: object, what: str) -> float:
    """An instant in epoch seconds (a job's ``run_at``) that reads back as a ``datetime``:
    a NaN, an infinity or a date past year 9999 made every read of the job fail."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be epoch seconds, got {value!r}")
    try:
        datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError) as error:
        raise ConfigurationError(f"{what} is out of range: {error}") from None
    return float(value)


def check_text(value: object, what: str, *, max_length: int) -> str:
    """Free text stored in the database (idempotency keys): non-empty, at most
    ``max_length`` characters, valid Unicode (no lone surrogates) and no NUL."""
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ConfigurationError(
            f"{what} must be a non-empty string of at most {max_length} characters, got {value!r}"
        )
    if not is_storable(value):
        raise ConfigurationError(
            f"{what} {value!r} must be valid Unicode text without NUL characters "
            "(no lone surrogates)"
        )
    return value


def is_storable(value: str) -> bool:
    """Can both stores keep ``value`` in a text column? PostgreSQL refuses NUL, and
    no UTF-8 encodes a lone surrogate."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable(text: str) -> str:
    """``text`` made storable (``is_storable``) for what a job's run produces, an error
    or a progress message: NUL and lone surrogates become backslash escapes."""
    if is_storable(text):
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")


def job_id_or_none(value: object) -> str | None:
    """A job id given to get/retry/cancel/discard, or None when no job can have it.

    Ids are short URL-safe strings; text that no store could hold (too long, NUL, lone
    surrogates) names no job, so callers answer "not found" instead of a driver error.
    """
    text = value if isinstance(value, str) else str(value)
    if not text or len(text) > 1000 or not is_storable(text):
        return None
    return text


def _queue_names(queues: object) -> tuple[str, ...]:
    """``queues=``: the names of the queues to serve, at least one, each once. An empty
    list would serve none: workers that never claim a job."""
    if isinstance(queues, str):
        raise ConfigurationError(f"queues must be a list of names, not the string {queues!r}")
    if not isinstance(queues, Iterable):
        raise ConfigurationError(f"queues must be a list of names, got {queues!r}")
    names = tuple(check_name(q, "queue") for q in queues)
    if not names:
        raise ConfigurationError(
            "queues must name at least one queue; None serves every queue, and an empty "
            "list would serve none"
        )
    seen: set[str] = set()
    for name in names:
        if name in seen:  # a typo for another queue, most likely
            raise ConfigurationError(f"queues names {name!r} twice, got {list(names)!r}")
        seen.add(name)
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    url: str = field(repr=False)  # it may hold a password
    concurrency: int
    workers: bool
    queues: tuple[str, ...] | None
    visibility_timeout: float
    shutdown_timeout: float
    poll_interval: float
    retention: float
    dead_retention: float
    max_payload_bytes: int
    synchronous: str
    backoff_base: float
    max_backoff: float
    clock: Clock

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: a lease ends three after its last renewal. When
        two in a row fail, the job is stopped half of one before it ends (``_lapsing``
        in ``_leases.py``)."""
        return self.visibility_timeout / 3

    @classmethod
    def build(
        cls,
        *,
        url: str,
        concurrency: int,
        workers: bool,
        queues: Sequence[str] | None,
        visibility_timeout: Seconds,
        shutdown_timeout: Seconds,
        poll_interval: Seconds,
        retention: Seconds,
        dead_retention: Seconds | None,
        max_payload_bytes: int,
        synchronous: object,  # checked here: Jobs(synchronous=None) is a ConfigurationError
        store: Store | None,  # the store given to Jobs, if any: see check_synchronous
        backoff_base: Seconds,
        max_backoff: Seconds,
        clock: object,  # checked here: Jobs(clock=5) is a ConfigurationError
    ) -> Settings:
        if not isinstance(workers, bool):
            raise ConfigurationError(f"workers must be True or False, got {workers!r}")
        kept = seconds(retention, "retention")
        base = seconds(backoff_base, "backoff_base")
        return cls(
            url=url,
            concurrency=check_concurrency(concurrency),
            workers=workers,
            queues=None if queues is None else _queue_names(queues),
            visibility_timeout=at_least(
                seconds(visibility_timeout, "visibility_timeout", allow_zero=False),
                MIN_VISIBILITY_TIMEOUT,
                "visibility_timeout",
                "a lease renewed every third of it, lost to any pause: jobs run twice",
            ),
            shutdown_timeout=seconds(shutdown_timeout, "shutdown_timeout"),
            poll_interval=at_least(
                seconds(poll_interval, "poll_interval", allow_zero=False),
                MIN_POLL_INTERVAL,
                "poll_interval",
                "an idle runner would query the store over a hundred times a second",
            ),
            retention=kept,
            dead_retention=kept * 4
            if dead_retention is None
            else seconds(dead_retention, "dead_retention"),
            max_payload_bytes=positive_int(max_payload_bytes, "max_payload_bytes"),
            synchronous=check_synchronous(synchronous, store),
            backoff_base=base,
            max_backoff=at_least(
                seconds(max_backoff, "max_backoff"),
                base,
                "max_backoff",
                "backoff_base, the bound of the first retry's delay: a smaller cap makes "
                "every retry wait up to max_backoff, as though backoff_base were never "
                "given; lower backoff_base too",
            ),
            clock=check_clock(clock),
        )
