"""`lorag bench kernels`: the engine's SGMV kernel against oneDNN's batched matmuls, the
w8a8 base's int8 projections against bf16 / float32 ones, and what they do for a long
prompt's time to first token.

Three parts, in the default model's shapes, the engine's compute dtype (float32 here
without AVX512-BF16), rank 16:
- `prompt_chunk`: one adapter's prompt chunk of 16-1024 rows through each LoRA layer of
  a decoder layer (q/k/v fused, o, gate, up, down). Per layer: the shrink alone, the
  kernel's against one oneDNN matmul on the rows as they are (no padding: the best the
  batched-matmul path could do), and the whole delta (shrink and expand added into the
  output) as the layer runs it with chunks by the kernel against chunks padded into
  batched matmuls (what the engine did before), beside the base matmul it sits next to,
  and, where the CPU has AVX512-VNNI, that matmul as the w8a8 base runs it (int8 weights
  and per-token int8 activations);
- `decode`: 128 decode tokens over 64 adapters, the kernel against batched matmuls;
- `prefill`: time to first token of 800-token prompts (distinct random token ids, so no
  prefix cache hit; one step each) on the default model, NF4, w8a8 and unquantized, in
  one engine each: no adapter, an r16 adapter on every projection with chunks padded,
  the same with chunks by the kernel.
Medians of repeated calls. Prints JSON.
"""

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.stats import interleaved_us, median_us, print_json
from lorag.models import cpu_has_bf16, load_base, resolve_dtype
from lorag.provision import ModelCache
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.engine import Engine
from lorag.server.engine.kernels import kernel_takes_chunks, kernels_available
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse
from lorag.server.engine.sampling import SamplingParams
from lorag.server.engine.w8a8 import int8_dot_products
from lorag.settings import Settings

MODEL = "smollm2-135m-instruct"
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(rows: list[int], prompt_tokens: int = 800, prompts: int = 5,
         json_path: Path | None = None) -> dict:
    if not kernels_available():
        raise RuntimeError("the engine's CPU kernels did not build here (see the warning "
                           "above): nothing to measure")
    dtype = resolve_dtype("auto")
    config = AutoConfig.from_pretrained(ModelCache(Settings().models_dir).path(MODEL))
    torch.manual_seed(0)
    result = {"model": MODEL, "dtype": str(dtype).removeprefix("torch."), "rank": RANK,
              "cpu_bf16": cpu_has_bf16(), "torch_threads": torch.get_num_threads(),
              "kernel_takes_chunks": kernel_takes_chunks(dtype),
              "prompt_chunk": {n: _chunk_rows(config, n, dtype) for n in rows},
              "decode": _decode_row(config, dtype),
              "prefill": {quantize: _prefill(quantize, prompt_tokens, prompts)
                          for quantize in ("nf4", "w8a8", "none")}}
    print_json(result, json_path)
    return result


def _layers(config) -> dict[str, tuple[int, list[int]]]:
    """A decoder layer's LoRA layers as the runner fuses them: name -> (in, outs)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return {"qkv": (hidden, [hidden, kv, kv]), "o": (hidden, [hidden]),
            "gate": (hidden, [inter]), "up": (hidden, [inter]), "down": (inter, [hidden])}


def _layer(inputs: int, outs: list[int], slots: int, dtype, batch: LoraBatch):
    """A MultiLoraLinear over a random base, every slot holding a random r16 adapter."""
    base = fuse([nn.Linear(inputs, out, bias=False, dtype=dtype) for out in outs], outs)
    parts = [Part((0, f"p{j}"), sum(outs[:j]), out) for j, out in enumerate(outs)]
    layer = MultiLoraLinear(base, inputs, parts, slots, RANK, dtype, batch)
    for slot in range(slots):
        layer.install(slot, [torch.randn(RANK, inputs, dtype=dtype) * 0.02 for _ in outs],
                      [torch.randn(out, RANK, dtype=dtype) * 0.02 for out in outs])
    return layer


def _time(fn, *args) -> float:
    with torch.inference_mode():
        return median_us(fn, *args, seconds=0.3)


def _chunk_rows(config, n: int, dtype) -> dict:
    """Per LoRA layer of a decoder layer, one chunk of n rows on slot 1: microseconds."""
    row = {name: _chunk_row(inputs, outs, n, dtype)
           for name, (inputs, outs) in _layers(config).items()}
    keys = ["kernel_delta_us", "padded_delta_us", "base_matmul_us"]
    keys += ["w8a8_matmul_us"] if int8_dot_products() else []
    total = {key: round(sum(layer[key] for layer in row.values()), 1) for key in keys}
    return {**row, "all_layers": total}


def _chunk_row(inputs: int, outs: list[int], n: int, dtype) -> dict:
    kernel, padded = LoraBatch(True, True), LoraBatch(True, False)
    layer = _layer(inputs, outs, 4, dtype, kernel)
    x = torch.randn(n, inputs, dtype=dtype)
    a = layer.a[:, :RANK].flatten(1, 2)  # [slots, rank * parts, in]
    route = torch.arange(n), torch.tensor([0, n]), torch.tensor([1])
    a_t = a[1].T.contiguous()  # oneDNN's operand, laid out once, as a weight would be
    y = layer.base(x)
    for batch in (kernel, padded):  # once per step in the engine, not per layer
        batch.route(torch.empty(0, dtype=torch.long), [(0, n, 1)], RANK)
    peers = {"kernel_shrink_us": (torch.ops.lorag.lora_shrink, x, a, *route),
             "onednn_shrink_us": (torch.mm, x, a_t),
             "kernel_delta_us": (_delta, layer, kernel, y, x),
             "padded_delta_us": (_delta, layer, padded, y, x),
             "base_matmul_us": (layer.base, x)}
    if int8_dot_products():  # the same weights, row-wise int8
        weight = layer.base.weight.detach().float()
        scale = weight.abs().amax(1) / 127
        int8 = torch.round(weight / scale[:, None]).to(torch.int8)
        peers["w8a8_matmul_us"] = (torch.ops.lorag.w8a8_linear, x, int8, scale, None)
    with torch.inference_mode():
        row = interleaved_us(peers, seconds=1.5)
    row["shrink_speedup"] = round(row["onednn_shrink_us"] / row["kernel_shrink_us"], 2)
    row["delta_speedup"] = round(row["padded_delta_us"] / row["kernel_delta_us"], 2)
    if "w8a8_matmul_us" in row:
        row["w8a8_speedup"] = round(row["base_matmul_us"] / row["w8a8_matmul_us"], 2)
    return row


def _delta(layer: MultiLoraLinear, batch: LoraBatch, y, x) -> None:
    """The layer's delta for x, as `batch` has routed it."""
    layer.batch = batch
    layer._add_deltas(y, x)


def _decode_row(config, dtype, tokens: int = 128, slots: int = 64) -> dict:
    """q/k/v's delta for `tokens` decode tokens on random slots of `slots`."""
    inputs, outs = _layers(config)["qkv"]
    kernel, padded = LoraBatch(True), LoraBatch(False)
    layer = _layer(inputs, outs, slots, dtype, kernel)
    x = torch.randn(tokens, inputs, dtype=dtype)
    y = layer.base(x)
    rng = random.Random(0)
    decode = torch.tensor([rng.randrange(slots) for _ in range(tokens)])
    for batch in (kernel, padded):
        batch.route(decode, [], RANK)
    return {"tokens": tokens, "slots": slots, "kernel_us": _time(_delta, layer, kernel, y, x),
            "batched_matmul_us": _time(_delta, layer, padded, y, x),
            "base_matmul_us": _time(layer.base, x)}


def _prefill(quantize: str, prompt_tokens: int, prompts: int) -> dict:
    """TTFT p50 (ms) of `prompts` fresh prompts: no adapter, adapter padded, adapter by
    the kernel; interleaved, after one of each to warm up."""
    model, tokenizer = load_base(MODEL, quantize=quantize)
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-kernels-"))
    path = make_adapters(model, folder, {"r16": AdapterSpec(rank=RANK, targets=TARGETS,
                                                            scale=0.02)})["r16"]
    config = EngineConfig(max_model_len=prompt_tokens + 64, max_num_seqs=4,
                          max_num_batched_tokens=max(1024, prompt_tokens),
                          max_lora_rank=RANK, max_active_adapters=2, adapter_roots=[folder])
    rng = random.Random(0)
    peers = {"no_adapter": (None, False), "adapter_padded": ("r16", False),
             "adapter_kernel": ("r16", True)}
    times: dict[str, list[float]] = {peer: [] for peer in peers}
    with Engine(model, tokenizer, config).start() as engine:
        engine.load_adapter("r16", str(path))
        batch = engine.runner.lora_batch
        takes_chunks = batch.kernel_chunks
        for round_ in range(prompts + 1):
            for peer, (adapter, by_kernel) in peers.items():
                batch.kernel_chunks = by_kernel and takes_chunks
                ids = [rng.randrange(100, tokenizer.vocab_size) for _ in range(prompt_tokens)]
                start = time.perf_counter()
                engine.generate([ids], SamplingParams(max_tokens=1, temperature=0),
                                adapters=[adapter])
                if round_:  # the first round warms up
                    times[peer].append(time.perf_counter() - start)
    row = {peer: round(1000 * statistics.median(ts)) for peer, ts in times.items()}
    return {"prompt_tokens": prompt_tokens, "prompts": prompts,
            **{f"{peer}_ttft_ms_p50": ms for peer, ms in row.items()},
            "kernel_speedup": round(row["adapter_padded"] / row["adapter_kernel"], 2)}
