"""The engine's own CPU kernel: segmented LoRA matmuls (csrc/sgmv.cpp), built on first use.

torch has no segmented GEMM for CPU, and the batched matmuls that stand in for one
(server/engine/lora.py) spend most of their time padding tokens and reading small
matrices slowly. The C++ kernel reads each active adapter once per call, unpadded. It is
compiled for this machine's CPU (`-march=native`: AVX512-BF16 dot products where the
CPU has them, float32 GEMM tiles on AVX2, fast enough for prompt chunks too) by torch's
extension builder into torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), once: ~15 s, which `make setup` pays; later starts only find
it there. The build name carries a hash of the CPU's feature flags, so a cache shared
between different machines never hands one a binary with instructions it lacks, of the
source's text (a changed kernel gets a build of its own) and of the Python environment
(its torch headers are in the build's commands: two venvs sharing one build would
rebuild it in turn). It builds from a copy of the source kept in that build's folder,
since the builder rebuilds whenever its source file is newer than the binary, as every
fresh clone's is: a fresh clone into the same place finds its build.

When the build fails (no C++ compiler), the engine says why once and runs LoRA as
batched matmuls, the path accelerators use anyway.
"""

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "sgmv.cpp"
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers; it runs on the libgomp
# that torch has already loaded (same soname), so one thread pool serves both
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _build_tag() -> str:
    """A short hash of the CPU's feature flags (what -march=native compiles for), the
    kernel's source and the Python environment."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    key = f"{platform.machine()} {flags} {sys.prefix} ".encode() + SOURCE.read_bytes()
    return hashlib.sha256(key).hexdigest()[:12]


def _source_copy(name: str) -> Path:
    """The kernel's source, copied once into the build's own folder (same name, same
    text), so that its timestamp is that of the first build's."""
    from torch.utils import cpp_extension

    # the folder load() builds `name` in (it makes it)
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    copy = folder / SOURCE.name
    if not copy.exists():
        partial = folder / f".{SOURCE.name}.{os.getpid()}"
        shutil.copyfile(SOURCE, partial)
        partial.replace(copy)  # atomic: a concurrent build never reads half a file
    return copy


@functools.cache
def sgmv_available() -> bool:
    """Build (first time) and load the kernel; its ops are then torch.ops.lorag.lora_shrink
    and torch.ops.lorag.lora_expand. False, after one warning, when it cannot be built."""
    from torch.utils import cpp_extension

    name = f"lorag_sgmv_{_build_tag()}"
    try:
        cpp_extension.load(name=name, sources=[str(_source_copy(name))],
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        # no compiler, a compiler that fails, or a build that does
        last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        logger.warning("the SGMV CPU kernel could not be built (%s); LoRA runs as batched "
                       "matmuls, slower on CPU", last_line)
        return False
    return True


def kernel_takes_chunks(dtype) -> bool:
    """Whether the built kernel has a GEMM path for long segments of `dtype` (float32 on
    AVX2 + FMA, bf16 on AVX512-BF16), so that prompt chunks run faster in it than padded
    into batched matmuls (`lorag bench kernels`). False where the kernel did not build."""
    import torch

    return sgmv_available() and bool(torch.ops.lorag.gemm_path(dtype))
