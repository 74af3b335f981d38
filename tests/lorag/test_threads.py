"""The CPUs a process may use (affinity, cgroup v1 and v2 quotas), and pools sized to them.

A real cgroup with a CPU quota is made on the test machine (its hierarchy is v1; v2 where
that is mounted), and both versions' files are also laid out in folders in the format the
kernel writes them (v2 is what Kubernetes nodes mostly run now)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lorag.threads import CGROUP_ROOT, cgroup_cpu_limit

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_takes_the_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path):
    write(tmp_path, cgroup_controllers="cpuset cpu io memory pids", cpu_max="max 100000")
    write(tmp_path / "kubepods", cpu_max="400000 100000")
    write(tmp_path / "kubepods" / "pod1", cpu_max="150000 100000")
    write(tmp_path / "kubepods" / "pod1" / "app", cpu_max="max 100000")
    assert cgroup_cpu_limit("0::/kubepods/pod1/app\n", tmp_path) == 1.5
    assert cgroup_cpu_limit("0::/kubepods\n", tmp_path) == 4.0
    assert cgroup_cpu_limit("0::/\n", tmp_path) is None  # "max": unlimited


def test_v1_reads_the_cpu_hierarchy_under_either_mount_name(tmp_path):
    for mount in ("cpu,cpuacct", "cpu"):
        root = tmp_path / mount.replace(",", "-")
        write(root / mount, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
        write(root / mount / "docker" / "abc", cpu_cfs_quota_us="250000",
              cpu_cfs_period_us="100000")
        proc = f"12:memory:/docker/abc\n4:{mount}:/docker/abc\n1:name=systemd:/docker/abc\n"
        assert cgroup_cpu_limit(proc, root) == 2.5
    root = tmp_path / "named-cpu"  # the hierarchy "cpu,cpuacct", mounted as .../cpu
    write(root / "cpu", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    assert cgroup_cpu_limit("3:cpu,cpuacct:/\n", root) == 0.5


def test_a_path_the_container_does_not_see_falls_back_to_its_own_root(tmp_path):
    """Without a cgroup namespace /proc names the host's path; the container's own cgroup
    is the mount's root."""
    write(tmp_path / "cpu", cpu_cfs_quota_us="200000", cpu_cfs_period_us="100000")
    assert cgroup_cpu_limit("5:cpu:/kubepods/besteffort/pod9/abc\n", tmp_path) == 2.0
    assert cgroup_cpu_limit("5:cpu:/x\n", tmp_path / "nothing-mounted") is None
    assert cgroup_cpu_limit("0::/x\n", tmp_path) is None  # no unified mount here


PROBE = """
import os, threading
os.environ.pop("OMP_NUM_THREADS", None)
from lorag.threads import available_cpus, use_threads
cpus = available_cpus()
use_threads(cpus)
import faiss, torch
seen = []
thread = threading.Thread(target=lambda: seen.extend(
    [torch.get_num_threads(), faiss.omp_get_max_threads()]))
thread.start(); thread.join()
print(cpus, torch.get_num_threads(), *seen)
"""


def probe(*prefix: str, preexec=None) -> list[int]:
    """available_cpus in a fresh process started under `prefix`, then the threads torch
    has in the main thread, and torch and faiss in a thread started after it."""
    out = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True,
                         text=True, timeout=120, preexec_fn=preexec, check=True).stdout
    return [int(word) for word in out.split()]


@pytest.mark.slow
def test_affinity_sizes_every_pool_of_a_fresh_process():
    cpus = len(os.sched_getaffinity(0))
    assert probe() == [cpus] * 4
    if cpus > 1:
        assert probe("taskset", "-c", "0") == [1] * 4


@pytest.fixture
def quota_cgroup():
    """A real cgroup with a quota of one CPU, removed after: under cgroup v1's cpu
    hierarchy (this machine's), or the unified v2 one where that is what is mounted."""
    unified = (CGROUP_ROOT / "cgroup.controllers").exists()
    parent = CGROUP_ROOT if unified else CGROUP_V1_CPU
    if not os.access(parent, os.W_OK):
        pytest.fail(f"{parent} is not writable: this test makes a cgroup there and needs "
                    "root on a machine with cgroups mounted (v1's cpu hierarchy or v2)")
    folder = parent / f"lorag-test-{uuid.uuid4().hex[:8]}"
    if unified:  # the cpu controller must be on for the root's children
        (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu")
    folder.mkdir()
    try:
        if unified:
            (folder / "cpu.max").write_text("100000 100000")
        else:
            (folder / "cpu.cfs_period_us").write_text("100000")
            (folder / "cpu.cfs_quota_us").write_text("100000")
        yield folder
    finally:
        folder.rmdir()  # its process has exited: the cgroup is empty


@pytest.mark.slow
def test_a_cgroup_quota_below_the_affinity_sizes_the_pools(quota_cgroup):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs a machine with 2 CPUs or more")
    procs = quota_cgroup / "cgroup.procs"
    assert probe(preexec=lambda: procs.write_text(str(os.getpid()))) == [1] * 4


@pytest.mark.parametrize("threads, workers, cpus, bound", [
    (4, 2, [0, 1, 2, 3], "0,1|2,3"),  # pipeline or tensor stages: the cores split evenly
    (2, 2, [4, 5, 6, 7], "4|5"),  # the first `threads` of the affinity
    (2, 1, [0, 1, 2, 3], "nobind"),  # a lone worker with its share: unbound, OMP_NUM_THREADS
    (4, 1, [0, 1, 2, 3], None),  # every core: vLLM's own binding
], ids=["stages", "stages-share", "share", "every-core"])
def test_vllm_cpu_workers_are_bound_to_the_daemons_threads(threads, workers, cpus, bound,
                                                           monkeypatch):
    from lorag.server.vllm_config import bind_cpu_workers

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "99")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    bind_cpu_workers(threads, workers)
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == bound
    assert os.environ["OMP_NUM_THREADS"] == (str(threads) if bound == "nobind" else "99")


def test_a_binding_set_by_hand_wins_and_too_few_cores_are_refused(monkeypatch):
    from lorag.errors import InvalidRequest
    from lorag.server.vllm_config import bind_cpu_workers

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3")
    bind_cpu_workers(1, 1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "3"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(InvalidRequest, match="4 vLLM workers .* need a core each; this daemon "
                                             "has 2"):
        bind_cpu_workers(2, 4)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
