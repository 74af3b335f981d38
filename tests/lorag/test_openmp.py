"""Releasing a thread's OpenMP pool ends its worker threads, in torch's own runtime: the
engine's step loop then keeps the only pool, and libgomp lets its workers spin."""

import os
import threading

import torch

from lorag.openmp import release_openmp_pool


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_releasing_ends_the_calling_threads_workers_and_torch_still_runs():
    def work() -> None:
        torch.set_num_threads(2)
        torch.randn(1 << 22).sum()  # at::parallel_for: the thread's pool gets a worker
        with_pool = os_threads()
        released.append(release_openmp_pool())
        counts.extend([with_pool, os_threads()])
        totals.append(float(torch.ones(1 << 22).sum()))  # a new pool, as before

    released, counts, totals = [], [], []
    thread = threading.Thread(target=work)  # a fresh thread: a pool of its own
    thread.start()
    thread.join()
    assert released == [True], "torch's libgomp was not found"
    assert counts[1] == counts[0] - 1, f"threads before and after release: {counts}"
    assert totals == [float(1 << 22)]


def test_releasing_twice_or_without_a_pool_is_harmless():
    assert release_openmp_pool()
    assert release_openmp_pool()
