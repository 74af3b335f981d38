"""The forward pass of one engine step over a Llama-family model, with a fixed KV cache.

A step is a flat list of tokens from many sequences, no padding: first one decode token
for each decoding sequence, then prompt chunks of sequences being prefilled. Token-wise
work (projections, LoRA, MLP) runs on all of them at once; attention is split: the decode
tokens attend in one batched call over the cache, each prefill chunk attends alone.

The KV cache is allocated once: [layers, max_num_seqs, kv_heads, max_model_len, head_dim]
for K and for V. A sequence owns one slot (a row) for its whole life; nothing is
reallocated during a step. Slots are handed out lowest-first so that decode attention over
cache rows [0, highest used slot] wastes little on free rows.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorag.adapters import TARGET_MODULES, BaseShape
from lorag.server.engine.config import EngineConfig
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear


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
        self.lora_layers = self._wrap_projections()

    def _wrap_projections(self) -> dict[tuple[int, str], MultiLoraLinear]:
        wrapped = {}
        for index, layer in enumerate(self.layers):
            for name in self.config.lora_target_modules:
                parent = layer.self_attn if name in TARGET_MODULES[:4] else layer.mlp
                in_f, out_f = self.shape.shapes[name]
                base = getattr(parent, name)
                if isinstance(base, MultiLoraLinear):  # served before: the model is one
                    base = base.base  # engine's at a time, the newest one's from now on
                lora = MultiLoraLinear(base, in_f, out_f,
                                       self.config.max_active_adapters,
                                       self.config.max_lora_rank, self.dtype, self.lora_batch)
                setattr(parent, name, lora)
                wrapped[(index, name)] = lora
        return wrapped

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
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(-1, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            out = self._attention(index, q, k, v, step)  # [tokens, heads * head_dim]
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
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
