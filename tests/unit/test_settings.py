"""Jobs(...) settings: a bad value is a ConfigurationError naming it, at construction."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from asyncjobs import ConfigurationError, Jobs
from asyncjobs.stores import SQLiteStore
from asyncjobs.stores._postgres import PostgresStore


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"synchronous": None}, "synchronous must be 'normal', 'full' or 'extra', got None"),
        ({"synchronous": 2}, "synchronous must be 'normal', 'full' or 'extra', got 2"),
        ({"synchronous": "fast"}, "synchronous must be 'normal', 'full' or 'extra'"),
        ({"workers": "no"}, "workers must be True or False, got 'no'"),
        ({"workers": None}, "workers must be True or False"),
        ({"concurrency": 0}, "concurrency must be a whole number from 1 to 2147483647"),
        # Recorded with the worker: PostgreSQL's integer column refused it at every
        # heartbeat (the worker missing from stats), where SQLite took it.
        ({"concurrency": 2**31}, "concurrency must be a whole number from 1 to 2147483647"),
        ({"visibility_timeout": 0}, "visibility_timeout must be a finite number of seconds > 0"),
        ({"poll_interval": "1"}, "poll_interval must be seconds or a timedelta"),
        # A lease of 3 ms was heartbeated about once a millisecond (350 writes for a job
        # of 0.3 s), and an idle runner polling every 1e-6 s claimed ~15,000 times a second.
        ({"visibility_timeout": 0.003}, "visibility_timeout must be at least 1s"),
        ({"visibility_timeout": timedelta(milliseconds=500)}, "visibility_timeout must be at"),
        ({"poll_interval": 1e-6}, "poll_interval must be at least 0.01s"),
        ({"queues": "email"}, "queues must be a list of names"),
        # An empty list served no queue at all: workers that never claim a job.
        ({"queues": []}, "queues must name at least one queue; None serves every queue"),
        ({"queues": ("email", "email")}, "queues names 'email' twice"),
        ({"queues": 5}, "queues must be a list of names, got 5"),
        ({"queues": ["email", ""]}, "queue must be a non-empty string"),
        ({"max_payload_bytes": 1.5}, "max_payload_bytes must be a whole number"),
        # A backoff past 100 years would schedule a retry no read could turn into a date.
        ({"max_backoff": 1e12}, "max_backoff must be at most 3155760000 seconds"),
        ({"backoff_base": 10**400}, "backoff_base must be a finite number of seconds"),
        # A cap below the first step made every retry wait up to max_backoff, as though
        # backoff_base (the bound of the first retry's delay) had never been given.
        ({"backoff_base": 10, "max_backoff": 5}, "max_backoff must be at least 10s (backoff_base"),
        ({"max_backoff": timedelta(milliseconds=500)}, "max_backoff must be at least 1s"),
        ({"retention": 4e9}, "retention must be at most 3155760000 seconds"),
        # A clock without now() failed with AttributeError: 'int' object has no attribute 'now'.
        ({"clock": 5}, "clock must be a Clock with now(), sleep(seconds) and move_on_after"),
        ({"clock": 0}, "clock must be a Clock .*got 0: it has no now, sleep, move_on_after"),
        ({"clock": timedelta}, "clock must be a Clock .*: it has no now, sleep, move_on_after"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(
    tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Jobs("sqlite:///" + str(tmp_path / "jobs.db"), **setting)


def test_synchronous_is_read_in_any_case(tmp_path: Path) -> None:
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), synchronous="FULL", workers=False)
    assert (jobs.settings.synchronous, jobs.settings.workers) == ("full", False)


def test_a_delay_too_large_for_a_float_is_refused_naming_it(tmp_path: Path) -> None:
    jobs = Jobs("sqlite:///" + str(tmp_path / "jobs.db"), workers=False)

    @jobs.task()
    async def later() -> None: ...

    with pytest.raises(ConfigurationError, match="delay must be a finite number of seconds"):
        later.options(delay=10**400)
    with pytest.raises(ConfigurationError, match=r"delay must be at most 3155760000 seconds"):
        later.options(delay=4e9)


@pytest.mark.parametrize("store", [5, "jobs.db", object()])
def test_a_store_that_is_not_a_store_is_refused_naming_what_it_lacks(
    tmp_path: Path, store: Any
) -> None:
    """``Jobs(store=5)`` was accepted, and failed only at first use ('int' object has
    no attribute 'insert'), far from the mistake."""
    with pytest.raises(ConfigurationError, match=r"store must be a Store .*got .*: it has no open"):
        Jobs("sqlite:///" + str(tmp_path / "jobs.db"), store=store)


def test_a_store_of_your_own_with_the_stores_methods_is_taken(tmp_path: Path) -> None:
    class Wrapped(SQLiteStore):
        """A store of one's own: here the SQLite store, with every method it has."""

    store = Wrapped(tmp_path / "jobs.db")
    assert Jobs("sqlite:///" + str(tmp_path / "jobs.db"), store=store).store is store


def test_a_url_and_a_store_on_another_file_are_refused(tmp_path: Path) -> None:
    """``Jobs("a.db", store=SQLiteStore("b.db"))`` put the jobs in b.db and kept a.db as
    ``settings.url``: whatever read it there (``Jobs(jobs.settings.url)``) found none."""
    with pytest.raises(
        ConfigurationError, match=r"url '.*a\.db' and store=SQLiteStore\('.*b\.db'\), which is not"
    ):
        Jobs(str(tmp_path / "a.db"), store=SQLiteStore(tmp_path / "b.db"))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@127.0.0.1/other",  # another database
        "postgresql://app:hunter2@127.0.0.1/test?search_path=other",  # another schema
        "postgresql://other:hunter2@127.0.0.1/test",  # another user: its own search_path
        "sqlite:///test.db",
    ],
)
def test_a_url_and_a_postgres_store_elsewhere_are_refused_without_the_password(url: str) -> None:
    store = PostgresStore("postgresql://app:hunter2@127.0.0.1/test")
    with pytest.raises(ConfigurationError, match=r"store=PostgresStore\(.*which is not on it") as e:
        Jobs(url, store=store)
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize(
    ("url", "place"),
    [
        ("sqlite:///{dir}/sub/../jobs.db", "{dir}/jobs.db"),
        ("{dir}/jobs.db", "{dir}/jobs.db"),
        ("postgres://app:pw@127.0.0.1:5432/test?pool_max=3", "postgresql://app:pw@127.0.0.1/test"),
    ],
)
def test_a_url_naming_the_stores_place_is_kept(tmp_path: Path, url: str, place: str) -> None:
    """The url may spell the store's place its own way (tests pass both)."""
    url, place = url.format(dir=tmp_path), place.format(dir=tmp_path)
    store = PostgresStore(place) if place.startswith("postgresql:") else SQLiteStore(place)
    jobs = Jobs(url, store=store)
    assert (jobs.settings.url, jobs.store) == (url, store)


def test_a_store_alone_is_the_url_in_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``settings.url`` was ``$ASYNCJOBS_URL`` (or ./asyncjobs.db), where the jobs were not."""
    monkeypatch.setenv("ASYNCJOBS_URL", str(tmp_path / "elsewhere.db"))
    sqlite = Jobs(store=SQLiteStore(tmp_path / "jobs.db"))
    assert sqlite.settings.url == "sqlite:///" + str(tmp_path / "jobs.db")
    postgres = Jobs(store=PostgresStore("postgresql://app:pw@127.0.0.1/test?pool_max=3"))
    assert postgres.settings.url == "postgresql://app:pw@127.0.0.1/test"


def test_a_url_and_a_store_of_your_own_are_refused(tmp_path: Path) -> None:
    """Such a store cannot say where it is: the url could name any place."""

    class Proxy:
        def __init__(self, store: SQLiteStore) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

    store = Proxy(SQLiteStore(tmp_path / "jobs.db"))
    with pytest.raises(ConfigurationError, match="a store of your own, which cannot say it is"):
        Jobs(str(tmp_path / "jobs.db"), store=store)
    assert Jobs(store=store).store is store


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_a_sqlite_store_alone_gives_the_settings_its_synchronous(
    tmp_path: Path, synchronous: str
) -> None:
    """``Jobs(store=SQLiteStore(p, synchronous="full"))`` reported "normal": the store
    runs at its own, which the settings now tell."""
    jobs = Jobs(store=SQLiteStore(tmp_path / "jobs.db", synchronous=synchronous.upper()))
    assert jobs.settings.synchronous == synchronous


@pytest.mark.parametrize(("given", "stores"), [("full", "normal"), ("normal", "full")])
def test_a_synchronous_other_than_the_sqlite_stores_is_refused(
    tmp_path: Path, given: str, stores: str
) -> None:
    """``Jobs(store=SQLiteStore(p), synchronous="full")`` ran the store at "normal",
    silently: commits a power loss could take, where "full" was asked for."""
    store = SQLiteStore(tmp_path / "jobs.db", synchronous=stores)
    with pytest.raises(
        ConfigurationError,
        match=rf"synchronous='{given}' and store=SQLiteStore\(.*\), which runs at "
        rf"synchronous='{stores}'",
    ):
        Jobs(store=store, synchronous=given)


def test_a_synchronous_the_sqlite_store_has_is_taken(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db", synchronous="full")
    assert Jobs(store=store, synchronous="FULL").settings.synchronous == "full"
    with pytest.raises(ConfigurationError, match="synchronous must be 'normal', 'full' or 'extra'"):
        Jobs(store=store, synchronous="fast")  # a bad value is refused as one, not as a conflict


def test_synchronous_with_a_postgres_store_is_as_given(tmp_path: Path) -> None:
    """PostgreSQL has no such setting (its durability is the server's): ``synchronous=``
    is taken as with its URL alone, and checked the same."""
    url = "postgresql://app:pw@127.0.0.1/test"
    assert Jobs(store=PostgresStore(url), synchronous="full").settings.synchronous == "full"
    assert Jobs(url, synchronous="full").settings.synchronous == "full"
    assert Jobs(store=PostgresStore(url)).settings.synchronous == "normal"
    with pytest.raises(ConfigurationError, match="synchronous must be 'normal', 'full' or 'extra'"):
        Jobs(store=PostgresStore(url), synchronous="fast")
