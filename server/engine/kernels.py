"""The engine's own CPU kernels, built on first use: segmented LoRA matmuls
(csrc/sgmv.cpp) and the two ends of an int8 matmul for the `w8a8` base (csrc/w8a8.cpp).

torch has no segmented GEMM for CPU, and the batched matmuls that stand in for one
(server/engine/lora.py) spend most of their time padding tokens and reading small
matrices slowly. The C++ kernel reads each active adapter once per call, unpadded. Both
are compiled for this machine's CPU (`-march=native`: AVX512-BF16 dot products where the
CPU has them, float32 GEMM tiles on AVX2, fast enough for prompt chunks too) by torch's
extension builder into torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), once: ~15 s, which `make setup` pays; later starts only find
it there. The build name carries a hash of the CPU's feature flags, so a cache shared
between different machines never hands one a binary with instructions it lacks, of the
sources' text (a changed kernel gets a build of its own) and of the Python environment
(its torch headers are in the build's commands: two venvs sharing one build would
rebuild it in turn). It builds from copies of the sources kept in that build's folder,
since the builder rebuilds whenever a source file is newer than the binary, as every
fresh clone's is: a fresh clone into the same place finds its build.

When the build fails (no C++ compiler), the engine says why once and runs LoRA as
batched matmuls, the path accelerators use anyway, and a `w8a8` base through
bitsandbytes' own int8 matmul (the same products, slower).
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

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("sgmv.cpp", "w8a8.cpp")]
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers; it runs on the libgomp
# that torch has already loaded (same soname), so one thread pool serves both
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _build_tag() -> str:
    """A short hash of the CPU's feature flags (what -march=native compiles for), the
    kernels' sources and the Python environment."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    key = f"{platform.machine()} {flags} {sys.prefix} ".encode()
    key += b"".join(source.read_bytes() for source in SOURCES)
    return hashlib.sha256(key).hexdigest()[:12]


def _source_copy(name: str, source: Path) -> Path:
    """`source`, copied once into the build's own folder (same name, same text), so that
    its timestamp is that of the first build's."""
    from torch.utils import cpp_extension

    # the folder load() builds `name` in (it makes it)
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    copy = folder / source.name
    if not copy.exists():
        partial = folder / f".{source.name}.{os.getpid()}"
        shutil.copyfile(source, partial)
        partial.replace(copy)  # atomic: a concurrent build never reads half a file
    return copy


@functools.cache
def kernels_available() -> bool:
    """Build (first time) and load the kernels; their ops are then
    torch.ops.lorag.lora_shrink, lora_expand and w8a8_linear. False, after one warning,
    when they cannot be built."""
    from torch.utils import cpp_extension

    name = f"lorag_kernels_{_build_tag()}"
    try:
        cpp_extension.load(name=name, sources=[str(_source_copy(name, s)) for s in SOURCES],
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        # no compiler, a compiler that fails, or a build that does
        last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        logger.warning("the engine's CPU kernels could not be built (%s); LoRA runs as "
                       "batched matmuls and a w8a8 base through bitsandbytes, slower on "
                       "CPU", last_line)
        return False
    return True


def kernel_takes_chunks(dtype) -> bool:
    """Whether the built kernel has a GEMM path for long segments of `dtype` (float32 on
    AVX2 + FMA, bf16 on AVX512-BF16), so that prompt chunks run faster in it than padded
    into batched matmuls (`lorag bench kernels`). False where the kernel did not build."""
    import torch

    return kernels_available() and bool(torch.ops.lorag.gemm_path(dtype))
