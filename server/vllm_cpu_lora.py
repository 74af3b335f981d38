"""A vLLM plugin backporting an open fix to vLLM's CPU LoRA ops: a row without an adapter
(slot index -1) is left alone, as vLLM's GPU kernels leave it.

vLLM marks a token that runs without adapter with slot index -1. Its GPU kernels skip such
rows; the PyTorch ops its CPU build runs (vllm/lora/ops/torch_ops/lora_ops.py) index the
stacked weights with it, and -1 is the LAST slot: a base-model request batched beside
adapter requests silently gets whichever adapter sits there (vllm-project/vllm#48421, open
at vLLM 0.32; lorag's greedy agreement test caught it once every slot had been used).
Routing base requests through an all-zero adapter avoids it too, but measured 2-4x slower
here: every batch then pays the CPU LoRA path in every layer.

vLLM loads `vllm.general_plugins` entry points (pyproject.toml) in each of its processes,
its engine core's included, so `register` reaches the ops where they run. It wraps the
three ops every CPU LoRA path ends in (the sgmv ones call them); elsewhere it does nothing.
"""

import functools

FIXED = "lorag_skips_rows_without_adapter"
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def register() -> None:
    """Patch the CPU ops (idempotent: vLLM may load plugins more than once)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        original = getattr(lora_ops, name)
        if getattr(original, FIXED, False):
            continue
        fixed = skip_rows_without_adapter(original)
        setattr(lora_ops, name, fixed)  # what the sgmv ops call
        setattr(punica_cpu, name, fixed)  # what the CPU wrapper imported by name


def skip_rows_without_adapter(op):
    """`op(inputs, weights, output, indices, ...)`, leaving the output rows whose index is
    -1 as they were and computing the others as `op` does."""
    @functools.wraps(op)
    def fixed(inputs, weights, output, indices, *args, **kwargs):
        skip = indices < 0  # [rows]
        if skip.shape[0] != output.shape[0] or not bool(skip.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[skip].clone()  # [skipped rows, out]
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[skip] = kept

    setattr(fixed, FIXED, True)
    return fixed
