"""``python -m asyncjobs``: the same as the ``asyncjobs`` command."""

from __future__ import annotations

from asyncjobs.cli import main

if __name__ == "__main__":
    main()
