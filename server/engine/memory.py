"""Buffers that hold RAM only where they are used."""

import math

import numpy as np
import torch

ALIGN = 64  # bytes: a cache line, and what torch's own CPU allocator aligns to


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
    """Zeros that on CPU take RAM page by page as they are written.

    torch.zeros writes every page at once, so a KV cache or a stack of adapter slots is
    resident from start-up whatever the load. numpy's zeros come from calloc, whose large
    blocks are fresh anonymous pages the kernel maps to its zero page until written: a KV
    block no request has reached, or an adapter slot no adapter has filled, costs nothing
    (measured in docs/engine.md). Elsewhere (GPU) plain torch.zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(size + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return torch.from_numpy(raw[start:start + size]).view(dtype).view(shape)
