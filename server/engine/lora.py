"""Multi-LoRA linear layers: one base projection, many adapters, per-token slots.

Every LoRA-wrapped projection owns two stacked buffers allocated once:
    a: [slots, max_rank, in_features]    b: [slots, out_features, max_rank]
Installing an adapter copies into a slot; the layers only ever see per-token slot indices.

Per step, `LoraBatch.route` groups the decode tokens by slot ONCE; every layer then pads
them into [groups, max_tokens_per_group, in] and runs two batched matmuls against the
gathered slots, so each active adapter's A and B are read once per step (the SGMV idea
of Punica / S-LoRA, as dense bmm: CPU has no segmented-GEMM kernel to call). Prompt
chunks, contiguous and of one adapter each, take a slice instead.

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

    Decode tokens (one per sequence, first in the step) are grouped by slot for two
    batched matmuls. Prompt chunks are contiguous runs of one slot each: they use plain
    slices, since padding a 128-token chunk into a group tensor would waste most of it.
    """

    def __init__(self):
        self.active = False

    def route(self, decode_slots: torch.Tensor, chunks: list[tuple[int, int, int]],
              rank: int) -> None:
        """decode_slots: [decodes] slot per decode token (-1: none); chunks: (start, end,
        slot) token ranges of prompt chunks with an adapter; rank: widest rank in use."""
        self.chunks = chunks
        self.rank = rank
        self.slot_set = {slot for _, _, slot in chunks} | set(decode_slots.tolist()) - {-1}
        tokens = (decode_slots >= 0).nonzero().squeeze(1)
        self.grouped = tokens.numel() > 0
        self.active = self.grouped or bool(chunks)
        if not self.grouped:
            return
        slots = decode_slots[tokens]
        order = torch.argsort(slots, stable=True)
        self.tokens, slots = tokens[order], slots[order]  # tokens grouped by slot
        self.slots, counts = torch.unique_consecutive(slots, return_counts=True)
        self.group = torch.repeat_interleave(torch.arange(len(counts)), counts)
        starts = torch.cumsum(counts, 0) - counts
        self.position = torch.arange(len(slots)) - starts[self.group]  # index within group
        self.max_group = int(counts.max())
        # slots exactly 0..groups-1 (a full pool): layers can use a view, not a gather
        self.leading = int(self.slots[-1]) == len(self.slots) - 1


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
        weight = self.base.weight
        delta = self.b[slot].float() @ self.a[slot].float()  # [out, in]
        self.merged = (weight.float() + delta).to(weight.dtype)

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
        for start, end, slot in batch.chunks:  # prompt chunks: contiguous, one slot each
            a, b = self.a[slot, :batch.rank], self.b[slot, :, :batch.rank]
            y[start:end] += (x[start:end].to(a.dtype) @ a.T @ b.T).to(y.dtype)
        if batch.grouped:
            y.index_add_(0, batch.tokens, self._grouped(x).to(y.dtype))
        return y

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Decode tokens' deltas, each adapter's A and B read once: [routed tokens, out]."""
        batch = self.batch
        groups = len(batch.slots)
        if batch.max_group == 1:  # one token per adapter: no padding needed
            xg = x[batch.tokens].unsqueeze(1)
        else:
            xg = x.new_zeros(groups, batch.max_group, x.shape[1])
            xg[batch.group, batch.position] = x[batch.tokens]
        if batch.leading:
            a, b = self.a[:groups, :batch.rank], self.b[:groups, :, :batch.rank]
        else:
            a = self.a[batch.slots, :batch.rank]  # [groups, rank, in]
            b = self.b[batch.slots, :, :batch.rank]  # [groups, out, rank]
        delta = torch.bmm(torch.bmm(xg.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
        return delta[batch.group, batch.position]  # [groups, max_group, out] -> token order
