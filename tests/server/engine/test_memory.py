"""lazy_zeros: buffers that take RAM page by page as they are written (Linux)."""

import torch

from lorag.server.engine.memory import ALIGN, lazy_zeros


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_lazy_zeros_take_ram_only_where_written():
    before = resident_mib()
    buffer = lazy_zeros((64, 1024, 1024), torch.float32, "cpu")  # 256 MiB
    assert resident_mib() - before < 16  # nothing written: nothing resident
    assert buffer.shape == (64, 1024, 1024) and buffer.is_contiguous()
    assert buffer.data_ptr() % ALIGN == 0
    assert not buffer[::8].any()  # read: zeros, and reading commits nothing
    assert resident_mib() - before < 16
    buffer[:16] = 1.0  # a quarter written: that quarter resident
    assert 60 < resident_mib() - before < 100
    assert buffer[:16].eq(1).all() and not buffer[16:].any()


def test_lazy_zeros_of_every_dtype_the_engine_uses():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buffer = lazy_zeros((3, 5, 7), dtype, "cpu")
        assert buffer.dtype == dtype and buffer.shape == (3, 5, 7) and not buffer.any()
        buffer += 1
        assert buffer.sum().item() == 105
