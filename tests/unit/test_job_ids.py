"""Job ids: 32 hex characters, time-ordered, with 80 random bits drawn ahead in bulk
from the OS (a forked child draws its own)."""

from __future__ import annotations

import os
import re

from asyncjobs._models import new_job_id


def test_ids_are_hex_unique_and_sort_by_enqueue_time() -> None:
    ids = [new_job_id(1_700_000_000.0 + i / 1000) for i in range(2000)]
    assert all(re.fullmatch("[0-9a-f]{32}", job_id) for job_id in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # one millisecond apart: the time prefix orders them
    assert len({job_id[12:] for job_id in ids}) == len(ids)  # random parts differ too


def test_a_forked_child_does_not_reuse_the_parent_s_random_parts() -> None:
    new_job_id(0.0)  # the parent now holds random parts drawn ahead
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, new_job_id(0.0).encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32
    assert child_id[12:] != new_job_id(0.0)[12:]
