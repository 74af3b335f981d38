"""The workload's matmul roofline: the throughput a server would reach if serving the
workload cost nothing but the base model's matmul FLOPs, done at the best rate this
machine sustains for the model's shapes.

FLOPs: every prompt token and every generated token but the last go through all of the
decoder's linear layers once (2 * in * out each); each generated token needs one row of
the LM head. The rate: the best of the layer's matmuls at a full engine step's batch (128
rows), in the run's dtype, with q/k/v and gate/up as one matmul each, as a fused engine
runs them. Attention, norms and LoRA are left out, so no real server reaches it.
"""

import time

import torch
from torch import nn


def matmul_roofline(model, jobs, max_new: int, rows: int = 128) -> dict:
    """jobs: (prompt ids, adapter) per request. Tokens per second at the roofline."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    flops = workload_flops(model, jobs, max_new)
    rate = max(_matmul_rate(rows, inputs, outputs, dtype)
               for inputs, outputs in _fused_shapes(model))
    seconds = flops / rate
    return {"tokens_per_s": round(len(jobs) * max_new / seconds, 1),
            "gflop": round(flops / 1e9, 1), "matmul_gflop_per_s": round(rate / 1e9, 1),
            "rows": rows}


def workload_flops(model, jobs, max_new: int) -> int:
    """The base model's linear-layer FLOPs for the workload (see the module's doc)."""
    head = model.get_output_embeddings()
    per_token = sum(2 * m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, nn.Linear) and m is not head)
    fed = sum(len(ids) for ids, _ in jobs) + len(jobs) * (max_new - 1)
    return fed * per_token + len(jobs) * max_new * 2 * head.in_features * head.out_features


def _fused_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's matmuls with q/k/v and gate/up fused, and the
    LM head's."""
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    intermediate = config.intermediate_size
    return [(hidden, heads * head_dim + 2 * kv), (heads * head_dim, hidden),
            (hidden, 2 * intermediate), (intermediate, hidden), (hidden, config.vocab_size)]


def _matmul_rate(rows: int, inputs: int, outputs: int, dtype: torch.dtype,
                 seconds: float = 1.0) -> float:
    """FLOP/s of x[rows, inputs] @ W[outputs, inputs].T, best of a second of repeats."""
    x = torch.randn(rows, inputs, dtype=dtype)
    weight = torch.randn(outputs, inputs, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, weight)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * inputs * outputs / best
