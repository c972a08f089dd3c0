"""Commands of the ``asyncjobs`` CLI (click). Entry point: ``asyncjobs.cli.main``.

The commands are here; ``_cli_app`` loads the app they work on and runs their actions,
and ``_cli_output`` formats what they print. ``asyncjobs worker`` runs the worker
process of ``asyncjobs._worker``.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

import click

from asyncjobs._cli_app import load_jobs, run
from asyncjobs._cli_output import (
    LIST_PREVIEW,
    _cell,
    _rate,
    job_dict,
    json_text,
    listed_dict,
    report,
    table,
    terminal,
    to_json,
)
from asyncjobs._errors import AsyncJobsError
from asyncjobs._jobs import Jobs
from asyncjobs._models import JobStatus, info_from_row
from asyncjobs._stats import Stats, human_duration

APP_HELP = "Your Jobs as module:attribute, e.g. myapp:jobs (or set $ASYNCJOBS_APP)."
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(_ctx: click.Context, _param: click.Parameter, text: str | None) -> float | None:
    """An option's ``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (a click
    callback, so that an error names the option)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


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
