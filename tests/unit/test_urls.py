"""Store URLs: sqlite:///relative, sqlite:////absolute, plain paths, $ASYNCJOBS_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncjobs import ConfigurationError, Jobs
from asyncjobs.stores import SQLiteStore, default_url, open_store, redacted, sqlite_path


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


@pytest.mark.parametrize(
    "url", ["postgresql:/app:hunter2@db/app", "postgres:app:hunter2@db/app", "sqlite:/jobs.db"]
)
def test_a_url_typed_with_one_slash_is_refused_not_taken_for_a_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"write \w+://\.\.\. \(two slashes\)") as refused:
        open_store(url)
    assert "hunter2" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:hunter2@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app@db/app?password=hunter2&sslmode=require",
         "postgresql://app@db/app?password=***&sslmode=require"),
        ("postgresql://db/app", "postgresql://db/app"),
        ("sqlite:////var/lib/jobs.db", "sqlite:////var/lib/jobs.db"),
        ("postgresql://app:hunter2@[::1/app", "postgresql://***@[::1"),  # unparsable
        ("postgresql://app@db/app?sslkey=%2Fk.pem&sslpassword=hunter2",
         "postgresql://app@db/app?sslkey=%2Fk.pem&sslpassword=***"),
        # A password typed with /, ? or # unescaped: no host, port or path shows it.
        ("postgresql://app:Xy9/hunter2@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:1234/hunter2@127.0.0.1:5432/app",
         "postgresql://app:***@127.0.0.1:5432/app"),
        ("postgresql://app:a?b#hunter2@db/app?password=x", "postgresql://app:***@db/app?password=***"),
        ("postgresql://app:p@ss/hunter2@db/app", "postgresql://app:***@db/app"),
        # An @ in a secret parameter's value is no end of the user info.
        ("postgresql://db:5432/app?password=p@hunter2", "postgresql://db:5432/app?password=***"),
        ("postgresql://alice:pw@db/app?sslpassword=key@hunter2",
         "postgresql://alice:***@db/app?sslpassword=***"),
        # A # typed unescaped in a secret parameter's value is no end of it either.
        ("postgresql://db/app?password=p#hunter2&sslmode=require",
         "postgresql://db/app?password=***&sslmode=require"),
        ("postgresql://app@db/app?sslpassword=#hunter2", "postgresql://app@db/app?sslpassword=***"),
        # So is an & followed by no parameter (key=value).
        ("postgresql://db/app?password=p&hunter2&sslmode=require",
         "postgresql://db/app?password=***&sslmode=require"),
        ("postgresql://db/app?sslmode=require&password=p&hunter2",
         "postgresql://db/app?sslmode=require&password=***"),
        ("postgresql://u:ab?hunter2@host/db?SECRET=1", "postgresql://u:***@host/db?SECRET=1"),
        ("postgresql://u@host/db?password=ab?hunter2&sslpassword=x",
         "postgresql://u@host/db?password=***&sslpassword=***"),
        ("postgresql://u@host/db?password=ab?cd#hunter2&SECRET=1",
         "postgresql://u@host/db?password=***&SECRET=1"),
        # & ; = are allowed in a password as written (RFC 3986): no parameter starts there.
        ("postgresql://app:p&password=hunter2@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:p;password=hunter2@db:5432/app?sslmode=require",
         "postgresql://app:***@db:5432/app?sslmode=require"),
        # A password typed with ? then password=: what reads as the port is hidden too.
        ("postgresql://app:hunter2?password=x@db/app", "postgresql://app:***?password=***"),
        # A parameter written after a ; (as in JDBC) is no less secret.
        ("postgresql://db/app?sslmode=require;password=hunter2",
         "postgresql://db/app?sslmode=require;password=***"),
        # No driver reads a fragment; what follows a # may be a password's tail.
        ("postgresql://db/app?sslmode=require#password=hunter2",
         "postgresql://db/app?sslmode=require#***"),
        ("postgresql://app:pw@db/app#hunter2", "postgresql://app:***@db/app#***"),
        # A parameter name that holds its value (= percent-encoded).
        ("postgresql://db/app?password%3Dhunter2&sslmode=require",
         "postgresql://db/app?password=***&sslmode=require"),
    ],
)  # fmt: skip
def test_redacted_urls_hide_the_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@127.0.0.1/test?pool_min=ten",  # a typo in a setting
        "postgresql+asyncpg://app:hunter2@127.0.0.1/test",  # SQLAlchemy's spelling
        "postgresql://app:hunter2@127.0.0.1:notaport/test",
        "postgresql://app:hunter2@127.0.0.1:99999/test",
        "postgresql://app:hunter2@127.0.0.1:0/test",
        "postgresql://app:hunter2@[::1/test",
        "postgresql://app:Xy9/hunter2@127.0.0.1:5432/app",  # a / typed unescaped
        "postgresql://db:5432/app?password=p@hunter2&pool_min=x",  # an @ in a parameter
        # What comes before the first /, ? or # reads as a port: no error quotes it.
        "postgresql://app:hunter2/x@127.0.0.1:5432/app",
        "postgresql://app:hunter2?@127.0.0.1/app",
        "postgresql://app:hunter2#@127.0.0.1/app?pool_min=1",
        # Read by asyncpg only on connecting, whose errors quoted the password's tail
        # (a ValueError: "bad query field: 'x2hunter2'", "invalid literal for int()").
        "postgresql://app@127.0.0.1/app?password=p&x2hunter2",
        "postgresql://app@127.0.0.1/app?sslpassword=p&x2hunter2&sslmode=require",
        "postgresql://app:/hunter2?x@127.0.0.1:5432/app",  # the rest reads as the query
        "postgresql://app:p@hunter2?x@127.0.0.1:5432/app",
        "postgresql://app@azure:p@12:34hunter2@127.0.0.1:5432/app",  # an @ unescaped
        "postgresql://app:p@hunter2@127.0.0.1:5432/app",  # hunter2 looked up as a host
        "postgresql://app:hunter2?password=x@127.0.0.1/app",  # hunter2 read as the port
        "postgresql://app@127.0.0.1/app?pool_min=x#password=hunter2",
        "postgresql://app@127.0.0.1/app?pool_min=x;password=hunter2",
    ],
)
def test_a_bad_store_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Jobs(url)
    assert "hunter2" not in str(refused.value)
    assert "***" in str(refused.value)


def test_a_password_that_breaks_the_url_is_said_to_need_escaping() -> None:
    with pytest.raises(ConfigurationError, match="percent-encoded"):
        Jobs("postgresql://app:hunter2/x@127.0.0.1:5432/app")
    with pytest.raises(ConfigurationError, match="Port out of range"):
        Jobs("postgresql://app:hunter2/x@127.0.0.1:99999/app")  # the host's own fault


def test_the_settings_repr_leaves_the_url_out() -> None:
    jobs = Jobs("postgresql://app:hunter2@127.0.0.1/test")
    assert "hunter2" not in repr(jobs.settings)
    assert "hunter2" not in repr(jobs)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:1234/hunter2@127.0.0.1:5432/app",
        # A ? after the /: the rest reads as the query, which the store rewrites to
        # take its own settings out; the host must survive it (not the password).
        "postgresql://app:1/hunter2?x=1@127.0.0.1:5432/app?pool_min=1",
        # An & in the password: its repr raised ValueError quoting the password's tail.
        "postgresql://app:p&password=hunter2@127.0.0.1:5432/app",
    ],
)
def test_a_store_never_shows_a_password_typed_unescaped(url: str) -> None:
    """With a / in the password, the URL reads as host "app", port 1234: the store's
    name in every message must not show the rest (the password) as its path."""
    jobs = Jobs(url)
    assert "hunter2" not in repr(jobs.store)
    assert repr(jobs.store) == "PostgresStore('postgresql://127.0.0.1:5432/app')"


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("postgres://app:pw@DB.example:5432/app", "postgresql://app@db.example/app", True),
        ("postgresql://app@db/app?search_path=a", "postgresql://app@db/app?search_path=b", False),
        ("postgresql://app@db/app?search_path=a", "postgresql://app@db/app", False),
        ("postgresql://app@db/app", "postgresql://admin@db/app", False),
        ("postgresql://app@db/app", "postgresql://app@db:5433/app", False),
    ],
)
def test_postgres_stores_not_yet_open_are_the_same_by_their_normalised_url(
    one: str, other: str, same: bool
) -> None:
    """Their repr shows none of the user, password and parameters (search_path)."""
    first, second = open_store(one), open_store(other)
    assert first._same_jobs(second) is same  # type: ignore[attr-defined]


async def test_a_pathlib_path_is_taken_as_a_plain_file_path(tmp_path: Path) -> None:
    """``Jobs(tmp_path / "jobs.db")`` raised AttributeError ('PosixPath' object has no
    attribute 'startswith'): a plain file path, as Python spells one, was refused."""
    jobs = Jobs(tmp_path / "jobs.db")
    try:
        assert isinstance(jobs.store, SQLiteStore)
        assert jobs.store.path == tmp_path / "jobs.db"
        assert await jobs.list() == []
        assert (tmp_path / "jobs.db").exists()
    finally:
        await jobs.close()


def test_a_url_that_is_not_text_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="url must be"):
        Jobs(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        ":memory:",
        "sqlite:///:memory:",
        "file::memory:",
        "sqlite:///file::memory:?cache=shared",
        "file:jobs?mode=memory&cache=shared",
    ],
)
def test_an_in_memory_sqlite_database_is_refused_not_made_a_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's in-memory names were taken as file names: Jobs(":memory:") created a file
    called ":memory:" in the working directory. A real in-memory database would be
    neither durable nor shared by the store's several connections."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="in-memory") as refused:
        Jobs(url, workers=False)
    assert "tmp_path" in str(refused.value)
    with pytest.raises(ConfigurationError, match="in-memory"):
        SQLiteStore(":memory:")
    assert list(tmp_path.iterdir()) == []


async def test_a_file_in_a_folder_named_memory_is_still_a_file(tmp_path: Path) -> None:
    jobs = Jobs(tmp_path / ":memory:", workers=False)
    try:
        assert await jobs.list() == []
        assert (tmp_path / ":memory:").exists()
    finally:
        await jobs.close()


@pytest.mark.parametrize(
    "url", ["sqlite:///jobs.db", "sqlite:////abs/jobs.db", "postgresql://db/x"]
)
def test_a_url_given_to_sqlitestore_as_its_path_is_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLiteStore takes a file path: given a URL, it made a folder called "sqlite:" in
    the working directory and kept the jobs there, where nothing else looks."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"takes a file path, not a URL.*open_store"):
        SQLiteStore(url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "path",
    [
        "sqlite:jobs.db",
        "sqlite:/jobs.db",
        "SQLite:jobs.db",
        Path("sqlite:///jobs.db"),  # a Path folds the slashes: sqlite:/jobs.db
        "postgresql:/app:secret@db/app",
    ],
)
def test_a_url_without_its_slashes_given_to_sqlitestore_is_refused(
    path: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store URL typed without its two slashes is no file path either: SQLiteStore
    made a file called "sqlite:jobs.db" (or a folder "sqlite:") in the working directory
    and kept the jobs there, where nothing else looks. The value is not repeated: a
    PostgreSQL URL may hold a password."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"not a URL.*open_store") as raised:
        SQLiteStore(path)
    assert "secret" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
