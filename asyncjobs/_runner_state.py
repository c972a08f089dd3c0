"""``_RunnerState``: the state ``Runner`` shares between the modules it is made of.

``Runner`` (``_runner.py``) inherits its claim loops, slots, outbox, leases and the
running of one job from one mixin each; each mixin reads state that ``Runner.__init__``
sets, and calls methods another mixin defines. This class declares them once, for the
type checker: it holds no code and sets nothing (``Runner.__init__`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    import contextvars
    from collections.abc import Sequence
    from contextlib import AbstractContextManager

    import anyio

    from asyncjobs._clock import Clock
    from asyncjobs._execution import _Running
    from asyncjobs._jobs import Jobs
    from asyncjobs._outbox import _Finished
    from asyncjobs._settings import Settings
    from asyncjobs.stores._protocol import JobRow, Outcome, OutcomeKind


class _RunnerState:
    """What the mixins of ``Runner`` share: its state, and the methods one mixin calls
    on another (declared only; ``Runner`` and its mixins define them)."""

    jobs: Jobs
    settings: Settings
    clock: Clock
    worker_id: str
    started_at: float
    running: dict[str, _Running]  # attempts running here, by job id
    _stopping: list[_Running]  # earlier attempts stopping, their job claimed again here
    _left_behind: set[asyncio.Task[None]]  # tasks shutdown went on without
    jobs_started: int
    _start_limit: int | None
    _ready: list[JobRow]  # claimed ahead, waiting for a slot
    _accepting: bool
    _context: contextvars.Context
    _mean_duration: float | None
    _wakeup: asyncio.Event
    _slot_freed: asyncio.Event
    _outbox: list[_Finished]
    _writing: list[list[_Finished]]
    _confirmed: dict[str, tuple[int, float]]
    _next_token_at: float | None
    _partial: bool
    _reserved: set[str]
    _backlog: bool
    _queued_for_room: int
    _writes_give_up_at: float | None  # see _Outbox.set_store_deadline
    _shielded_writes: set[anyio.CancelScope]

    if TYPE_CHECKING:

        @property
        def draining(self) -> bool: ...

        @property
        def room(self) -> int: ...

        def wake(self) -> None: ...

        def cancel_local(self, job_id: str, attempt: int | None = None) -> None: ...

        def _give_back(self, rows: Sequence[JobRow]) -> None: ...

        async def claim(self) -> int: ...

        # _Slots
        def stop_accepting(self) -> None: ...

        async def cancel_running(self) -> None: ...

        def _free_slot(self) -> None: ...

        def _complete(self, running: _Running, outcome: Outcome | None, started: float) -> None: ...

        # _Outbox
        async def flush_outbox(self) -> int: ...

        def set_store_deadline(self, seconds: float | None) -> None: ...

        def _by_store_deadline(self) -> AbstractContextManager[None]: ...

        # _Leases
        async def recover(self) -> None: ...

        async def record_beat(self, *, stopped: bool = False) -> None: ...

        # _Execution
        async def _execute(self, running: _Running) -> None: ...

        def _outcome(
            self,
            row: JobRow,
            kind: OutcomeKind,
            *,
            result: str | None = None,
            error: str | None = None,
            run_at: float | None = None,
        ) -> Outcome: ...

        def _failure(self, row: JobRow, error: str, *, delay: float | None = None) -> Outcome: ...

        def _log(self, row: JobRow, outcome: Outcome, applied: bool, duration: float) -> None: ...
