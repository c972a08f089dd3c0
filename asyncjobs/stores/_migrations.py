"""The numbered migration scripts shipped in ``migrations/<backend>/``, read the same
way for both stores; each store's ``*_schema.py`` applies them in its own dialect."""

from __future__ import annotations

from importlib import resources


def migration_scripts(backend: str) -> list[tuple[int, str]]:
    """``(version, script)`` of every ``NNNN_name.sql`` file of ``backend``, in order."""
    folder = resources.files("asyncjobs.stores").joinpath("migrations", backend)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)
