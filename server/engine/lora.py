"""Multi-LoRA linear layers: one base projection, many adapters, per-token slots.

Every LoRA-wrapped projection owns two stacked buffers allocated once:
    a: [slots, max_rank, in_features]    b: [slots, out_features, max_rank]
Installing an adapter copies into a slot; the layers only ever see per-token slot indices.

Per step, `LoraBatch.route` sorts the step's tokens by slot ONCE; every layer then pads
them into [groups, max_tokens_per_group, in] and runs two batched matmuls against the
gathered slots, so each active adapter's A and B are read once per step (the SGMV idea
of Punica / S-LoRA, as dense bmm: CPU has no segmented-GEMM kernel to call).

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
    """Token -> slot routing for one step, shared by every LoRA layer of the model."""

    def __init__(self):
        self.active = False

    def route(self, token_slots: torch.Tensor, rank: int) -> None:
        """token_slots: [tokens] slot per token, -1 for none; rank: widest rank in use."""
        tokens = (token_slots >= 0).nonzero().squeeze(1)
        self.active = tokens.numel() > 0
        if not self.active:
            return
        slots = token_slots[tokens]
        order = torch.argsort(slots, stable=True)
        self.tokens, slots = tokens[order], slots[order]  # tokens grouped by slot
        self.slots, counts = torch.unique_consecutive(slots, return_counts=True)
        self.group = torch.repeat_interleave(torch.arange(len(counts)), counts)
        starts = torch.cumsum(counts, 0) - counts
        self.position = torch.arange(len(slots)) - starts[self.group]  # index within group
        self.max_group = int(counts.max())
        self.rank = rank


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

    def install(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy an adapter into `slot` (zero-padded to max_rank); None clears the slot."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if a is not None:
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
        if not batch.active:
            return y
        groups = len(batch.slots)
        if batch.max_group == 1:  # one token per adapter (typical decode): no padding
            xg = x[batch.tokens].unsqueeze(1)
        else:
            xg = x.new_zeros(groups, batch.max_group, x.shape[1])
            xg[batch.group, batch.position] = x[batch.tokens]
        a = self.a[batch.slots, :batch.rank]  # [groups, rank, in]
        b = self.b[batch.slots, :, :batch.rank]  # [groups, out, rank]
        delta = torch.bmm(torch.bmm(xg.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
        # delta: [groups, max_group, out] -> back to token order
        y.index_add_(0, batch.tokens, delta[batch.group, batch.position].to(y.dtype))
        return y
