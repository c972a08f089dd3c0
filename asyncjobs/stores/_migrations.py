"""The numbered migration scripts shipped in ``migrations/<backend>/``, read the same
way for both stores; each store's ``*_schema.py`` applies them in its own dialect."""

from __future__ import annotations

from importlib import resources

from asyncjobs._errors import StoreError


def migration_scripts(backend: str) -> list[tuple[int, str]]:
    """``(version, script)`` of every ``NNNN_name.sql`` file of ``backend``, in order."""
    folder = resources.files("asyncjobs.stores").joinpath("migrations", backend)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


def refuse_newer(current: int, scripts: list[tuple[int, str]], store: str) -> None:
    """Raise ``StoreError`` if ``store``'s schema is at a version past the last of
    ``scripts``: a newer asyncjobs migrated it, and this one would misread (or undo by
    its writes) what those migrations changed."""
    latest = scripts[-1][0] if scripts else 0
    if current > latest:
        raise StoreError(
            f"{store} has schema version {current}, newer than this asyncjobs knows "
            f"({latest}): a newer asyncjobs has used it; upgrade asyncjobs here too"
        )
