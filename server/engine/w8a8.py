"""The `w8a8` base's projections as the engine runs them: int8 weights and int8
activations, the products in int32 (csrc/w8a8.cpp).

`lorag serve --quantize w8a8` loads the base through bitsandbytes as int8 with no outlier
threshold: each weight row int8 with its own scale, each token's activations quantized
with a scale of their own when a projection runs. bitsandbytes' own forward pass computes
that in a dozen tensor ops per projection, in float16 on CPU, slower than bf16; here the
projections of one input (q/k/v) are one int8 matrix, the activations are quantized once
for them, and oneDNN's int8 matmul (AVX512-VNNI dot products) sits between the kernel's
two passes. A decoder layer's matmuls on a 1024-row prompt chunk: 10.8 ms against 18.5 in
bf16 on a 2-core AVX512-BF16 / VNNI CPU (`lorag bench kernels`).
"""

import sys

import torch
from torch import nn

from lorag.server.engine.kernels import kernels_available


def int8_dot_products() -> bool:
    """Whether this CPU has AVX512-VNNI, where torch's int8 matmul runs on oneDNN. Without
    it torch computes int8 matmuls in scalar loops (oneDNN's int8 GEMM could overflow its
    16-bit sums there: pytorch#136942), slower than bitsandbytes' float32 products."""
    return torch.cpu._is_vnni_supported()


def w8a8_modules(modules: list[nn.Module]) -> bool:
    """Whether `modules` are bitsandbytes int8 projections with no outlier threshold on
    CPU, on a CPU with int8 dot products, and the engine's kernels are built to run them.
    Otherwise a w8a8 base runs through bitsandbytes' own forward pass (the same math)."""
    bnb = sys.modules.get("bitsandbytes.nn")  # not loaded: no module is one of its layers
    if bnb is None:  # (importing it would add a second to every unquantized start)
        return False
    return (all(isinstance(m, bnb.Linear8bitLt) and m.state.threshold == 0.0
                and m.weight.device.type == "cpu" for m in modules)
            and int8_dot_products() and kernels_available())


class W8A8Linear(nn.Module):
    """Projections of one input as one int8 layer; the bitsandbytes modules' weights
    become views of its weight, so the model keeps working and no weight is held twice.

    weight: int8 [out, in], each row's scale in `col_scale` (the row's absmax / 127, one
    per output column); bias in the compute dtype, or None.
    """

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype):
        super().__init__()
        weights = [m.weight.data for m in modules]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        # bitsandbytes moves a weight's row scales into the module's state at its first
        # forward pass
        scales = [m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
                  for m in modules]
        self.col_scale = torch.cat(scales).float() / 127
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features)
             for b, m in zip(biases, modules, strict=True)]).to(dtype)
        offset = 0
        for module in modules:
            view = self.weight.data[offset:offset + module.out_features]
            module.weight.data = view
            if module.state.CB is not None:
                module.state.CB = view
            offset += module.out_features

    def dequantized(self, rows: slice) -> torch.Tensor:
        """The weight's `rows` as the layer serves them, in float32 (DoRA's norms)."""
        return self.weight[rows].float() * self.col_scale[rows, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [tokens, in]
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = torch.ops.lorag.w8a8_linear(rows, self.weight, self.col_scale, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
