"""Store URLs: sqlite:///relative, sqlite:////absolute, plain paths, $ASYNCJOBS_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncjobs import ConfigurationError, Jobs
from asyncjobs.stores import SQLiteStore, default_url, open_store, sqlite_path


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///jobs.db", Path("jobs.db")),
        ("sqlite:///data/jobs.db", Path("data/jobs.db")),
        ("sqlite:////var/lib/app/jobs.db", Path("/var/lib/app/jobs.db")),
        ("jobs.db", Path("jobs.db")),
        ("/tmp/x/jobs.db", Path("/tmp/x/jobs.db")),
        ("postgresql://app@db/app", None),
    ],
)
def test_sqlite_path_reads_the_url(url: str, path: Path | None) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://jobs.db", "sqlite:///", "sqlite://", ""])
def test_bad_sqlite_urls_are_refused_with_the_fix(url: str) -> None:
    with pytest.raises(ConfigurationError):
        sqlite_path(url)


def test_open_store_dispatches_on_the_scheme(tmp_path: Path) -> None:
    store = open_store("sqlite:///" + str(tmp_path / "a.db"), synchronous="full")
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "a.db"
    assert store.synchronous == "FULL"
    assert isinstance(open_store(str(tmp_path / "b.db")), SQLiteStore)


def test_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown store URL scheme 'mysql'"):
        open_store("mysql://x/y")


def test_default_url_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCJOBS_URL", raising=False)
    assert default_url() == "sqlite:///asyncjobs.db"
    monkeypatch.setenv("ASYNCJOBS_URL", "sqlite:////srv/jobs.db")
    assert default_url() == "sqlite:////srv/jobs.db"
    jobs = Jobs()
    assert isinstance(jobs.store, SQLiteStore)
    assert jobs.store.path == Path("/srv/jobs.db")


async def test_the_store_opens_lazily(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "lazy.db"
    jobs = Jobs("sqlite:///" + str(path))
    assert not path.exists()
    try:
        assert await jobs.list() == []
        assert path.exists()
    finally:
        await jobs.close()
