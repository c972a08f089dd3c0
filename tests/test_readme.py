"""The README's first example runs as written (it is what a newcomer copies first)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def use_it_snippet() -> str:
    section = README.read_text().split("\n## Use it\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no python block under '## Use it'"
    return match.group(1)


def test_the_use_it_example_runs_and_its_job_succeeds(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(use_it_snippet() + "\nimport asyncio\n\nasyncio.run(main())\n")
    env = {k: v for k, v in os.environ.items() if k != "ASYNCJOBS_URL"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # Jobs() opens ./asyncjobs.db
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "JobInfo(" in done.stdout
    assert "status=<JobStatus.SCHEDULED" in done.stdout  # the delayed one, printed
