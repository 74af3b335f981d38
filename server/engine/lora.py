"""Multi-LoRA linear layers: one base projection, many adapters, per-token slots.

Every LoRA-wrapped projection owns two stacked buffers allocated once:
    a: [slots, max_rank, in_features]    b: [slots, out_features, max_rank]
Installing an adapter copies into a slot; the layers only ever see per-token slot indices.

Per step, `LoraBatch.route` groups the tokens ONCE; every layer then pads them into
[groups, tokens_per_group, in] and runs two batched matmuls, so each active adapter's A
and B are read once per step (the SGMV idea of Punica / S-LoRA, as dense bmm: CPU has no
segmented-GEMM kernel to call). Measured here (bf16, 576x576, 64 r16 slots, 128 decode
tokens): the grouped path costs ~0.45 ms per projection beside 0.3 ms for the base
matmul; a loop of small matmuls per prompt chunk cost as much as the base, padded into
one bmm it costs about half.

Merging (dLoRA): while every running token uses one adapter, its delta can be folded
into the base weight, `W' = W + B A`, and the LoRA path skipped. The layer keeps W
untouched and holds W' beside it, so unmerging is a pointer swap and exact. Only for an
unquantized base: on NF4 / int8, W' would have to be re-quantized, which adds an error of
the same order as the LoRA delta itself (an NF4 step is ~1/8 of a block's absmax), costs a
dequantize + quantize per matrix on every switch, and would change outputs versus the
unmerged path; there the LoRA path simply stays on.
"""

import torch
from torch import nn
from torch.nn import functional as F


class LoraBatch:
    """Token -> slot routing for one step, shared by every LoRA layer of the model.

    Both kinds of token are padded into groups for two batched matmuls per layer:
    decode tokens (one per sequence, first in the step) are grouped by slot, and group g
    IS slot g, so the layers read the slot stack as a view (gathering 64 slots' A and B
    costs more than the matmuls); prompt chunks, a contiguous run of one slot each, are
    one group per chunk (their few slots are gathered).
    """

    def __init__(self):
        self.active = False

    def route(self, decode_slots: torch.Tensor, chunks: list[tuple[int, int, int]],
              rank: int) -> None:
        """decode_slots: [decodes] slot per decode token (-1: none); chunks: (start, end,
        slot) token ranges of prompt chunks with an adapter; rank: widest rank in use."""
        self.rank = rank
        self.slot_set = {slot for _, _, slot in chunks} | set(decode_slots.tolist()) - {-1}
        self.active = bool(self.slot_set)
        tokens = (decode_slots >= 0).nonzero().squeeze(1)
        self.decode = _Groups.of(tokens, decode_slots[tokens]) if len(tokens) else None
        self.chunks = None
        if chunks:
            tokens = torch.cat([torch.arange(start, end) for start, end, _ in chunks])
            group = torch.repeat_interleave(torch.arange(len(chunks)),
                                            torch.tensor([end - start for start, end, _ in chunks]))
            self.chunks = _Groups.of(tokens, group)
            self.chunk_slots = torch.tensor([slot for _, _, slot in chunks])


class _Groups:
    """Tokens padded into groups: token `tokens[i]` goes to row `position[i]` of group
    `group[i]`; `size` groups of up to `longest` rows."""

    def __init__(self, tokens, group, position, size: int, longest: int):
        self.tokens, self.group, self.position = tokens, group, position
        self.size, self.longest = size, longest

    @classmethod
    def of(cls, tokens: torch.Tensor, group: torch.Tensor) -> "_Groups":
        order = torch.argsort(group, stable=True)
        tokens, group = tokens[order], group[order]
        ids, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(group)) - torch.repeat_interleave(starts, counts)
        return cls(tokens, group, position, int(ids[-1]) + 1, int(counts.max()))

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x: [tokens, in]; a: [size, rank, in]; b: [size, out, rank] -> [routed, out]."""
        xg = x.new_zeros(self.size, self.longest, x.shape[1])
        xg[self.group, self.position] = x[self.tokens]
        xg = xg.to(a.dtype)
        out = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2))
        return out[self.group, self.position]


class MultiLoraLinear(nn.Module):
    """`base(x) + B[s] (A[s] x)` for each token's slot s, grouped by slot."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, slots: int,
                 max_rank: int, dtype: torch.dtype, batch: LoraBatch):
        super().__init__()
        self.base = base
        self.batch = batch
        device = next(base.parameters()).device
        self.a = torch.zeros(slots, max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(slots, out_features, max_rank, dtype=dtype, device=device)
        self.merged: torch.Tensor | None = None  # W + B A of the merged slot, if any
        self.filled: set[int] = set()  # slots whose adapter targets this projection

    def install(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy an adapter into `slot` (zero-padded to max_rank); None clears the slot."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.filled.discard(slot)
        if a is not None:
            self.filled.add(slot)
            rank = a.shape[0]
            self.a[slot, :rank].copy_(a)
            self.b[slot, :, :rank].copy_(b)

    def merge(self, slot: int) -> None:
        """Serve `slot` through a merged weight (unquantized base only)."""
        if slot not in self.filled:
            return  # the adapter does not target this projection: the base serves it
        # W + B A in one fused call, in the weight's dtype (accumulated in fp32 inside)
        self.merged = torch.addmm(self.base.weight, self.b[slot], self.a[slot])

    def unmerge(self) -> None:
        """Back to the untouched base weight; exact, nothing was modified."""
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_features]
        if self.merged is not None:
            y = F.linear(x, self.merged, self.base.bias)
        else:
            y = self.base(x)
        batch = self.batch
        if not batch.active or self.filled.isdisjoint(batch.slot_set):
            return y  # no adapter in this step targets this projection
        rank = batch.rank
        if batch.decode is not None:  # group g is slot g: a view of the stacks
            groups = batch.decode
            a, b = self.a[:groups.size, :rank], self.b[:groups.size, :, :rank]
            y.index_add_(0, groups.tokens, groups.delta(x, a, b).to(y.dtype))
        if batch.chunks is not None:  # one group per prompt chunk: gather its slot
            a, b = self.a[batch.chunk_slots, :rank], self.b[batch.chunk_slots, :, :rank]
            y.index_add_(0, batch.chunks.tokens, batch.chunks.delta(x, a, b).to(y.dtype))
        return y
