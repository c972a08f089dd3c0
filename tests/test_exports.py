"""The public namespaces: ``__all__`` sorted, complete, and holding DESIGN.md's names,
with DESIGN.md's parameters and defaults."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from asyncjobs import Job, JobInfo, Jobs, JobStatus, RateLimit, Task
from asyncjobs.testing import FakeClock

PUBLIC = ["asyncjobs", "asyncjobs.cli", "asyncjobs.stores", "asyncjobs.testing"]

CONTRACT = {
    "asyncjobs": {
        "AsyncJobsError", "Job", "JobFailed", "JobInfo", "JobSpec", "JobStatus", "Jobs",
        "JobsMiddleware", "RateLimit", "Retry", "Task",
    },
    "asyncjobs.cli": {"main"},  # the `asyncjobs` command's entry point (pyproject.toml)
    "asyncjobs.stores": {"PostgresStore", "SQLiteStore", "Store", "open_store"},
    "asyncjobs.testing": {"FakeClock", "drain"},
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLIC)
def test_all_is_sorted_without_duplicates(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(set(module.__all__))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize("name", PUBLIC)
def test_all_is_complete(name: str) -> None:
    """Every public object of ours the namespace holds is listed in ``__all__``.

    Names that ``asyncjobs`` itself exports (imported for annotations) are exempt.
    """
    module = importlib.import_module(name)
    top = importlib.import_module("asyncjobs")
    ours = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith("asyncjobs")
        and not (name != "asyncjobs" and getattr(top, attr, None) is value)
    }
    assert ours - set(module.__all__) == set()


@pytest.mark.parametrize("name", PUBLIC)
def test_the_design_contract_names_are_exported(name: str) -> None:
    module = importlib.import_module(name)
    assert CONTRACT[name] - set(module.__all__) == set()


def test_version_is_exported() -> None:
    import asyncjobs

    assert isinstance(asyncjobs.__version__, str)
    assert "__version__" in asyncjobs.__all__


def defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# DESIGN.md's signatures: each name with its default (names added since are allowed).
SIGNATURES: list[tuple[Callable[..., Any], dict[str, Any]]] = [
    (
        Jobs.__init__,
        {
            "url": None, "concurrency": 10, "workers": True, "queues": None,
            "visibility_timeout": 60, "shutdown_timeout": 10, "poll_interval": 1.0,
            "retention": timedelta(days=7), "max_payload_bytes": 256 * 1024,
            "synchronous": "normal", "clock": None,
        },
    ),
    (
        Jobs.task,
        {
            "name": None, "queue": "default", "retries": 3, "timeout": None, "priority": 0,
            "rate_limit": None, "limiter": None, "concurrency": None,
        },
    ),
    (
        Task.options,
        {
            "delay": None, "run_at": None, "priority": None, "queue": None,
            "idempotency_key": None, "retries": None, "timeout": None, "group": None,
        },
    ),
    (Jobs.list, {"status": None, "queue": None, "task": None, "limit": 100}),
    (Jobs.purge, {"status": None, "older_than": None}),
    (Job.result, {"timeout": None}),
    (FakeClock.__init__, {"start": None}),
    (RateLimit, {"per": 1.0, "burst": None}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "expected"), SIGNATURES, ids=[f.__qualname__ for f, _ in SIGNATURES]
)
def test_the_design_contract_signatures_and_defaults(
    fn: Callable[..., Any], expected: dict[str, Any]
) -> None:
    actual = defaults(fn)
    assert {name: actual.get(name, "<missing>") for name in expected} == expected


def test_the_design_contract_job_info_fields_and_statuses() -> None:
    fields = {f.name for f in dataclasses.fields(JobInfo)}
    design = {
        "id", "task", "queue", "status", "attempts", "max_attempts", "priority", "run_at",
        "enqueued_at", "started_at", "finished_at", "result", "error", "idempotency_key",
    }  # fmt: skip
    assert design - fields == set()
    assert [str(s) for s in JobStatus] == [
        "waiting", "scheduled", "queued", "running", "succeeded", "dead", "cancelled",
    ]  # fmt: skip


def test_every_error_asyncjobs_raises_can_be_caught_by_name() -> None:
    """Each class of the error tree (``asyncjobs._errors``) is importable from
    ``asyncjobs``: a caller handles ``RetryRefused`` or ``DataRefused`` by name."""
    import asyncjobs
    from asyncjobs import _errors

    errors = {
        name
        for name, value in vars(_errors).items()
        if isinstance(value, type) and issubclass(value, Exception)
        and value.__module__ == _errors.__name__
    }  # fmt: skip
    assert {"DataRefused", "Retry", "RetryRefused"} <= errors
    assert errors - set(asyncjobs.__all__) == set()
