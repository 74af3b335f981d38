"""lazy_zeros: buffers that take RAM page by page as they are written (Linux)."""

import mmap
import struct

import torch

from lorag.server.engine.memory import lazy_zeros

PRESENT, EXCLUSIVE = 1 << 63, 1 << 56  # pagemap bits (Documentation/admin-guide/mm/pagemap.rst)

def resident_mib(tensor: torch.Tensor) -> float:
    """RAM committed to `tensor`'s own pages: those /proc/self/pagemap reports present and
    mapped by this process alone (a page only read maps the kernel's shared zero page,
    which is not). Counting the tensor's pages, not the process's RSS, keeps out whatever
    else the process allocates meanwhile."""
    first = tensor.data_ptr() // mmap.PAGESIZE
    count = -(-tensor.nbytes // mmap.PAGESIZE)
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"<{count}Q", pagemap.read(count * 8))
    committed = sum(1 for entry in entries if entry & PRESENT and entry & EXCLUSIVE)
    return committed * mmap.PAGESIZE / (1 << 20)


def test_lazy_zeros_take_ram_only_where_written():
    buffer = lazy_zeros((64, 1024, 1024), torch.float32, "cpu")  # 256 MiB
    assert resident_mib(buffer) == 0  # nothing written: nothing resident
    assert buffer.shape == (64, 1024, 1024) and buffer.is_contiguous()
    assert buffer.data_ptr() % mmap.PAGESIZE == 0
    assert not buffer[::8].any()  # read: zeros, and reading commits nothing
    assert resident_mib(buffer) == 0
    buffer[:16] = 1.0  # a quarter written: that quarter resident
    assert resident_mib(buffer) == 64
    assert buffer[:16].eq(1).all() and not buffer[16:].any()


def test_lazy_zeros_of_every_dtype_the_engine_uses():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buffer = lazy_zeros((3, 5, 7), dtype, "cpu")
        assert buffer.dtype == dtype and buffer.shape == (3, 5, 7) and not buffer.any()
        buffer += 1
        assert buffer.sum().item() == 105
    assert lazy_zeros((0, 4), torch.float32, "cpu").shape == (0, 4)
