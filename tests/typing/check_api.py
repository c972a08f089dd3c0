"""Checked by mypy --strict, never run (pytest does not collect check_*.py).

Every ``# type: ignore[...]`` marks a call the types must reject. ``warn_unused_ignores``
(on under --strict) fails the build if a signature loosens and stops rejecting it.
"""

from __future__ import annotations

from asyncjobs import Job, Jobs, JobSpec, Task

jobs = Jobs("sqlite:///check.db")


@jobs.task(queue="email", retries=5)
async def send_email(user_id: int, address: str) -> bool:
    return True


@jobs.task
async def add(a: int, b: int) -> int:
    return a + b


async def right_calls() -> None:
    job: Job[bool] = await jobs.enqueue(send_email, 42, address="a@example.com")
    same: Job[bool] = await send_email.enqueue(42, "a@example.com")
    spec: JobSpec[int] = add.spec(1, b=2)
    total: Job[int] = await jobs.enqueue(spec)
    many = await jobs.enqueue_many([add.spec(1, 2), add.spec(3, 4)])
    later: Task[[int, str], bool] = send_email.options(delay=60, priority=5)
    by_name = await jobs.enqueue("elsewhere.task", 1, x="anything JSON")
    result: bool = await job.result(timeout=10)
    inline: int = await add(1, 2)
    del same, total, many, later, by_name, result, inline


async def wrong_calls() -> None:
    await jobs.enqueue(send_email, "42", address="a@example.com")  # type: ignore[arg-type]
    await jobs.enqueue(send_email, 42, address=7)  # type: ignore[arg-type]
    await send_email.enqueue("42", "a@example.com")  # type: ignore[arg-type]
    await send_email.enqueue(42)  # type: ignore[call-arg]
    await send_email.enqueue(42, "a", cc="b")  # type: ignore[call-arg]
    send_email.spec(42, address=None)  # type: ignore[arg-type]
    add.spec("1", 2)  # type: ignore[arg-type]
    await jobs.enqueue(add.spec(1, 2), 3)  # type: ignore[call-overload]
    wrong_result: Job[str] = await add.enqueue(1, 2)  # type: ignore[assignment]
    not_a_task = await jobs.enqueue(42)  # type: ignore[call-overload]
    send_email.options(delay="soon")  # type: ignore[arg-type]
    del wrong_result, not_a_task
