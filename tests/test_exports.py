"""The public namespaces: ``__all__`` sorted, complete, and holding DESIGN.md's names."""

from __future__ import annotations

import importlib
import types

import pytest

PUBLIC = ["asyncjobs", "asyncjobs.stores", "asyncjobs.testing"]

CONTRACT = {
    "asyncjobs": {
        "AsyncJobsError", "Job", "JobFailed", "JobInfo", "JobSpec", "JobStatus", "Jobs",
        "JobsMiddleware", "RateLimit", "Retry", "Task",
    },
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
