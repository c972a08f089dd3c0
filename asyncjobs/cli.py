"""The ``asyncjobs`` command (also ``python -m asyncjobs``).

::

    asyncjobs --app myapp:jobs stats | list | show ID | retry ID | retry --all-dead
                               | cancel ID | purge --status S --older-than D | worker

``--app`` names the module and attribute of your ``Jobs`` (or set
``$ASYNCJOBS_APP``). Commands print tables for people; ``--json`` prints JSON for
scripts. The commands themselves live in ``asyncjobs._cli`` and need click
(``pip install 'asyncjobs[cli]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``asyncjobs`` entry point)."""
    try:
        from asyncjobs._cli import cli
    except ImportError as error:
        if error.name != "click":
            raise
        sys.stderr.write("the asyncjobs command needs click: pip install 'asyncjobs[cli]'\n")
        raise SystemExit(2) from None
    cli.main(args=list(argv) if argv is not None else None, prog_name="asyncjobs")
