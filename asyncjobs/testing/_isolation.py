"""``replace_store``: run the app's own ``Jobs`` (its registered tasks) on a test store."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asyncjobs._clock import Clock
from asyncjobs._errors import AsyncJobsError
from asyncjobs._jobs import Jobs


@asynccontextmanager
async def replace_store(jobs: Jobs, url: str, *, clock: Clock | None = None) -> AsyncIterator[Jobs]:
    """Point ``jobs`` at the store ``url`` (and ``clock``) for the block, then restore it.

    The same object keeps its registered tasks, queues and limiters, so the app's
    own ``@jobs.task`` functions enqueue into (and ``drain`` runs them from) the
    test store. Every other setting is kept. ``jobs`` must not be running; what the
    block starts is stopped and the test store is closed on exit.
    """
    if jobs.started:
        raise AsyncJobsError("replace_store() needs a Jobs whose workers are not started")
    saved = dict(vars(jobs))
    settings = jobs.settings
    options: dict[str, Any] = {
        name: getattr(settings, name)
        for name in inspect.signature(Jobs.__init__).parameters
        if name not in ("self", "url", "clock", "store") and hasattr(settings, name)
    }
    Jobs.__init__(jobs, url, clock=clock or settings.clock, **options)
    fresh = vars(jobs)
    copies: dict[int, Any] = {}  # a container shared by two holders stays shared
    _carry_registrations(saved, fresh, copies)
    for name, value in saved.items():
        component = fresh.get(name)
        if type(component) is type(value) and hasattr(value, "__dict__") and value is not jobs:
            _carry_registrations(vars(value), vars(component), copies)  # the scheduler's too
    # Schedules as registered, not as ticked: on this store and clock none has ticked.
    jobs.scheduler.forget_ticks()
    try:
        yield jobs
    finally:
        try:
            await jobs.close()
        finally:
            fresh.clear()
            fresh.update(saved)


def _carry_registrations(
    saved: dict[str, Any], fresh: dict[str, Any], copies: dict[int, Any]
) -> None:
    """Registrations (tasks, queue limits, limiters, schedules) live in containers that a
    new instance starts with empty: carry copies over (what the block registers ends
    with it), take everything else fresh."""
    for name, value in saved.items():
        if _is_registration(value, fresh.get(name)):
            if id(value) not in copies:
                copies[id(value)] = type(value)(value)
            fresh[name] = copies[id(value)]


def _is_registration(saved: object, fresh: object) -> bool:
    """A non-empty container that a new ``Jobs`` starts with empty."""
    if not isinstance(saved, dict | list | set) or not saved:
        return False
    return type(fresh) is type(saved) and not fresh
