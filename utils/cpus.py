"""The CPUs this process runs on: how many it may use (its affinity mask where the OS has one;
a job scheduler or ``taskset`` may have narrowed it), and what they are called, for the
benchmark figures to name the hardware they were measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The processor's marketing name ("AMD EPYC 9B14", "Intel(R) Xeon(R) Platinum 8481C CPU
    @ 2.70GHz") from /proc/cpuinfo on Linux; elsewhere what ``platform`` knows ("arm", "x86_64")."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()
