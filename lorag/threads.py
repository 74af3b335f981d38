"""How many CPUs this process may use, and the thread pools sized to it.

torch (OpenMP) and vLLM's CPU workers size their pools from the CPUs they can see: the
process's affinity. A container limited by a CPU quota (Kubernetes `limits.cpu`, Docker
`--cpus`) sees every core of its host, so a replica given 2 CPUs on a 64-core node starts
64 OpenMP threads per pool, which the kernel then throttles to the quota; two daemons on
one box each take every core and their spinning workers fight. `available_cpus` is the
smaller of the affinity and the quota (the tightest over the process's cgroup and its
ancestors, cgroup v1 or v2), and `use_threads` sizes every pool the process starts to it.
"""

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_v2(folder: Path) -> float | None:
    """CPUs cgroup v2's cpu.max in `folder` allows ("max 100000": unlimited)."""
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(folder: Path) -> float | None:
    """CPUs cgroup v1's CFS quota in `folder` allows (-1: unlimited)."""
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def cgroup_cpu_limit(proc_cgroup: str, root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs the process's cgroup quotas allow, None where nothing limits them.

    `proc_cgroup` is /proc/self/cgroup: "0::<path>" for v2, "<n>:<controllers>:<path>"
    for each v1 hierarchy. The quota is the tightest of the process's cgroup and its
    ancestors; folders that are not there are passed over (in a container without a
    cgroup namespace, /proc names the host's path while the container sees its own cgroup
    at the mount's root, which is read either way)."""
    limits = []
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            mount, quota = root, _quota_v2
            if not (mount / "cgroup.controllers").exists():  # v1 only: no unified mount here
                continue
        elif "cpu" in controllers.split(","):
            mount, quota = root / controllers, _quota_v1
            if not mount.is_dir():  # "cpu,cpuacct" mounted as cpu (or the other way)
                mount = root / "cpu"
        else:
            continue
        parts = Path(path).relative_to("/").parts
        for depth in range(len(parts) + 1):
            folder = mount.joinpath(*parts[:depth])
            try:
                limit = quota(folder)
            except (FileNotFoundError, ValueError):
                continue
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)


def available_cpus() -> int:
    """The threads a pool of this process should have: its CPU affinity, or its cgroup
    quota rounded down (at least 1) where that is smaller; a quota of 1.5 CPUs gives 1
    thread, which the quota never throttles."""
    affinity = len(os.sched_getaffinity(0))
    try:
        with open("/proc/self/cgroup") as proc:
            limit = cgroup_cpu_limit(proc.read())
    except FileNotFoundError:  # not Linux
        limit = None
    return affinity if limit is None else max(1, min(affinity, math.floor(limit)))


def use_threads(threads: int) -> None:
    """Size this process's thread pools to `threads`: OMP_NUM_THREADS for every OpenMP
    runtime loaded from now on (torch's and faiss's each read it when they load, and every
    thread's pool then starts at that size, the embedder's included) and for the processes
    it starts (vLLM's CPU workers, with their own binding off: lorag/server/vllm_config.py);
    torch.set_num_threads for the calling thread, in case torch was loaded already (a
    thread started from it, like the engine's step loop, is given the same count)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
