"""Buffers that hold RAM only where they are used."""

import math
import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
    """Zeros that on CPU take RAM page by page as they are written.

    torch.zeros writes every page at once, so a KV cache or a stack of adapter slots is
    resident from start-up whatever the load. An anonymous mapping is zero pages the kernel
    commits one by one as they are written: a KV block no request has reached, or an
    adapter slot no adapter has filled, costs nothing (measured in docs/engine.md). The
    mapping is asked of the kernel directly, not of malloc: calloc in a long-lived process
    may hand back freed heap memory that is already resident (and was, in one CI run).
    Elsewhere (GPU) plain torch.zeros."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or size == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    # private (a shared one is shmem, committed when read), page-aligned; kept alive by the tensor
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8, count=size).view(dtype).view(shape)
