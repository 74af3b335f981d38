"""`lorag bench compile`: is torch.compile (inductor) worth it for the engine's step?

Eager against `torch.compile(dynamic=True)` on the two parts of a step that are not one
big matmul, in the base model's shapes and the engine's own code:
- the elementwise work of a layer (RMSNorm after the residual add, SiLU(gate) * up, the
  rotary embedding of q and k), for steps of 8-512 tokens;
- the LoRA delta of a fused q/k/v layer (server/engine/lora.py) with 64 r16 slots, for
  8-128 decode tokens on random slots.
Each row also times the matmul the part sits beside, to say what a saving is worth, and
the first call at that size (compiling, or recompiling for a new shape range). Prints
JSON.
"""

import random
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorag.benchmarks.stats import median_us, print_json
from lorag.provision import ModelCache
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse
from lorag.settings import Settings

MODEL = "smollm2-135m-instruct"


def main(sizes: list[int], slots: int = 64, rank: int = 16,
         json_path: Path | None = None) -> dict:
    config = AutoConfig.from_pretrained(ModelCache(Settings().models_dir).path(MODEL))
    torch.manual_seed(0)
    result = {"model": MODEL, "torch_threads": torch.get_num_threads(),
              "elementwise": _elementwise(config, sizes),
              # decode tokens: at most one per running sequence (the engine's 128)
              "lora_delta": _lora_delta(config, [n for n in sizes if n <= 128], slots, rank)}
    print_json(result, json_path)
    return result


def _elementwise(config, sizes: list[int]) -> dict:
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    norm, act = LlamaRMSNorm(hidden, eps=config.rms_norm_eps), nn.SiLU()

    def step(x, residual, gate, up, q, k, cos, sin):
        return norm(x + residual), act(gate) * up, *apply_rotary_pos_emb(
            q, k, cos, sin, unsqueeze_dim=1)

    def inputs(n):
        return (torch.randn(n, hidden), torch.randn(n, hidden), torch.randn(n, inter),
                torch.randn(n, inter), torch.randn(n, heads, head_dim),
                torch.randn(n, kv_heads, head_dim), torch.randn(n, head_dim),
                torch.randn(n, head_dim))

    qkv = torch.randn(hidden + 2 * kv_heads * head_dim, hidden)
    return _compare(step, {n: inputs(n) for n in sizes},
                    lambda args: torch.nn.functional.linear(args[0], qkv), "qkv_matmul_us")


def _lora_delta(config, sizes: list[int], slots: int, rank: int) -> dict:
    hidden = config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    outs = [hidden, kv, kv]
    base = fuse([nn.Linear(hidden, out, bias=False) for out in outs], outs)
    batch = LoraBatch(use_kernel=False)  # the torch path: inductor cannot see into the kernel
    parts = [Part((0, name), sum(outs[:j]), out)
             for j, (name, out) in enumerate(zip(("q", "k", "v"), outs, strict=True))]
    layer = MultiLoraLinear(base, hidden, parts, slots, rank, torch.float32, batch)
    for slot in range(slots):
        layer.install(slot, [torch.randn(rank, hidden) * 0.01] * 3,
                      [torch.randn(out, rank) * 0.01 for out in outs])
    rng = random.Random(0)
    routes = {n: torch.tensor([rng.randrange(slots) for _ in range(n)]) for n in sizes}
    eager = MultiLoraLinear._add_delta

    def delta(add_delta, x):
        batch.route(routes[len(x)], [], rank)
        layer._add_delta = partial(add_delta, layer)  # what forward calls
        return layer(x)

    compiled = torch.compile(eager, dynamic=True)
    return _compare(lambda x: delta(eager, x), {n: (torch.randn(n, hidden),) for n in sizes},
                    lambda args: base(args[0]), "base_matmul_us",
                    compiled=lambda x: delta(compiled, x))


def _compare(fn, inputs: dict, beside, beside_name: str, compiled=None) -> dict:
    """Per size: eager and compiled time, the first compiled call, and the matmul beside;
    the compiled result checked against eager. The compile time of the first size is
    its first call."""
    compiled = compiled or torch.compile(fn, dynamic=True)
    rows = {}
    with torch.inference_mode():
        for n, args in inputs.items():
            start = time.perf_counter()
            got = compiled(*args)
            first = time.perf_counter() - start
            for a, b in zip(_flat(got), _flat(fn(*args)), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            rows[n] = {"eager_us": median_us(fn, *args), "compiled_us": median_us(compiled, *args),
                       "first_call_ms": round(first * 1e3, 1),
                       beside_name: median_us(lambda *a: beside(a), *args)}
    return rows


def _flat(value):
    return value if isinstance(value, tuple) else (value,)
