"""ASGI integration: ``JobsMiddleware`` and ``jobs.lifespan``.

``JobsMiddleware`` is a pure ASGI middleware. On lifespan startup it runs the
wrapped app's own startup first (if the app speaks lifespan), then starts the
workers; on shutdown it stops the workers first (running jobs get
``shutdown_timeout``), then runs the app's shutdown, then closes the store.
Jobs therefore never run before, or after, the resources the app's lifespan
manages. Entries of one ``Jobs`` are counted (with ``jobs.lifespan`` and ``async with
jobs:``): the workers start at the first and stop, the store closing, at the last exit.
An app that does not speak lifespan (it raises before receiving the startup message)
still gets a complete startup and shutdown; one that raises after receiving
it failed its startup, which the server is told. Every HTTP and WebSocket scope carries
the ``Jobs`` in ``scope["state"]["jobs"]``, which Starlette shows as ``request.state.jobs``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from asyncjobs._clock import SystemClock

if TYPE_CHECKING:
    from asyncjobs._jobs import Jobs

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY = "jobs"


class JobsMiddleware:
    """Run ``jobs`` for the lifetime of the ASGI app and expose it on ``request.state.jobs``.

    ``Starlette(middleware=[Middleware(JobsMiddleware, jobs=jobs)])`` or
    ``JobsMiddleware(app, jobs=jobs)``. A failure to start (for example an
    unwritable store path) is reported as ``lifespan.startup.failed``, so the
    server refuses to start and prints why.
    """

    def __init__(self, app: ASGIApp, *, jobs: Jobs) -> None:
        self.app = app
        self.jobs = jobs
        self._told = False  # the lifespan ran, or the warning that it did not was given

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            self._told = True
            await self._lifespan(scope, receive, send)
            return
        if kind in ("http", "websocket"):
            if not self._told:
                self._warn_if_idle()
            state = scope.get("state")
            if state is None:
                scope["state"] = state = {}
            state[STATE_KEY] = self.jobs
        await self.app(scope, receive, send)

    def _warn_if_idle(self) -> None:
        """Say once that requests come but the lifespan never ran (``uvicorn --lifespan
        off``, or a mounted sub-app): no worker runs here, so jobs only queue up. Not
        on a fake clock: a test that sends no lifespan (httpx's ASGITransport) runs
        the jobs itself, with ``drain``."""
        self._told = True
        real_time = isinstance(self.jobs.clock, SystemClock)
        if self.jobs.settings.workers and not self.jobs.started and real_time:
            logger.warning(
                "JobsMiddleware got a request before any ASGI lifespan startup: the "
                "asyncjobs workers are not running in this process, and jobs enqueued here "
                "wait in the store until some process runs them. Run the server with its "
                "lifespan on (not `uvicorn --lifespan off`), put JobsMiddleware on the "
                "top-level app, or run `asyncjobs worker`; Jobs(..., workers=False) "
                "silences this for an enqueue-only process."
            )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - server bug
            raise RuntimeError(f"expected lifespan.startup, got {message['type']!r}")
        state = scope.get("state")
        if state is not None:
            state[STATE_KEY] = self.jobs
        app = _AppLifespan(self.app, scope)
        try:
            problems = await self._run_lifespan(app, receive, send)
        finally:
            app.close()
        if problems is None:
            # Startup failed and the server was told; raise as Starlette does, so a
            # test client (and the server's log) shows the cause as well.
            if app.error is not None:
                raise app.error
            return
        if problems:
            await send({"type": "lifespan.shutdown.failed", "message": "; ".join(problems)})
        else:
            await send({"type": "lifespan.shutdown.complete"})
        if app.shutdown_error is not None:
            # The server was told; raise as Starlette does, so that a test client shows
            # the app's failure as it would without this middleware.
            raise app.shutdown_error

    async def _run_lifespan(
        self, app: _AppLifespan, receive: Receive, send: Send
    ) -> list[str] | None:
        """Startup, wait, shutdown; the shutdown problems, or None when startup failed."""
        problems: list[str] | None = None
        async with anyio.create_task_group() as tg:
            try:
                problems = await self._serve(app, tg, receive, send)
            finally:
                tg.cancel_scope.cancel()
        return problems

    async def _serve(
        self, app: _AppLifespan, tg: TaskGroup, receive: Receive, send: Send
    ) -> list[str] | None:
        before = self.jobs._entries
        failed = await app.startup(tg)
        # Entries the wrapped app's startup made (jobs.lifespan in its own lifespan) are
        # nested in this one: their exits come in the app's shutdown, after the workers
        # stop, as they would without them.
        apps_own = max(self.jobs._entries - before, 0)
        if failed is not None:
            await _close_quietly(self.jobs)
            await send({"type": "lifespan.startup.failed", "message": failed})
            return None
        try:
            await self.jobs._enter()
        except Exception as error:
            app.error = error
            why = f"asyncjobs could not start: {error}"
            app_failed = await app.shutdown()
            if app_failed is not None:  # the server hears of no shutdown but this one
                why += f"; then the app's shutdown failed: {app_failed}"
            await _close_quietly(self.jobs)
            await send({"type": "lifespan.startup.failed", "message": why})
            return None
        await send({"type": "lifespan.startup.complete"})

        message = await receive()
        while message["type"] != "lifespan.shutdown":  # pragma: no cover - server bug
            message = await receive()
        problems: list[str] = []
        self.jobs._leave()
        last = self.jobs._entries <= apps_own  # else another app still needs the workers
        try:
            if last:
                try:
                    await self.jobs.stop()
                except Exception as error:
                    logger.exception("stopping the asyncjobs workers failed")
                    problems.append(f"stopping asyncjobs failed: {error}")
            app_failed = await app.shutdown()
        except BaseException:
            # Cancelled (a server's forced exit, a bound on the shutdown): no close
            # follows, and the store's connections would keep the process from exiting.
            # Workers still draining close it as they end (_close_once_stopped).
            if last and not self.jobs._in_use:
                await self.jobs._close_once_stopped()
            raise
        if app_failed is not None:
            problems.append(app_failed)
        if last and not self.jobs._in_use:
            try:
                await self.jobs.close()
            except Exception as error:
                logger.exception("closing the asyncjobs store failed")
                problems.append(f"closing the asyncjobs store failed: {error}")
        return problems


async def _close_quietly(jobs: Jobs) -> None:
    """Close after a failed startup, unless another app still uses ``jobs``."""
    if jobs._in_use:
        return
    try:
        await jobs.close()
    except Exception:
        logger.exception("closing asyncjobs after a failed start failed")


class _AppLifespan:
    """The wrapped app's side of the lifespan protocol, driven by the middleware."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.app = app
        self.scope = scope
        self.speaks_lifespan = False
        self._to_app, self._app_inbox = anyio.create_memory_object_stream[Message](2)
        self._started = anyio.Event()
        self._stopped = anyio.Event()
        self._exited = anyio.Event()
        self.error: BaseException | None = None
        """Why startup failed: the app's exception, or asyncjobs' own."""
        self.shutdown_error: BaseException | None = None
        """The app's exception once it had started (at shutdown, or while serving)."""
        self._startup_failed: str | None = None
        self._shutdown_failed: str | None = None
        self._took_startup = False
        """Whether the app received the startup message: an app that raises before that
        does not speak lifespan (as uvicorn takes it); one that raises after failed."""

    async def startup(self, tg: TaskGroup) -> str | None:
        """Run the app's startup; the app's failure message, or None when it started
        (or does not speak lifespan)."""
        self._to_app.send_nowait({"type": "lifespan.startup"})  # buffered: room for 2
        tg.start_soon(self._run, name="asyncjobs: app lifespan")
        async with anyio.create_task_group() as wait:

            async def exited() -> None:
                await self._exited.wait()
                wait.cancel_scope.cancel()

            wait.start_soon(exited)
            await self._started.wait()
            wait.cancel_scope.cancel()
        return self._startup_failed

    async def shutdown(self) -> str | None:
        """Run the app's shutdown (if it is still listening); its failure message or None."""
        if not self.speaks_lifespan or self._exited.is_set():
            self._to_app.close()
            return self._shutdown_failed  # the app's lifespan failed while serving
        try:
            await self._to_app.send({"type": "lifespan.shutdown"})
        except anyio.BrokenResourceError:  # the app's lifespan ended meanwhile
            return None
        finally:
            self._to_app.close()
        async with anyio.create_task_group() as wait:

            async def exited() -> None:
                await self._exited.wait()
                wait.cancel_scope.cancel()

            wait.start_soon(exited)
            await self._stopped.wait()
            wait.cancel_scope.cancel()
        return self._shutdown_failed

    def close(self) -> None:
        self._to_app.close()
        self._app_inbox.close()

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as error:
            if self._startup_failed is not None:
                if self.error is None:
                    self.error = error
            elif not self._started.is_set() and self._took_startup:
                # It took the startup message, so it speaks lifespan: its startup failed
                # (Starlette would have sent startup.failed itself).
                self.error = error
                self._startup_failed = f"the app's startup failed: {error!r}"
            elif not self._started.is_set():
                logger.info(
                    "the wrapped app does not handle ASGI lifespan (%r); "
                    "asyncjobs completes startup and shutdown itself",
                    error,
                )
            else:
                self.shutdown_error = error
                if not self._stopped.is_set():  # the app did not send shutdown.failed
                    logger.exception("the app's lifespan failed")
                    self._shutdown_failed = f"the app's lifespan failed: {error!r}"
        finally:
            self._app_inbox.close()
            self._exited.set()

    async def _receive(self) -> Message:
        try:
            message = await self._app_inbox.receive()
        except anyio.EndOfStream:  # pragma: no cover - closed only after shutdown was sent
            return {"type": "lifespan.shutdown"}
        self._took_startup = True
        return message

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.speaks_lifespan = True
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._startup_failed = message.get("message") or "the app's startup failed"
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._stopped.set()
        elif kind == "lifespan.shutdown.failed":
            self._shutdown_failed = message.get("message") or "the app's shutdown failed"
            self._stopped.set()
        else:  # pragma: no cover - not a lifespan message
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")


@asynccontextmanager
async def lifespan(jobs: Jobs) -> AsyncIterator[dict[str, Any]]:
    """Start ``jobs`` for the app's lifetime; yield the lifespan state ``{"jobs": jobs}``.

    A failure to start is logged in the words ``JobsMiddleware`` sends the server, then
    raised: the framework reports it as its lifespan's failure (with its traceback).
    Nested in another lifespan of ``jobs`` (or ``async with jobs:``), its exit leaves
    the workers to the last one to exit."""
    try:
        await jobs._enter()
    except Exception as error:
        logger.error("asyncjobs could not start: %s", error)
        raise
    try:
        yield {STATE_KEY: jobs}
    finally:
        if jobs._leave():
            await jobs.close()
