"""Commands of the ``asyncjobs`` CLI (click). Entry point: ``asyncjobs.cli.main``."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from asyncjobs._codec import visible
from asyncjobs._errors import AsyncJobsError
from asyncjobs._execution import MAX_ERROR_CHARS
from asyncjobs._jobs import Jobs
from asyncjobs._models import JobInfo, JobStatus, info_from_row
from asyncjobs._stats import GroupStats, Stats, human_duration
from asyncjobs.stores import JobRow, Preview, Store, redacted
from asyncjobs.stores._sqlite import SQLiteStore
from asyncjobs.stores._sqlite_schema import holds_no_store

T = TypeVar("T")

APP_HELP = "Your Jobs as module:attribute, e.g. myapp:jobs (or set $ASYNCJOBS_APP)."
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- loading the app ----------------------------------------------------------------


def load_jobs(spec: str | None, *, given_as: str = "--app") -> Jobs:
    """Import ``module:attribute`` (the current directory is importable) as a ``Jobs``;
    an error about it names where it was ``given_as``."""
    if not spec:
        raise click.UsageError("name your Jobs with --app module:attribute or $ASYNCJOBS_APP")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(
            f"{spec!r} is not module:attribute (e.g. myapp:jobs)", param_hint=given_as
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if not _names_the_module(error, module_name):
            raise  # one the app imports: its traceback shows where, as any error in it
        raise click.BadParameter(
            f"cannot import {module_name!r}: {error}", param_hint=given_as
        ) from error
    except AsyncJobsError as error:  # its Jobs(...) refused a setting: say it, no traceback
        raise click.ClickException(f"importing {module_name!r} failed: {error}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attribute!r}", param_hint=given_as
            ) from None
    if not isinstance(target, Jobs):
        raise click.BadParameter(
            f"{spec} is a {type(target).__name__}, not an asyncjobs.Jobs", param_hint=given_as
        )
    return target


def _names_the_module(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module missing is the one named (or a package on its path), not one
    that the app's module imports."""
    missing = error.name or ""
    return module_name == missing or module_name.startswith(missing + ".")


def run(ctx: click.Context, action: Callable[[Jobs], Awaitable[T]]) -> T:
    """Load the app, run ``action(jobs)`` in a fresh event loop, close the store.

    A SQLite store that does not exist is refused, not created: a mistyped path would
    otherwise read as an empty store (only the app and ``asyncjobs worker`` create it).
    So is a file without its tables (another database, an empty file), which would get
    them written into it, and a PostgreSQL schema without them (``_refuse_no_store``).
    """
    jobs = load_jobs(ctx.obj)
    store = jobs.store
    if isinstance(store, SQLiteStore):
        if not store.path.exists():
            raise click.ClickException(
                f"no asyncjobs store at {str(store.path)!r}: start the app (or "
                "`asyncjobs worker`) once to create it, or check the URL"
            )
        if holds_no_store(store.path):
            raise click.ClickException(
                f"no asyncjobs store in {str(store.path)!r}: the file holds no job tables; "
                "check the URL, or start the app (or `asyncjobs worker`) once to create them"
            )

    async def main() -> T:
        try:
            await _refuse_no_store(store)
            return await action(jobs)
        finally:
            await jobs.close()

    try:
        return asyncio.run(main())
    except AsyncJobsError as error:  # a store or setting problem: say it, no traceback
        raise click.ClickException(str(error)) from error


async def _refuse_no_store(store: Store) -> None:
    """Refuse a PostgreSQL store whose schema (the first of the URL's search_path, or
    ``public``) holds no asyncjobs tables, as ``run`` refuses such a SQLite file: opening
    it would create them there. Read on a connection of its own, before the store
    opens; the URL is shown without its password."""
    # A PostgresStore exists only once its module (which needs asyncpg) is imported.
    postgres = sys.modules.get("asyncjobs.stores._postgres")
    if postgres is None or not isinstance(store, postgres.PostgresStore):
        return
    schema = await store.schema_without_store()
    if schema is not None:
        raise click.ClickException(
            f"no asyncjobs store in schema {schema!r} of {redacted(store.url)!r}: it holds "
            "no job tables; check the URL (its search_path), or start the app (or "
            "`asyncjobs worker`) once to create them"
        )


def parse_duration(_ctx: click.Context, _param: click.Parameter, text: str | None) -> float | None:
    """An option's ``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (a click
    callback, so that an error names the option)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


# -- output -------------------------------------------------------------------------


def to_json(value: object) -> str:
    def default(obj: object) -> object:
        if isinstance(obj, datetime):
            return obj.isoformat()
        if isinstance(obj, enum.Enum):
            return obj.value
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return json_text(json.dumps(value, default=default, indent=2, ensure_ascii=False))


def report(job_id: str, done: bool, as_json: bool, *, key: str, said: str, refused: str) -> None:
    """The outcome of an action on one job: JSON or a line; exit 1 when it did not apply."""
    if as_json:
        click.echo(to_json({"id": job_id, key: done}))
    elif done:
        click.echo(f"job {job_id} {said}")
    if not done:
        raise click.ClickException(f"job {job_id} {refused}")


def job_dict(info: JobInfo) -> dict[str, object]:
    data = dataclasses.asdict(info)
    data["status"] = info.status.value
    return data


LIST_PREVIEW = 2 * MAX_ERROR_CHARS
"""The most of each job's stored arguments, result and error ``list --json`` reads
(characters): a result may be 64 MiB. An error as the runner stores it fits unless
its escaping (``storable``) grew it.
``show ID --json`` prints a job whole."""


def listed_dict(row: JobRow, now: float) -> dict[str, object]:
    """A job as ``list --json`` prints it: ``job_dict``, where a value whose stored JSON
    was longer than ``LIST_PREVIEW`` is null and ``truncated`` maps its name to that
    JSON's size in bytes (``{}`` when nothing was cut)."""
    data = job_dict(info_from_row(row, now))
    truncated: dict[str, int] = {}
    for value, keys in ((row.payload, ("args", "kwargs")), (row.result, ("result",)),
                        (row.error, ("error",))):  # fmt: skip
        if isinstance(value, Preview):
            for key in keys:
                data[key] = None
                truncated[key] = value.size
    data["truncated"] = truncated
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table with aligned columns (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def json_text(text: str) -> str:
    """JSON from ``json.dumps(..., ensure_ascii=False)``, for the terminal and still
    JSON, the same value: a character that does not print becomes its ``\\u`` escape
    (``visible``, as on the dashboard): DEL and the C1 controls, which ``json`` leaves
    raw (an 8-bit CSI, U+009B, starts an escape sequence), a format character (a
    right-to-left override turns around what follows it), a lone surrogate."""
    return visible(text, keep="\n")


def terminal(text: str) -> str:
    """``text`` for the operator's terminal: a control character (an escape sequence in
    an error message or a key could rewrite the screen) shown as its escape, ``\x1b``,
    and any other character that does not print (a right-to-left override, a lone
    surrogate) as its ``\\u`` escape (``visible``); newlines and tabs kept."""
    escaped = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
    return visible(escaped, keep="\n\t")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Three significant digits, but whole from 999.5 on: .3g writes 999.7 as 1e+03.
        return f"{value:.3g}" if abs(value) < 999.5 else f"{value:.0f}"
    if isinstance(value, datetime):  # aware: said to be UTC, as the dashboard does
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = terminal(str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _rate(group: GroupStats, window: str) -> str:
    rate = group["windows"][window]["failure_rate"]
    return "-" if rate is None else f"{rate:.0%}"


# -- commands -----------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--app", "app", envvar="ASYNCJOBS_APP", metavar="MODULE:ATTR", help=APP_HELP)
@click.version_option(package_name="asyncjobs")
@click.pass_context
def cli(ctx: click.Context, app: str | None) -> None:
    """Inspect and operate asyncjobs queues."""
    ctx.obj = app


@cli.command()
@json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts by status, age, throughput, failure rate and timings per queue and task."""
    result: Stats = run(ctx, lambda jobs: jobs.stats())
    if as_json:
        click.echo(to_json(result))
        return
    statuses = [s.value for s in JobStatus]
    rows: list[list[object]] = []
    for queue in result["queues"]:
        for task in queue["tasks"]:
            rows.append(
                [
                    queue["queue"],
                    task["task"],
                    *(task["counts"][s] for s in statuses),
                    human_duration(task["oldest_queued_age"]),
                    task["windows"]["1m"]["throughput"],
                    _rate(task, "5m"),
                    human_duration(task["run_time"]["p50"]),
                    human_duration(task["run_time"]["p99"]),
                    task["stuck"],
                ]
            )
    headers = [
        "queue",
        "task",
        *statuses,
        "oldest",
        "jobs/s 1m",
        "fail 5m",
        "run p50",
        "run p99",
        "stuck",
    ]
    click.echo(table(headers, rows) if rows else "no jobs")
    if result["workers"]:
        click.echo("\nworkers")
        click.echo(
            table(
                ["id", "alive", "running", "concurrency", "last seen"],
                [
                    [
                        w["id"],
                        "yes" if w["alive"] else "no",
                        w["running"],
                        w["concurrency"],
                        human_duration(w["seconds_since_seen"]) + " ago",
                    ]
                    for w in result["workers"]
                ],
            )
        )
    # Times below are ISO strings (stats are JSON-shaped): as datetimes, cells say UTC.
    if result["schedules"]:
        click.echo("\nschedules")
        click.echo(
            table(
                ["task", "schedule", "next run"],
                [
                    [s["task"], s["schedule"], datetime.fromisoformat(s["next_run_at"])]
                    for s in result["schedules"]
                ],
            )
        )
    if result["stuck_jobs"]:
        click.echo("\nstuck (lease expired, waiting for recovery)")
        click.echo(
            table(
                ["id", "task", "worker", "lease expired at"],
                [
                    [s["id"], s["task"], s["worker"], datetime.fromisoformat(s["lease_expired_at"])]
                    for s in result["stuck_jobs"]
                ],
            )
        )


@cli.command("list")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]), help="Only this status.")
@click.option("--queue", help="Only this queue.")
@click.option("--task", help="Only this task.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@click.pass_context
def list_jobs(
    ctx: click.Context,
    status: str | None,
    queue: str | None,
    task: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Jobs, newest first.

    With --json, arguments, a result or an error stored as more than 128 KiB are null,
    and named with that size in bytes under "truncated": `show ID --json` has them."""
    rows, now = run(
        ctx,
        lambda jobs: jobs._list_rows(
            status, queue, task, limit, preview=LIST_PREVIEW if as_json else 0
        ),  # the table shows none of them
    )
    if as_json:
        click.echo(to_json([listed_dict(row, now) for row in rows]))
        return
    infos = [info_from_row(row, now) for row in rows]
    if not infos:
        click.echo("no jobs")
        return
    click.echo(
        table(
            ["id", "task", "queue", "status", "attempts", "enqueued at", "finished at"],
            [
                [
                    i.id,
                    i.task,
                    i.queue,
                    i.status.value,
                    f"{i.attempts}/{i.max_attempts}",
                    i.enqueued_at,
                    i.finished_at,
                ]
                for i in infos
            ],
        )
    )


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """One job: arguments, result, attempts and last error."""
    info = run(ctx, lambda jobs: jobs.get(job_id))
    if info is None:
        raise click.ClickException(f"no job {job_id!r} (never enqueued, or pruned)")
    if as_json:
        click.echo(to_json(job_dict(info)))
        return
    data = job_dict(info)
    error = data.pop("error")
    width = max(len(k) for k in data)
    for key, value in data.items():
        shown = (
            json_text(json.dumps(value, ensure_ascii=False))
            if key in ("args", "kwargs", "result")
            else _cell(value)
        )
        click.echo(f"{key.ljust(width)}  {shown}")
    if error:
        click.echo("\nlast error:\n" + terminal(str(error).rstrip()))


@cli.command()
@click.argument("job_id", required=False)
@click.option("--all-dead", is_flag=True, help="Retry every dead job (of --queue/--task).")
@click.option("--queue", help="With --all-dead: only this queue.")
@click.option("--task", help="With --all-dead: only this task.")
@json_option
@click.pass_context
def retry(
    ctx: click.Context,
    job_id: str | None,
    all_dead: bool,
    queue: str | None,
    task: str | None,
    as_json: bool,
) -> None:
    """Put a dead or cancelled job (or every dead one) back in the queue."""
    if all_dead == (job_id is not None):
        raise click.UsageError("give a job id or --all-dead (not both)")
    if job_id is None:
        count = run(ctx, lambda jobs: jobs.retry_dead(queue=queue, task=task))
        click.echo(to_json({"retried": count}) if as_json else f"retried {count} dead job(s)")
        return
    if queue or task:
        raise click.UsageError("--queue and --task go with --all-dead")

    async def retry_job(jobs: Jobs) -> tuple[bool, bool]:
        """Whether it was retried, and whether it waits again (see ``Jobs.retry``)."""
        if not await jobs.retry(job_id):
            return False, False
        info = await jobs.get(job_id)
        return True, info is not None and info.status is JobStatus.WAITING

    done, waits = run(ctx, retry_job)
    # A chain member that never ran (or a batch's on_complete) waits again: not queued.
    said = "queued again"
    if waits:
        said = ("retried: it waits again for the chain member before it to succeed (or, "
                "a batch's on_complete, for its members to finish)")  # fmt: skip
    report(job_id, done, as_json, key="retried", said=said,
           refused="is not dead or cancelled (or does not exist)")  # fmt: skip


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Cancel a job that has not finished (a running one stops at its worker's next
    heartbeat, and is cancelled then)."""

    async def cancel_job(jobs: Jobs) -> JobStatus | None:
        if not await jobs.cancel(job_id):
            return None
        info = await jobs.get(job_id)
        return None if info is None else info.status

    status = run(ctx, cancel_job)
    stopping = status is JobStatus.RUNNING  # its worker stops it, then it is cancelled
    cancelled = status is JobStatus.CANCELLED
    if as_json:
        click.echo(to_json({"id": job_id, "cancelled": cancelled, "stopping": stopping}))
    elif stopping:
        click.echo(f"job {job_id} asked to stop: it is cancelled once its worker has stopped it")
    elif cancelled:
        click.echo(f"job {job_id} cancelled")
    if status is None:
        raise click.ClickException(
            f"job {job_id} already finished or asked to stop (or does not exist)"
        )
    if not (stopping or cancelled):
        # Asked to stop while running, it ended on its own before its worker saw that.
        raise click.ClickException(f"job {job_id} finished ({status}) before it could be stopped")


@cli.command()
@click.option(
    "--status",
    type=click.Choice(["succeeded", "dead", "cancelled", "waiting", "scheduled", "queued"]),
)
@click.option(
    "--older-than",
    "older_than",
    metavar="DURATION",
    callback=parse_duration,
    help="Finished longer ago than this: 90s, 15m, 12h, 7d, 2w (with --status: "
    "succeeded, dead or cancelled).",
)
@json_option
@click.pass_context
def purge(ctx: click.Context, status: str | None, older_than: float | None, as_json: bool) -> None:
    """Delete jobs by status and/or finished longer ago than --older-than."""
    if status is None and older_than is None:
        raise click.UsageError("purge needs --status and/or --older-than")
    if status is not None and older_than is not None and not JobStatus(status).finished:
        # It would match none of them: "purged 0 job(s)", however old they are.
        raise click.UsageError(
            f"--older-than counts from when a job finished; {status} jobs have not "
            "finished: purge them with --status alone"
        )
    count = run(ctx, lambda jobs: jobs.purge(status=status, older_than=older_than))
    click.echo(to_json({"purged": count}) if as_json else f"purged {count} job(s)")


@cli.command()
@click.argument("app_arg", metavar="[MODULE:ATTR]", required=False)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip
@click.pass_context
def worker(ctx: click.Context, app_arg: str | None, log_level: str) -> None:
    """Run workers until SIGTERM or SIGINT, then drain (finish or release running jobs);
    a second signal stops at once (running jobs are released to run again), exit 1."""
    from asyncjobs._worker import run_worker_process

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    jobs = load_jobs(app_arg or ctx.obj, given_as="MODULE:ATTR" if app_arg else "--app")
    try:
        run_worker_process(jobs)
    except AsyncJobsError as error:  # as every other command: say it, no traceback
        raise click.ClickException(str(error)) from error
