"""How many CPUs this process may use: its affinity mask where the OS has one (Linux; a job
scheduler or ``taskset`` may have narrowed it), else every CPU of the machine (macOS)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
