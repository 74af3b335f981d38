"""Release a thread's idle OpenMP workers, so that the engine's step loop keeps its own
spinning.

torch's intra-op parallelism on CPU is OpenMP (libgomp), and OpenMP keeps one pool of
worker threads per thread that has run parallel work: the thread that loaded the model
has one, the engine's step loop its own, the daemon's embedder (in a request thread)
another. Between two parallel regions a worker spins, waiting for the next one, and an
engine step is thousands of short regions (five projections and the LoRA kernel per
layer). But libgomp counts every pool's workers, and once it manages more threads than
there are CPUs it cuts the spin from ~300,000 rounds to 100: every worker then sleeps in a
futex after each region and is woken for the next. Measured here (2 cores, bf16, 128
tokens), in a new thread while the main thread's pool existed: a [576 -> 960] matmul
0.44-0.52 ms and the SGMV q/k/v delta 0.19-0.26 ms; with that pool released, 0.373 and
0.134, the main thread's own figures. `bench serving` went from 262 to 290 tokens/s with
adapters, and from 301 to 320 without.

So `Engine.start` releases its caller's pool (OpenMP 5's omp_pause_resource_all), and the
embedder releases its thread's after each call: the next parallel work in that thread
builds a new pool (a thread start, microseconds), and meanwhile none stands idle.
"""

import ctypes
import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the runtime's state


def release_openmp_pool() -> bool:
    """Free the calling thread's idle OpenMP workers, in the runtime torch loaded; True if
    it did. Other threads' pools are theirs to release."""
    pause = _pause()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0


@functools.cache
def _pause():
    """omp_pause_resource_all of torch's libgomp, or None (another OpenMP runtime)."""
    try:
        pause = ctypes.CDLL(_loaded_libgomp()).omp_pause_resource_all  # loaded: the same
    except (OSError, AttributeError) as error:
        logger.debug("no OpenMP pool to release: %s", error)
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def _loaded_libgomp() -> str:
    """The path of the libgomp torch has loaded (its wheel carries one; other packages,
    scikit-learn's for one, may have loaded theirs beside it); its usual soname if no
    such library is mapped."""
    import torch

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "libgomp.so.1"
    torch_dir = str(Path(torch.__file__).parent)
    paths = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    ours = sorted(path for path in paths if path.startswith(torch_dir))
    return ours[0] if ours else "libgomp.so.1"
