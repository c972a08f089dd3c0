"""What the commands of the ``asyncjobs`` CLI print: tables for people, JSON for scripts
(``--json``), with every character that does not print escaped (``terminal``,
``json_text``). The commands are in ``_cli``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import click

from asyncjobs._codec import visible
from asyncjobs._execution import MAX_ERROR_CHARS
from asyncjobs._models import JobInfo, info_from_row
from asyncjobs._stats import GroupStats
from asyncjobs.stores import JobRow, Preview


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
