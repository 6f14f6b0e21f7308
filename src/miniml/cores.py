"""How many CPU cores this process may use: the fewer of the CPUs it may run on and its cgroup's
CPU quota. In a container with a CPU limit (a Kubernetes pod, ``docker run --cpus``),
``os.cpu_count()`` still counts the whole node's cores; sizing thread pools by it would run many
times more threads than the quota lets run at once."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """Cores the cgroup's CPU quota allows; None where there is no limit."""
    v2 = root / "cpu.max"
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.exists() and v1_period.exists():
            quota_us = int(v1_quota.read_text())
            return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cores(root: Path = CGROUP) -> int:
    """At least 1: the CPUs this process may run on, capped by the cgroup's quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _quota(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
