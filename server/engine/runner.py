"""The forward pass of one engine step over a Llama-family model, with a paged KV cache.

A step is a flat list of tokens from many sequences, no padding: first one decode token
for each decoding sequence, then prompt chunks of sequences being prefilled. Token-wise
work (projections, LoRA, MLP) runs on all of them at once; attention reads each
sequence's blocks through its block table (server/engine/kv.py).

q/k/v run as one matmul over their concatenated weights, with one grouped LoRA shrink
(server/engine/lora.py). gate/up could be fused the same way, but measured here it is
slower: on 2 CPU cores in float32 one [576, 3072] matmul costs 1-4% more than two
[576, 1536] ones, and `bench serving` lost 5% tokens/s with it; these matmuls are
compute-bound, so one call saves nothing that two cost. They stay apart.

Nothing here runs under torch.compile, measured with `lorag bench compile` (inductor, CPU,
fp32, 2 cores, median times): on a layer's elementwise work (RMSNorm after the residual
add, SiLU * up, rotary) the compiled code saved 0 at 8 tokens, 40 us of 310 at 128 and
0.8 ms of 2.4 at 1024, while that layer's matmuls take about 6 ms at 128 tokens and 39
at 1024: under 2% of a step. On the LoRA delta of a fused q/k/v layer (64 slots, r16) it
was 28% slower at 8 decode tokens and within 3% at 16-128. That is below the run-to-run
spread of `bench serving` (5%), against 5 s of compiling at start-up and a recompile
(0.8-5 s, in the middle of serving) when a step's size leaves the compiled range.

The KV cache is allocated once: [layers, blocks, kv_heads, 2 * block_size, head_dim], K
then V within each block (the layout of vLLM's CPU kernels); which blocks a sequence
uses is the engine's business (kv.BlockPool), nothing is reallocated during a step.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorag.adapters import BaseShape
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.kernels import kernel_takes_chunks, kernels_available
from lorag.server.engine.kv import AttentionInput, attention_backend, slot_mapping
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse
from lorag.server.engine.memory import lazy_zeros
from lorag.server.engine.w8a8 import W8A8Linear, w8a8_modules

# the projections of a layer run as these five matmuls (a group shares its input)
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",)}


@dataclass
class Prefill:
    """A prompt chunk in a step: prompt tokens [start, start + length) of a sequence, run
    with the adapter in `lora_slot` (-1: none)."""

    start: int
    length: int
    lora_slot: int


HEAD_BLOCK = 8192  # vocabulary rows of the head converted to float32 at once


@dataclass
class StepInput:
    """Everything one forward pass needs; tensors are on the model's device.

    input_ids, positions, lora_slots: [tokens]; decodes: how many sequences decode one
    token (first in the step); prefills: the prompt chunks that follow, in order;
    attention: where every sequence's tokens sit in the paged cache; sample_at:
    [samples] token indices whose next-token logits are wanted; precise: the samples
    (indices into sample_at) whose logits are computed in float32 whatever the model's
    dtype, because their log-probabilities are reported. embeds: (row, [n, hidden]) input
    embeddings that replace the embedding of rows row..row+n-1 (a prompt-tuning
    adapter's virtual tokens; their input_ids are placeholders).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    lora_slots: torch.Tensor
    decodes: int
    prefills: list[Prefill]
    attention: AttentionInput
    sample_at: torch.Tensor
    lora_rank: int
    precise: torch.Tensor | None = None
    embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    """Owns the model, its LoRA layers and the KV cache; runs `forward(StepInput)`."""

    def __init__(self, model, config: EngineConfig):
        self.model = model
        self.config = config
        hf = model.config
        if hf.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported architecture {hf.model_type!r}: the engine runs "
                             "Llama-family decoders (llama, mistral, qwen2)")
        self.shape = BaseShape.from_config(hf)
        self.layers = model.model.layers
        self.num_heads = hf.num_attention_heads
        self.num_kv_heads = hf.num_key_value_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // self.num_heads
        self.vocab_size = model.model.embed_tokens.num_embeddings
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        self.quantized = getattr(hf, "quantization_config", None) is not None
        size = config.kv_block_size
        # RAM is taken block by block, as requests reach them
        self.kv_cache = lazy_zeros((len(self.layers), config.kv_blocks, self.num_kv_heads,
                                    2 * size, self.head_dim), self.dtype, self.device)
        self.attention = attention_backend(config.attention_backend, self.device, self.dtype,
                                           self.num_heads, self.num_kv_heads, self.head_dim,
                                           size)
        # the SGMV kernel on CPU (built at `make setup`; compiled here if not, ~15 s)
        kernel = self.device.type == "cpu" and kernels_available()
        self.lora_batch = LoraBatch(kernel, kernel and kernel_takes_chunks(self.dtype))
        # per layer, FUSED's group -> its layer; those with LoRA slots also listed apart
        self.projections: list[dict[str, nn.Module]] = []
        self.lora_layers: list[MultiLoraLinear] = []
        for index, layer in enumerate(self.layers):
            self.projections.append({group: self._fuse(index, layer, names)
                                     for group, names in FUSED.items()})

    def _fuse(self, index: int, layer, names: tuple[str, ...]) -> nn.Module:
        """The group's projections as one layer, with LoRA slots for those of them the
        config targets. The model's own modules stay (their weights now views of the
        fused weight), so the model is still a working model."""
        parent = layer.self_attn if names[0] in FUSED["qkv"] + FUSED["o"] else layer.mlp
        outs = [self.shape.shapes[name][1] for name in names]
        modules = [getattr(parent, name) for name in names]
        base = W8A8Linear(modules, self.dtype) if w8a8_modules(modules) else fuse(modules, outs)
        offsets = [sum(outs[:j]) for j in range(len(names))]
        parts = [Part((index, name), offset, out)
                 for name, offset, out in zip(names, offsets, outs, strict=True)
                 if name in self.config.lora_target_modules]
        if not parts:
            return base
        lora = MultiLoraLinear(base, self.shape.shapes[names[0]][0], parts,
                               self.config.max_active_adapters, self.config.max_lora_rank,
                               self.dtype, self.lora_batch)
        self.lora_layers.append(lora)
        return lora

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Run the step; returns float32 logits [samples, vocab]."""
        decodes = step.decodes
        chunks, start = [], decodes
        for chunk in step.prefills:
            if chunk.lora_slot >= 0:
                chunks.append((start, start + chunk.length, chunk.lora_slot))
            start += chunk.length
        self.lora_batch.route(step.lora_slots[:decodes], chunks, step.lora_rank)
        hidden = self.model.model.embed_tokens(step.input_ids)  # [tokens, hidden]
        for row, embeds in step.embeds:
            hidden[row:row + len(embeds)] = embeds
        cos, sin = self.model.model.rotary_emb(hidden, step.positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]  # [tokens, head_dim]
        self.attention.prepare(step.attention)
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            run = self.projections[index]
            residual = hidden
            q, k, v = run["qkv"](layer.input_layernorm(hidden)).split(
                [q_out, kv_out, kv_out], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            keys, values = self.kv_cache[index].chunk(2, dim=2)  # views of the layer's cache
            out = self.attention(keys, values, q, k, v, step.attention).flatten(1)
            hidden = residual + run["o"](out)
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + run["down"](layer.mlp.act_fn(run["gate"](x)) * run["up"](x))
        last = self.model.model.norm(hidden[step.sample_at])
        logits = self.model.lm_head(last).float()
        if step.precise is not None and len(step.precise):
            self._precise_logits(logits, last, step.precise)
        return logits

    @torch.inference_mode()
    def write_kv(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Put every layer's keys and values `kv` [layers, 2, n, kv_heads * head_dim] (a
        prefix-tuning adapter's) in `blocks`, from their first row, as attention writes
        computed ones: positions 0..n-1 of whoever holds the blocks."""
        size = self.config.kv_block_size
        count = kv.shape[2]
        if not count:
            return
        slots = torch.tensor(slot_mapping(blocks, 0, count, size), dtype=torch.long,
                             device=self.device)
        kv = kv.to(self.device, self.dtype).unflatten(-1, (self.num_kv_heads, self.head_dim))
        for index, (keys, values) in enumerate(kv):
            cache_k, cache_v = self.kv_cache[index].chunk(2, dim=2)
            self.attention.write(cache_k, cache_v, keys, values, slots)

    def _precise_logits(self, logits: torch.Tensor, last: torch.Tensor,
                        rows: torch.Tensor) -> None:
        """Recompute `rows` of `logits` from the final hidden states in float32. A bf16 head
        rounds its output to 8 bits of mantissa: a logit near 16 moves in steps of 0.125,
        which makes log-probabilities (and a reranker's yes/no odds, which tie) coarse.
        The head's weight is converted a block of the vocabulary at a time (no float32
        copy of it is kept)."""
        head = self.model.lm_head
        if type(head) is not nn.Linear or head.weight.dtype == torch.float32:
            return
        states = last[rows].float()
        for start in range(0, head.weight.shape[0], HEAD_BLOCK):
            end = start + HEAD_BLOCK
            block = states @ head.weight[start:end].float().T
            if head.bias is not None:
                block += head.bias[start:end].float()
            logits[rows, start:end] = block
