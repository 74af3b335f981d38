"""The forward pass of one engine step over a Llama-family model, with a fixed KV cache.

A step is a flat list of tokens from many sequences, no padding: first one decode token
for each decoding sequence, then prompt chunks of sequences being prefilled. Token-wise
work (projections, LoRA, MLP) runs on all of them at once; attention is split: the decode
tokens attend in one batched call over the cache, each prefill chunk attends alone.

q/k/v run as one matmul over their concatenated weights, with one grouped LoRA shrink
(server/engine/lora.py). gate/up could be fused the same way, but measured here it is
slower: on 2 CPU cores in float32 one [576, 3072] matmul costs 1-4% more than two
[576, 1536] ones, and `bench serving` lost 5% tokens/s with it; these matmuls are
compute-bound, so one call saves nothing that two cost. They stay apart.

The KV cache is allocated once: [layers, max_num_seqs, kv_heads, max_model_len, head_dim]
for K and for V. A sequence owns one slot (a row) for its whole life; nothing is
reallocated during a step. Slots are handed out lowest-first so that decode attention over
cache rows [0, highest used slot] wastes little on free rows.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorag.adapters import BaseShape
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse

# the projections of a layer run as these five matmuls (a group shares its input)
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",)}


@dataclass
class Prefill:
    """A prompt chunk in a step: tokens [start, start + length) of the sequence in cache
    slot `slot`, run with the adapter in `lora_slot` (-1: none)."""

    slot: int
    start: int
    length: int
    lora_slot: int


@dataclass
class StepInput:
    """Everything one forward pass needs; tensors are on the model's device.

    input_ids, positions, lora_slots: [tokens]; decode_slots, decode_lengths: [decodes]
    (cache slot and context length including the new token, for the first `decodes`
    tokens); prefills: the chunks that follow, in order; sample_at: [samples] token
    indices whose next-token logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    lora_slots: torch.Tensor
    decode_slots: torch.Tensor
    decode_lengths: torch.Tensor
    prefills: list[Prefill]
    sample_at: torch.Tensor
    lora_rank: int


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
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        self.quantized = getattr(hf, "quantization_config", None) is not None
        cache_shape = (len(self.layers), config.max_num_seqs, self.num_kv_heads,
                       config.max_model_len, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.lora_batch = LoraBatch()
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
        base = fuse([getattr(parent, name) for name in names], outs)
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
        decodes = len(step.decode_slots)
        chunks, start = [], decodes
        for chunk in step.prefills:
            if chunk.lora_slot >= 0:
                chunks.append((start, start + chunk.length, chunk.lora_slot))
            start += chunk.length
        self.lora_batch.route(step.lora_slots[:decodes], chunks, step.lora_rank)
        hidden = self.model.model.embed_tokens(step.input_ids)  # [tokens, hidden]
        cos, sin = self.model.model.rotary_emb(hidden, step.positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]  # [tokens, head_dim]
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
            out = self._attention(index, q, k, v, step)  # [tokens, heads * head_dim]
            hidden = residual + run["o"](out)
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + run["down"](layer.mlp.act_fn(run["gate"](x)) * run["up"](x))
        last = self.model.model.norm(hidden[step.sample_at])
        return self.model.lm_head(last).float()

    def _attention(self, index: int, q, k, v, step: StepInput) -> torch.Tensor:
        # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
        k_cache, v_cache = self.k_cache[index], self.v_cache[index]
        out = torch.empty_like(q)
        decodes = len(step.decode_slots)
        if decodes:
            slots, lengths = step.decode_slots, step.decode_lengths
            k_cache[slots, :, lengths - 1] = k[:decodes]
            v_cache[slots, :, lengths - 1] = v[:decodes]
            out[:decodes] = self._decode_attention(k_cache, v_cache, q[:decodes], slots, lengths)
        offset = decodes
        for chunk in step.prefills:
            end = chunk.start + chunk.length
            span = slice(offset, offset + chunk.length)
            k_cache[chunk.slot, :, chunk.start:end] = k[span].transpose(0, 1)
            v_cache[chunk.slot, :, chunk.start:end] = v[span].transpose(0, 1)
            query = q[span].transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
            keys = k_cache[chunk.slot, :, :end].unsqueeze(0)
            values = v_cache[chunk.slot, :, :end].unsqueeze(0)
            if chunk.start == 0:
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True,
                                                   enable_gqa=True)
            else:  # a later chunk sees the whole cached prefix plus itself, causally
                rows = torch.arange(chunk.start, end, device=q.device).unsqueeze(1)
                mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                   enable_gqa=True)
            out[span] = o[0].transpose(0, 1)
            offset += chunk.length
        return out.flatten(1)

    def _decode_attention(self, k_cache, v_cache, q, slots, lengths) -> torch.Tensor:
        # One query per sequence, attending over cache rows [0, highest slot] as one batch:
        # a view, no gather; rows of free slots are computed and dropped. Two batched
        # matmuls, not SDPA: the CPU flash kernel is ~10x slower with a single query row.
        rows = int(slots.max()) + 1
        longest = int(lengths.max())
        group = self.num_heads // self.num_kv_heads
        query = q.new_zeros(rows, self.num_kv_heads, group, self.head_dim)
        query[slots] = q.view(-1, self.num_kv_heads, group, self.head_dim)
        # [rows * kv_heads, longest, head_dim]: still a view of the cache (no copy)
        keys = k_cache[:rows, :, :longest].flatten(0, 1)
        values = v_cache[:rows, :, :longest].flatten(0, 1)
        query = query.flatten(0, 1)  # [rows * kv_heads, group, head_dim]
        scores = torch.bmm(query, keys.transpose(1, 2)).float() * self.head_dim ** -0.5
        limit = torch.ones(rows, dtype=lengths.dtype, device=q.device)  # free rows: 1 key
        limit[slots] = lengths
        hidden = torch.arange(longest, device=q.device).unsqueeze(0) >= limit.unsqueeze(1)
        scores = scores.view(rows, self.num_kv_heads, group, longest)
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype).flatten(0, 1)
        out = torch.bmm(probs, values).view(rows, self.num_kv_heads, group, self.head_dim)
        return out[slots].view(-1, self.num_heads, self.head_dim)
