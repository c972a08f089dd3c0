"""How ``PostgresStore`` reaches the server: the pool (opened with the schema
migrated), the LISTEN connection and the enqueue connection, closing them, and running
an operation on a connection. Driver errors (``DRIVER_ERRORS``) become ``StoreError``
here; those that mean the server is out of reach (``is_connection_error``) start a
backoff, and an operation on a connection that died under a restart is retried once.
The caller's own connection (transactional enqueue) is checked to be on the store's
database (``check_caller``), and its errors are the caller's (``_caller_errors``): they
never count towards the store's backoff.

``_Connections`` holds these methods of ``PostgresStore``, which inherits them. What the
driver's errors mean lives in ``_postgres_errors``, and the waits that the store's
deadline cuts short in ``_postgres_deadlines`` (``_Deadlines``, which ``_Connections``
inherits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from asyncjobs._errors import ConfigurationError, StoreError
from asyncjobs.stores import redacted
from asyncjobs.stores._opening import Opening
from asyncjobs.stores._postgres_deadlines import _Deadlines
from asyncjobs.stores._postgres_errors import (
    _LOST,
    DRIVER_ERRORS,
    NotSent,
    _connection_lost,
    _refused_kind,
    backoff,
    is_connection_error,
)
from asyncjobs.stores._postgres_schema import migrate, schema_without_store
from asyncjobs.stores._postgres_sql import channel, retry_deadlocks

if TYPE_CHECKING:
    from asyncjobs.stores._postgres_sql import Connection, Pool

logger = logging.getLogger(__name__)

T = TypeVar("T")

OWN_PIDS = 256
"""The server pids of its own connections a store remembers (the newest): more than a
pool holds at once, while the pool replaces idle ones over the hours."""


Place: TypeAlias = tuple[str, str]
"""Where a session is: its server's start time and its database (``check_caller``)."""


async def where(conn: Connection) -> Place:
    """Where ``conn``'s session is: its ``Place``. The start time is turned into text by
    the server, in microseconds since the epoch: a caller's connection may decode
    ``timestamptz`` with a codec of its own."""
    (row,) = await conn.fetch(
        "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint::text, "
        "current_database()::text"
    )
    return (row[0], row[1])


async def _keep_session(conn: Connection) -> None:
    """Release a pooled connection without asyncpg's default reset round trip.

    The default runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: a round trip per store operation (0.15 ms of a
    0.6 ms enqueue when measured). Pool connections are this store's own and never
    change session state (no SET, LISTEN, session advisory lock or cursor outside
    a transaction; the LISTEN connection is not pooled), so there is nothing to
    reset. asyncpg still rolls back a transaction left open before calling this.
    """


def _session(conn: Any) -> Any:
    """The connection behind ``conn``: a pool's proxy is new at each acquire (and
    cannot be weakly referenced), the connection it lends is the session."""
    inner = getattr(conn, "_con", None)  # None once the proxy is released
    return conn if inner is None else inner


async def _close_pool(pool: Pool) -> None:
    """Close ``pool`` within 5 s; past that, or failing, terminate its connections."""
    try:
        await asyncio.wait_for(pool.close(), timeout=5)
    except DRIVER_ERRORS:
        pool.terminate()


class _Connections(_Deadlines):
    """``PostgresStore``'s pool, LISTEN and enqueue connections, and running an
    operation on one of them."""

    if TYPE_CHECKING:
        url: str
        pool_min: int
        pool_max: int
        connect_timeout: float
        max_backoff: float
        _server_settings: dict[str, str]
        _pool: Pool | None
        _loop: asyncio.AbstractEventLoop | None
        _opening: Opening
        _listener: Connection | None
        _producer: Connection | None
        _producing: bool
        _channel: str | None
        _schema: str | None
        _notified: bool
        _wake: Callable[[], None] | None
        _own_pids: dict[int, None]
        _failures: int
        _retry_at: float
        _listen_failures: int
        _listen_retry_at: float
        _database: Place | None
        _callers: weakref.WeakKeyDictionary[Any, Place]

    # -- connections -----------------------------------------------------------------

    async def open(self) -> None:
        self._leave_ended_loop()
        if self._is_open():
            return
        async with self._opening.lock:
            if self._is_open():
                return
            await self._opening.run(self, self._connect)

    async def _connect(self) -> None:
        """Open the pool and migrate the schema (``open``, in a task of its own)."""
        async with self._errors("open", opening=True):
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=self.connect_timeout,
                reset=_keep_session,
                init=self._own,
                server_settings=self._server_settings,
            )
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
                    self._schema = await conn.fetchval("SELECT current_schema()")
                    self._database = await where(conn)
                    self._channel = await channel(conn)
            except BaseException:
                await _close_pool(pool)
                raise
        self._pool = pool
        self._loop = asyncio.get_running_loop()

    async def schema_without_store(self) -> str | None:
        """The schema the store would create its tables in, if it holds none yet
        (``_postgres_schema.schema_without_store``), read on a connection of its own
        before the store opens, so nothing is created. A failure to connect is the
        one opening the store would report."""
        async with self._errors("open", opening=True):
            conn = await asyncpg.connect(
                self.url,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings=self._server_settings,
            )
            try:
                return await schema_without_store(conn)
            finally:
                await conn.close(timeout=self.connect_timeout)

    def _leave_ended_loop(self) -> None:
        """Forget the connections opened in another event loop (a script's or a sync
        app's earlier ``asyncio.run()``, which ended with the store open): they can be
        neither used nor closed from this one, and the store opens anew. Their sockets
        close as Python collects them, which ends their sessions on the server."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            return
        self._loop = None
        self._pool = self._listener = self._producer = None
        self._producing = False
        self._opening = Opening()  # its lock may be bound to the other loop

    async def close(self) -> None:
        self._leave_ended_loop()
        # Once an open in progress has ended, or been cancelled past OPEN_CLOSE_TIME
        # (``Opening.closing``): else it would leave a pool connected behind this.
        async with self._opening.closing(self):
            await self._disconnect()

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        producer, self._producer = self._producer, None
        for conn in (listener, producer):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        if pool is not None:
            await _close_pool(pool)

    def _is_open(self) -> bool:
        return self._pool is not None

    async def _listen(self) -> bool:
        """(Re)open the LISTEN connection; failures leave polling to do the work."""
        channel = self._channel
        if channel is None:
            return False
        try:
            conn = await asyncpg.connect(self.url, timeout=self.connect_timeout)
            try:
                await conn.add_listener(channel, self._on_notify)
            except BaseException:
                conn.terminate()
                raise
        except DRIVER_ERRORS as error:
            logger.warning("PostgreSQL store: cannot LISTEN (%s); polling instead", error)
            return False
        self._listener = conn
        return True

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if pid in self._own_pids:
            return  # this store's own insert: its enqueue woke the runner already
        self._notified = True  # another process's write, or a caller's own connection's
        if self._wake is not None:
            self._wake()

    async def _own(self, conn: Connection) -> None:
        """Note a connection of this store's own (its pool's, its enqueue connection)."""
        self._own_pids[conn.get_server_pid()] = None
        while len(self._own_pids) > OWN_PIDS:  # connections come and go: the oldest
            del self._own_pids[next(iter(self._own_pids))]

    def on_change(self, wake: Callable[[], None] | None) -> bool:
        """Another process's write, heard by the LISTEN connection, calls ``wake`` (and
        ``changed()`` reports it). A write of this store's own connections does neither:
        the enqueue woke the runner (or gave it the job) already, and a wake would cost
        an empty claim per enqueue. (A pid of ours the server gives again to another
        process's connection: its writes are seen at the next poll.)"""
        self._wake = wake
        return True

    @contextlib.asynccontextmanager
    async def _errors(self, what: str, *, opening: bool = False) -> AsyncIterator[None]:
        """Map driver errors to StoreError; track reachability for the backoff.

        ``opening``: the store is not open yet (``Jobs.start()``, or a first operation),
        so no reconnect is under way to promise: the message says that the store could
        not connect, to which URL (its password hidden) and why."""
        try:
            yield
        except DRIVER_ERRORS as error:
            if not is_connection_error(error):
                kind = _refused_kind(error)
                raise kind(f"PostgreSQL store {self!r} ({what}): {error}") from error
            delay = self._backoff()  # a first operation that opens it backs off too
            cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if opening:
                raise StoreError(
                    f"PostgreSQL store could not connect to {redacted(self.url)!r} "
                    f"({what}): {cause}"
                ) from error
            raise StoreError(
                f"PostgreSQL store {self!r} is unreachable ({what}): {cause}; "
                f"reconnecting in {delay:.1f}s"
            ) from error
        else:
            self._failures = 0

    @contextlib.contextmanager
    def _caller_errors(self, conn: Connection, what: str) -> Iterator[None]:
        """Map driver errors on the caller's own connection (transactional enqueue) to
        StoreError naming that connection. Unlike ``_errors`` this leaves the backoff
        alone: the caller's connection failing (cut, closed, its transaction aborted)
        says nothing of the store's, and counting it would refuse every other enqueue
        of the process as "unreachable" for the backoff."""
        try:
            yield
        except DRIVER_ERRORS as error:
            lost = is_connection_error(error)
            kind = StoreError if lost else _refused_kind(error)
            raise kind(
                f"PostgreSQL store {self!r} ({what}): the caller's connection {conn!r} "
                f"{'was lost' if lost else 'failed'}: {type(error).__name__}: {error}"
            ) from error

    async def check_caller(self, conn: Connection) -> None:
        """Refuse (``ConfigurationError``) a caller's connection that is not on this
        store's database: jobs inserted through it would commit where this store never
        looks (unnoticed if that database has asyncjobs tables in the same schema).

        Compared: the server, by ``pg_postmaster_start_time()`` (to the microsecond),
        and ``current_database()``. Any role may read the start time, over TCP or a
        unix socket, whatever address or port reached the server (``inet_server_addr()``
        is NULL over a socket and differs by address), and it tells apart copies of one
        cluster, which share ``pg_control_system()``'s ``system_identifier`` (a server
        restored from a file-level backup of another). A restart changes it, so this
        store's own is read again before refusing. The schema is not compared: the
        insert names this store's schema itself, whatever the connection's
        ``search_path``. A session never changes server or database, so its answer is
        kept while the connection lives: one round trip on its first block only.
        Limits: two servers started in the same microsecond (a copy of a running
        machine) pass for one; a pooler that sends read-only statements to a standby
        makes the check see the standby, and refuse.
        """
        session = _session(conn)
        try:
            place = self._callers.get(session)
        except TypeError:  # not weakly referable (a released proxy): asked each time
            place = None
        if place is None:
            with self._caller_errors(conn, "transaction"):
                place = await where(conn)
            with contextlib.suppress(TypeError):
                self._callers[session] = place
        if place == self._database:
            return
        # This store's own may be from before a restart (or a failover): read it again.
        self._database = await self._run("transaction", where)
        if place == self._database:
            return
        started, database = self._database
        elsewhere = "" if place[0] == started else " of another server"
        raise ConfigurationError(
            f"jobs.transaction() needs a connection to the job store's database "
            f"{database!r}, but the connection is on {place[1]!r}{elsewhere} (servers "
            f"told apart by their start time: {started} and {place[0]} µs since the "
            f"epoch); pass a connection made with the store's URL"
        )

    def _backoff(self) -> float:
        """Count a failed connection; the next attempt waits (``backoff``). Operations
        that were under way together fail together: they count once, not each."""
        # Reconnect bookkeeping on the loop's clock; job time never comes from here.
        now = asyncio.get_running_loop().time()
        if self._failures and now < self._retry_at:
            return self._retry_at - now
        self._failures += 1
        delay = backoff(self._failures, self.max_backoff)
        self._retry_at = now + delay
        return delay

    async def _run(
        self,
        what: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        producer: bool = False,
        now: bool = False,
    ) -> T:
        """Run ``fn`` on a pooled connection (``producer``: on the enqueue connection when
        it is free): open on first use, back off while down (unless ``now``: a write that
        must not wait), and retry once when the connection turns out to have died (server
        restart). Raises ``NotSent`` when it did not try."""
        if not now and self._failures and asyncio.get_running_loop().time() < self._retry_at:
            raise NotSent(
                f"PostgreSQL store {self!r} is unreachable ({what}); "
                "waiting before the next reconnect attempt"
            )
        if self._pool is None or self._loop is not asyncio.get_running_loop():
            await self.open()  # on first use, or in another event loop than the last
        pool = self._pool
        if pool is None:
            raise NotSent(f"PostgreSQL store {self!r} is closed")
        async with self._errors(what):
            for attempt in (1, 2):
                try:
                    if producer and not self._producing:
                        return await self._on_producer(fn)
                    # Bounded by a deadline even one set while it waits: a new
                    # connection on a silent network waits for connect_timeout.
                    async with self._by_deadline("a connection"):
                        conn = await pool.acquire()
                    try:
                        return await self._bounded(conn, fn)
                    except _LOST as error:
                        if _connection_lost(error):
                            # The pool opens another, not this one again (unless the
                            # pool already took it back, seeing it closed).
                            with contextlib.suppress(asyncpg.InterfaceError):
                                conn.terminate()
                        raise
                    finally:
                        await pool.release(conn)
                except _LOST as error:
                    if attempt == 2 or not _connection_lost(error):
                        raise
                    logger.info("PostgreSQL store: connection lost; retrying %s once", what)
                    # The server ended it, and likely every other idle one with it (a
                    # restart): the retry gets a new connection, not another dead one.
                    await pool.expire_connections()
            raise AssertionError("unreachable")  # pragma: no cover

    async def _on_producer(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn`` on the enqueue connection, the store's own outside the pool: a lone
        producer skips the pool's acquire and release (a task and loop iterations each
        time). Opened on first use; dropped (and opened again) after an error that is not
        the server's answer to the statement."""
        self._producing = True
        try:
            conn = self._producer
            if conn is None or conn.is_closed():
                if self._pool is None:  # closed meanwhile: open nothing it would not close
                    raise StoreError(f"PostgreSQL store {self!r} is closed")
                async with self._by_deadline("a connection"):
                    conn = await asyncpg.connect(
                        self.url,
                        timeout=self.connect_timeout,
                        server_settings=self._server_settings,
                    )
                await self._own(conn)
                if not self._is_open():  # closed while it connected: keep nothing open
                    await conn.close()
                    raise StoreError(f"PostgreSQL store {self!r} is closed")
                self._producer = conn
            try:
                return await self._bounded(conn, fn)
            except asyncpg.PostgresError:
                raise  # the statement failed, the connection is fine (or is_closed())
            except BaseException:  # cancelled, cut off: its state is unknown
                self._producer = None
                conn.terminate()
                raise
        finally:
            self._producing = False

    async def _transaction(self, what: str, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn`` in a transaction, again if PostgreSQL ends it to break a deadlock
        (``retry_deadlocks``)."""

        async def in_transaction(conn: Connection) -> T:
            async def attempt() -> T:
                async with conn.transaction():
                    return await fn(conn)

            return await retry_deadlocks(what, attempt)

        return await self._run(what, in_transaction)
