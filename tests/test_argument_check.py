"""Arguments a task's function cannot take are refused at enqueue, with nothing written:
such a job would fail with ``TypeError`` at every attempt and end dead. Chains with
``pass_result`` and a batch's ``on_complete`` count the arguments they add."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from asyncjobs import Jobs, JobSpec
from asyncjobs._arguments import Arguments
from asyncjobs.testing import drain


async def _all(a, b=1, /, c=2, *args, d, e=3, **kwargs): ...  # type: ignore[no-untyped-def]
async def _plain(a, b, c=1): ...  # type: ignore[no-untyped-def]
async def _positional_only(a, /, b=1): ...  # type: ignore[no-untyped-def]
async def _keyword_only(*, a, b=1): ...  # type: ignore[no-untyped-def]
async def _var_positional(a, *args): ...  # type: ignore[no-untyped-def]
async def _var_keyword(a, **kwargs): ...  # type: ignore[no-untyped-def]
async def _positional_only_and_var_keyword(a, /, **kwargs): ...  # type: ignore[no-untyped-def]
async def _nothing(): ...  # type: ignore[no-untyped-def]


@pytest.mark.parametrize(
    "fn",
    [
        _all,
        _plain,
        _positional_only,
        _keyword_only,
        _var_positional,
        _var_keyword,
        _positional_only_and_var_keyword,
        _nothing,
        functools.partial(_plain, 1),
        functools.partial(_plain, c=5),
    ],
)
def test_the_precomputed_check_agrees_with_python(fn: Callable[..., Any]) -> None:
    """Every call of up to 4 positional arguments and any set of these keywords binds
    exactly when Python binds it (``Signature.bind`` wrongly refuses a positional-only
    name given by keyword to ``**kwargs``, when the parameter has a default)."""
    arguments = Arguments.of(fn)
    assert arguments.regular
    names = ["a", "b", "c", "d", "e", "x"]
    for n in range(5):
        for r in range(len(names) + 1):
            for chosen in itertools.combinations(names, r):
                args, kwargs = tuple(range(n)), dict.fromkeys(chosen, 0)
                try:
                    fn(*args, **kwargs).close()  # binds, then closes the coroutine unrun
                except TypeError:
                    binds = False
                else:
                    binds = True
                assert arguments.accepts(args, kwargs) is binds, (args, kwargs)
                if binds:
                    arguments.check("t", args, kwargs)
                else:
                    with pytest.raises(TypeError, match="'t' cannot take these arguments"):
                        arguments.check("t", args, kwargs)


async def _refused(jobs: Jobs, enqueue: Awaitable[Any], *message: str) -> None:
    with pytest.raises(TypeError) as refused:
        await enqueue
    for part in message:
        assert part in str(refused.value)
    assert await jobs.list() == [], "a refused job was written"


async def test_a_missing_argument_is_refused_at_enqueue_naming_it(jobs: Jobs) -> None:
    @jobs.task(name="send_email")
    async def send_email(user_id: int, address: str) -> None: ...

    missing = ("send_email", "missing a required argument: 'address'")
    await _refused(jobs, send_email.enqueue(1), *missing)  # type: ignore[call-arg]
    await _refused(jobs, jobs.enqueue(send_email, 1), *missing)  # type: ignore[call-overload]
    await _refused(jobs, jobs.enqueue("send_email", 1), *missing)
    await _refused(jobs, jobs.enqueue(JobSpec(task="send_email", args=(1,))), *missing)
    await _refused(jobs, jobs.enqueue(send_email.options(delay=5).spec(1)), *missing)  # type: ignore[call-arg]
    await _refused(
        jobs,
        jobs.enqueue_many([send_email.spec(1, "a@example.com"), send_email.spec(2)]),  # type: ignore[call-arg]
        *missing,
    )


async def test_too_many_positional_arguments_are_refused_at_enqueue(jobs: Jobs) -> None:
    @jobs.task(name="ping")
    async def ping(host: str) -> None: ...

    too_many = ("'ping'", "too many positional arguments")
    await _refused(jobs, ping.enqueue("a", "b"), *too_many)  # type: ignore[call-arg]
    await _refused(jobs, jobs.enqueue("ping", "a", "b"), *too_many)


async def test_an_unexpected_keyword_argument_is_refused_at_enqueue(jobs: Jobs) -> None:
    @jobs.task(name="ping")
    async def ping(host: str) -> None: ...

    unexpected = ("'ping'", "unexpected keyword argument 'port'")
    await _refused(jobs, ping.enqueue("a", port=80), *unexpected)  # type: ignore[call-arg]
    await _refused(jobs, jobs.enqueue("ping", "a", port=80), *unexpected)
    twice = ping.enqueue("a", host="b")  # type: ignore[misc]
    await _refused(jobs, twice, "'ping'", "multiple values for argument 'host'")


async def test_positional_only_and_keyword_only_parameters_are_checked(jobs: Jobs) -> None:
    @jobs.task(name="resize")
    async def resize(image: str, /, width: int = 100, *, quality: int) -> list[Any]:
        return [image, width, quality]

    await _refused(jobs, jobs.enqueue("resize", image="a.png", quality=1), "'image'")
    await _refused(jobs, jobs.enqueue("resize", "a.png", 50), "'quality'")
    await _refused(jobs, jobs.enqueue("resize", "a.png", 50, 80), "too many positional")
    first = await resize.enqueue("a.png", quality=80)
    second = await resize.enqueue("b.png", width=50, quality=90)
    await drain(jobs)
    assert await first.result(timeout=5) == ["a.png", 100, 80]
    assert await second.result(timeout=5) == ["b.png", 50, 90]


async def test_a_task_taking_args_and_kwargs_accepts_anything(jobs: Jobs) -> None:
    @jobs.task(name="echo")
    async def echo(*args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    @jobs.task(name="mixed")
    async def mixed(first: int, /, *rest: int, **options: int) -> list[Any]:
        return [first, list(rest), options]

    handles = [
        await echo.enqueue(),
        await echo.enqueue(1, 2, 3, first=4),
        await jobs.enqueue("mixed", 1, 2, 3, first=4),  # ``first`` is positional-only
    ]
    await drain(jobs)
    assert [await h.result(timeout=5) for h in handles] == [
        [[], {}],
        [[1, 2, 3], {"first": 4}],
        [1, [2, 3], {"first": 4}],
    ]


async def test_a_task_enqueued_by_a_name_not_defined_here_is_not_checked(jobs: Jobs) -> None:
    job = await jobs.enqueue("defined_elsewhere", 1, 2, anything=3)
    assert (await job.info()).args == [1, 2]


async def test_a_decorator_that_supplies_an_argument_is_not_second_guessed(jobs: Jobs) -> None:
    """The check binds the call the runner makes, to the function registered: not to the
    signature ``functools.wraps`` copies from the function it wraps."""

    def with_connection(
        fn: Callable[..., Awaitable[str]],
    ) -> Callable[..., Awaitable[str]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> str:
            return await fn("conn", *args, **kwargs)

        return wrapper

    @jobs.task(name="store_user")
    @with_connection
    async def store_user(connection: str, user_id: int) -> str:
        return f"{connection}:{user_id}"

    job = await store_user.enqueue(42)
    await drain(jobs)
    assert await job.result(timeout=5) == "conn:42"


async def test_a_copy_with_options_is_checked_and_shares_the_precomputed_signature(
    jobs: Jobs,
) -> None:
    @jobs.task(name="ping")
    async def ping(host: str) -> None: ...

    copy = ping.options(priority=3)
    assert copy.arguments is ping.arguments
    await _refused(jobs, copy.enqueue(), "'ping'", "'host'")  # type: ignore[call-arg]


# -- chains and batches ---------------------------------------------------------------


async def test_a_chain_passing_results_counts_the_result_as_the_first_argument(
    jobs: Jobs,
) -> None:
    @jobs.task(name="fetch")
    async def fetch(url: str) -> int:
        return len(url)

    @jobs.task(name="double")
    async def double(value: int) -> int:
        return value * 2

    @jobs.task(name="notify")
    async def notify() -> None: ...

    chain = await jobs.chain(fetch.spec("abc"), double.spec(), pass_result=True)  # type: ignore[call-arg]
    await drain(jobs)
    assert await chain.result(timeout=5) == 6

    await jobs.purge(status="succeeded")
    # The same spec, right for a plain enqueue, is one argument too many there.
    await _refused(
        jobs,
        jobs.chain(fetch.spec("abc"), double.spec(3), pass_result=True),
        "'double'", "too many positional arguments", "pass_result=True",
    )  # fmt: skip
    await _refused(
        jobs,
        jobs.chain(fetch.spec("abc"), notify.spec(), pass_result=True),
        "'notify'", "too many positional arguments",
    )  # fmt: skip
    # The first member is given nothing.
    unfetched = jobs.chain(fetch.spec(), double.spec(), pass_result=True)  # type: ignore[call-arg]
    await _refused(jobs, unfetched, "'fetch'", "'url'")
    # Without pass_result, each member takes only its own arguments.
    await _refused(jobs, jobs.chain(fetch.spec("abc"), double.spec()), "'double'", "'value'")  # type: ignore[call-arg]
    chain = await jobs.chain(fetch.spec("abc"), notify.spec())
    await drain(jobs)
    assert await chain.status() == "succeeded"


async def test_a_batch_on_complete_counts_the_batch_keyword_it_is_given(jobs: Jobs) -> None:
    @jobs.task(name="work")
    async def work(n: int) -> None: ...

    @jobs.task(name="report")
    async def report(label: str, *, batch: dict[str, Any]) -> str:
        return f"{label}: {batch['succeeded']}"

    @jobs.task(name="plain_done")
    async def plain_done() -> None: ...

    @jobs.task(name="takes_batch_twice")
    async def takes_batch_twice(label: str, batch: Any = None) -> None: ...

    made = await jobs.batch([work.spec(1)], on_complete=report.spec("done"))  # type: ignore[call-arg]
    empty = await jobs.batch([], on_complete=report.spec("none"))  # type: ignore[call-arg]
    await drain(jobs)
    assert made.on_complete is not None
    assert empty.on_complete is not None
    assert await made.on_complete.result(timeout=5) == "done: 1"
    assert await empty.on_complete.result(timeout=5) == "none: 0"
    await jobs.purge(status="succeeded")

    await _refused(jobs, jobs.batch([work.spec(1)], on_complete=report.spec()), "'label'")  # type: ignore[call-arg]
    extra = jobs.batch([work.spec(1)], on_complete=plain_done.spec(1))  # type: ignore[call-arg]
    await _refused(jobs, extra, "'plain_done'")
    await _refused(  # its own second argument would be given twice
        jobs,
        jobs.batch([work.spec(1)], on_complete=takes_batch_twice.spec("x", 2)),
        "multiple values for argument 'batch'", "on_complete",
    )  # fmt: skip
    await _refused(jobs, jobs.batch([work.spec(1), work.spec()]), "'work'", "'n'")  # type: ignore[call-arg]
