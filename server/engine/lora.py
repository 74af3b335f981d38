"""Multi-LoRA linear layers over fused projections: one base matmul, many adapters,
per-token slots.

Projections that read the same input can run as one (the runner fuses q/k/v), on
weights concatenated once at start-up (`fuse`). Their LoRA runs fused too, as vLLM's
merged-QKV LoRA layers do: the A matrices of the parts are stacked, so the shrink
`A x` of q, k and v is one grouped matmul; the expand `B (A x)` is split by output part.
Every LoRA layer owns stacked buffers allocated once:
    a: [slots, max_rank, parts, in_features]    b[part]: [slots, max_rank, out_features]
Installing an adapter copies into a slot; the layers only ever see per-token slot indices.
(The rank is the outer dimension of `a` so that the ranks in use, `a[:, :rank]`, are one
view [slots, rank * parts, in] with no copy; `b` is stored as B transposed, so the
expand reads contiguous [rank, out] matrices: 20% faster than bmm on B's transpose.)

Per step, `LoraBatch.route` groups the tokens ONCE by adapter; every layer then reads
each active adapter's A and B once (the SGMV idea of Punica / S-LoRA), two ways:
- by the engine's own SGMV kernel on CPU (csrc/sgmv.cpp, server/engine/kernels.py):
  decode tokens always, prompt chunks (a run of tokens of one adapter each) where the
  kernel has a GEMM path for the dtype (float32 on AVX2, bf16 on AVX512-BF16). Measured
  here (bf16, 128 decode tokens over 64 r16 slots, fused q/k/v; best of 15): 0.17 ms
  beside 0.38 ms for the base matmul, against 0.58 ms padded into batched matmuls, most
  of that padding and oneDNN reading small matrices at a third of memory speed; prompt
  chunks of 128-1024 tokens: `lorag bench kernels`;
- otherwise (off CPU, where the kernel did not build, or has no GEMM path): padded into
  [groups, tokens_per_group, in] for batched matmuls.
Fusing q/k/v shares the shrink's input reads in both.

DoRA adapters run the same path; each slot has a column scale (1 for LoRA's) that DoRA
tokens' rows are multiplied by after the delta (`MultiLoraLinear.install`, `_scale_rows`).
IA3 adapters (rank 0: no A or B) use the same column scale for the projections whose
output they scale (k, v), and a per-slot input scale for those whose input they scale
(down_proj: `W (l * x)`), applied to their tokens' rows before the base matmul.

Merging (dLoRA): while every running token uses one adapter, its delta can be folded
into the base weight, `W' = W + B A`, and the LoRA path skipped. The layer keeps W
untouched and holds W' beside it, so unmerging is a pointer swap and exact. Only for an
unquantized base: on NF4 / int8, W' would have to be re-quantized, which adds an error of
the same order as the LoRA delta itself (an NF4 step is ~1/8 of a block's absmax), costs a
dequantize + quantize per matrix on every switch, and would change outputs versus the
unmerged path; there the LoRA path simply stays on.
"""

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from lorag.adapters import IA3_INPUT_MODULES
from lorag.server.engine.memory import lazy_zeros
from lorag.server.engine.w8a8 import W8A8Linear


class LoraBatch:
    """Token -> slot routing for one step, shared by every LoRA layer of the model.

    With the SGMV kernel (`use_kernel`: the runner's choice, on CPU where it built),
    decode tokens (one per sequence, first in the step) become `segments`, one per slot,
    and so do prompt chunks with `kernel_chunks` (where the kernel has a GEMM path).
    Otherwise decode tokens are padded into groups for batched matmuls, and group g IS
    slot g, so the layers read the slot stack as a view (gathering 64 slots' A and B
    costs more than the matmuls); prompt chunks, a contiguous run of one slot each, are
    one group per chunk (their few slots are gathered).
    """

    def __init__(self, use_kernel: bool, kernel_chunks: bool = False):
        self.active = False
        self.use_kernel = use_kernel
        self.kernel_chunks = use_kernel and kernel_chunks
        # slots whose tokens' rows are scaled (a DoRA or an IA3 adapter's): the pool's
        self.scaled_slots: set[int] = set()
        self.scaled = None  # this step's (tokens, their slots) on those slots, if any

    def route(self, decode_slots: torch.Tensor, chunks: list[tuple[int, int, int]],
              rank: int) -> None:
        """decode_slots: [decodes] slot per decode token (-1: none); chunks: (start, end,
        slot) token ranges of prompt chunks with an adapter; rank: widest rank in use."""
        self.rank = rank
        self.slot_set = {slot for _, _, slot in chunks} | set(decode_slots.tolist()) - {-1}
        self.active = bool(self.slot_set)
        self.segments = self.decode = self.chunks = self.scaled = None
        if not self.active:
            return
        if not self.scaled_slots.isdisjoint(self.slot_set):
            self.scaled = _rows_on(decode_slots, chunks, self.scaled_slots)
        device = decode_slots.device  # every index on the step's device
        tokens = (decode_slots >= 0).nonzero().squeeze(1)
        slots = decode_slots[tokens]
        if chunks:
            chunk_tokens = torch.cat([torch.arange(start, end, device=device)
                                      for start, end, _ in chunks])
            lengths = torch.tensor([end - start for start, end, _ in chunks], device=device)
            chunk_slots = torch.tensor([slot for _, _, slot in chunks], device=device)
            if self.kernel_chunks:  # segments of the kernel, with the decode tokens'
                tokens = torch.cat([tokens, chunk_tokens])
                slots = torch.cat([slots, torch.repeat_interleave(chunk_slots, lengths)])
            else:  # one group per chunk: chunks come in token order
                group = torch.repeat_interleave(torch.arange(len(chunks), device=device),
                                                lengths)
                self.chunks, self.chunk_slots = _Groups.of(chunk_tokens, group), chunk_slots
        if len(tokens):
            if self.use_kernel:
                self.segments = _Segments(tokens, slots)
            else:
                self.decode = _Groups.of(tokens, slots)


def _rows_on(decode_slots: torch.Tensor, chunks: list[tuple[int, int, int]],
             wanted_slots: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's tokens on `wanted_slots`, and each one's slot."""
    device = decode_slots.device
    wanted = torch.tensor(sorted(wanted_slots), device=device)
    tokens = torch.isin(decode_slots, wanted).nonzero().squeeze(1)
    rows, slots = [tokens], [decode_slots[tokens]]
    for start, end, slot in chunks:
        if slot in wanted_slots:
            rows.append(torch.arange(start, end, device=device))
            slots.append(torch.full((end - start,), slot, device=device))
    return torch.cat(rows), torch.cat(slots)


class _Segments:
    """Tokens grouped by slot as the SGMV kernel takes them: segment s is the tokens
    `tokens[starts[s]:starts[s + 1]]`, all with the adapter in slot `slots[s]`."""

    def __init__(self, tokens: torch.Tensor, slots: torch.Tensor):
        """tokens: routed token indices; slots: each one's slot."""
        order = torch.argsort(slots, stable=True)
        self.slots, counts = torch.unique_consecutive(slots[order], return_counts=True)
        self.tokens = tokens[order]
        self.starts = F.pad(torch.cumsum(counts, 0), (1, 0))


class _Groups:
    """Tokens padded into groups: token `tokens[i]` goes to row `rows[i]` of the padded
    [size * longest, features] buffer (row `group * longest + position`); `size` groups of
    up to `longest` rows. `source` is the other way round: the token each padded row
    holds (a padding row repeats the first token; its output is never read). Tokens are
    in ascending order; `span` is (first, last + 1) when they are one contiguous run
    (every decode token routed, a run of prompt chunks), so the delta is added to a slice.

    Padding and unpadding are index_select on these indices, and the delta is added with
    add_ on a slice: measured here (bf16, 128 decode tokens over 64 slots), advanced
    indexing into [size, longest] and index_add_ cost 0.72 ms of a fused q/k/v delta, this
    way 0.4 ms (padding alone: 8.6 us, against 29 us for zeros + index_copy_)."""

    def __init__(self, tokens, rows, size: int, longest: int):
        self.tokens, self.rows = tokens, rows
        self.size, self.longest = size, longest
        self.source = tokens[0].repeat(size * longest)
        self.source[rows] = tokens
        first, last = int(tokens[0]), int(tokens[-1])
        self.span = (first, last + 1) if last + 1 - first == len(tokens) else None

    @classmethod
    def of(cls, tokens: torch.Tensor, group: torch.Tensor) -> "_Groups":
        """tokens: ascending token indices; group: each one's group."""
        order = torch.argsort(group, stable=True)
        ids, counts = torch.unique_consecutive(group[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        longest = int(counts.max())
        position = torch.empty_like(order)
        position[order] = (torch.arange(len(order), device=order.device)
                           - torch.repeat_interleave(starts, counts))
        return cls(tokens, group * longest + position, int(ids[-1]) + 1, longest)

    def pad(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x: [tokens, in] -> [size, longest, in], the routed tokens in their groups."""
        return x.index_select(0, self.source).to(dtype).view(self.size, self.longest, -1)

    def add(self, y: torch.Tensor, yg: torch.Tensor) -> None:
        """y[tokens] += the tokens' rows of yg ([size, longest, out]); y: [tokens, out]."""
        delta = yg.view(-1, yg.shape[-1]).index_select(0, self.rows).to(y.dtype)
        if self.span:
            y[self.span[0]:self.span[1]].add_(delta)
        else:
            y.index_add_(0, self.tokens, delta)


class Part(NamedTuple):
    """One projection of a fused layer: its adapter key, where its output sits in the
    fused output, and how wide it is."""

    key: tuple[int, str]  # (layer index, module name), as LoraWeights keys it
    offset: int
    out_features: int


class Concatenated(nn.Module):
    """Several projections of one input, their outputs side by side: the fallback fusion
    for bases whose weights cannot be concatenated as they are (bitsandbytes NF4 / int8:
    see `fuse`). One output buffer, so the LoRA path and the callers see one layer."""

    def __init__(self, modules: list[nn.Module], outs: list[int]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.outs = outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([module(x) for module in self.parts], dim=-1)


def fuse(modules: list[nn.Module], outs: list[int]) -> nn.Module:
    """One layer computing `modules`' outputs side by side.

    Plain nn.Linear: one Linear over the concatenated weights, and the original modules'
    weights become views of it, so the model stays usable (and no weight is held twice).
    bitsandbytes bases are called one by one into one output: an NF4 weight's
    double-quantized absmax groups (256 blocks of 64) straddle the projections'
    boundaries, so the packed weights cannot be joined as they are, and re-quantizing
    would change the served weights. (int8's row-wise scales could be joined; one path
    serves both quantized kinds, as fusing measured within noise on this CPU.)
    """
    if len(modules) == 1:
        return modules[0]
    if not all(type(m) is nn.Linear for m in modules):
        return Concatenated(modules, outs)
    first = modules[0]
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(out)
         for b, out in zip(biases, outs, strict=True)])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    offset = 0
    for module, out in zip(modules, outs, strict=True):
        module.weight = nn.Parameter(weight[offset:offset + out], requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(bias[offset:offset + out], requires_grad=False)
        offset += out
    return fused


def _fused_bias(base: nn.Module, parts: list[Part]) -> torch.Tensor | None:
    """The bias of a fused layer's output, all parts side by side, as a plain tensor
    sharing the base's storage where it can (None: no part has one)."""
    biases = base.parts if isinstance(base, Concatenated) else [base]
    biases = [module.bias for module in biases]
    present = next((bias for bias in biases if bias is not None), None)
    if present is None:
        return None
    if len(biases) == 1:
        return present.detach()
    return torch.cat([bias.detach() if bias is not None else present.new_zeros(part.out_features)
                      for bias, part in zip(biases, parts, strict=True)])


class MultiLoraLinear(nn.Module):
    """`base(x) + B[s] (A[s] x)` for each token's slot s, grouped by slot; for a fused
    base, each part's delta lands in its columns of the output."""

    def __init__(self, base: nn.Module, in_features: int, parts: list[Part], slots: int,
                 max_rank: int, dtype: torch.dtype, batch: LoraBatch):
        super().__init__()
        self.base = base
        self.batch = batch
        self.parts = parts
        self.keys = [part.key for part in parts]
        self.offsets = [part.offset for part in parts]  # each part's first output column
        device = next(base.parameters()).device
        # RAM is taken slot by slot, as adapters fill them (all 16 slots of rank 64 of the
        # default model would hold 1.3 GB in float32 from start-up)
        self.a = lazy_zeros((slots, max_rank, len(parts), in_features), dtype, device)
        self.b = [lazy_zeros((slots, max_rank, part.out_features), dtype, device)
                  for part in parts]
        # per slot, each output column's scale: DoRA's m / ||W + B A||_row, or IA3's
        # vector (1 for LoRA's)
        self.scale = torch.ones(slots, sum(p.out_features for p in parts), dtype=dtype,
                                device=device)
        # per slot, IA3's input scale, on a projection that runs alone (1: none)
        self.input_scale = torch.ones(slots, in_features, dtype=dtype, device=device) \
            if len(parts) == 1 and parts[0].key[1] in IA3_INPUT_MODULES else None
        self.merged: torch.Tensor | None = None  # W + B A of the merged slot, if any
        self.merged_bias: torch.Tensor | None = None  # its bias (IA3 scales the bias too)
        self.filled: set[int] = set()  # slots whose adapter has A and B for these parts
        self.dora: set[int] = set()  # ... a DoRA adapter's
        self.ia3_outputs: set[int] = set()  # slots whose IA3 vector scales an output here
        self.ia3_inputs: set[int] = set()  # ... the input
        self.squared_norms: dict[int, torch.Tensor] = {}  # a quantized part's ||W||^2 rows
        self.output_bias = _fused_bias(base, parts)  # what DoRA's scale leaves out
        # per slot: whether scaling the output leaves the bias out (DoRA's) or not (IA3's)
        self.keeps_bias = torch.zeros(slots, 1, dtype=dtype, device=device)

    def install(self, slot: int, a: list[torch.Tensor | None],
                b: list[torch.Tensor | None],
                magnitude: list[torch.Tensor | None] | None = None,
                ia3: list[torch.Tensor | None] | None = None,
                ia3_inputs: frozenset[str] = frozenset()) -> None:
        """Copy an adapter into `slot` (zero-padded to max_rank), a and b per part (None:
        the adapter does not target that part); all None clears the slot. A DoRA
        adapter's `magnitude` m per part becomes the part's column scale m / ||W + B A||,
        computed here once, in float32 (`_norms`): serving adds one elementwise scale.
        An IA3 adapter's vector per part becomes the part's column scale, or for a module
        in `ia3_inputs`, the layer's input scale."""
        self.a[slot].zero_()
        for stack in self.b:
            stack[slot].zero_()
        self.scale[slot].fill_(1)
        self.keeps_bias[slot] = 0
        if self.input_scale is not None:
            self.input_scale[slot].fill_(1)
        for slots in (self.filled, self.dora, self.ia3_outputs, self.ia3_inputs):
            slots.discard(slot)
        for j, vector in enumerate(ia3 or []):
            if vector is not None:
                self._install_ia3(slot, j, vector, self.parts[j].key[1] in ia3_inputs)
        magnitude = magnitude or [None] * len(self.parts)
        for j, (a_j, b_j, m_j) in enumerate(zip(a, b, magnitude, strict=True)):
            if a_j is not None:
                self.filled.add(slot)
                rank = a_j.shape[0]
                self.a[slot, :rank, j].copy_(a_j)
                self.b[j][slot, :rank].copy_(b_j.T)
            if m_j is not None:
                self.dora.add(slot)
                self.keeps_bias[slot] = 1
                part = self.parts[j]
                self.scale[slot, part.offset:part.offset + part.out_features].copy_(
                    m_j.float() / self._norms(j, a_j.float(), b_j.float()))

    def _install_ia3(self, slot: int, j: int, vector: torch.Tensor, on_input: bool) -> None:
        if on_input:  # only single-part layers scale inputs (IA3_INPUT_MODULES)
            self.input_scale[slot].copy_(vector)
            self.ia3_inputs.add(slot)
        else:
            part = self.parts[j]
            self.scale[slot, part.offset:part.offset + part.out_features].copy_(vector)
            self.ia3_outputs.add(slot)

    def _norms(self, j: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||W + B A|| per output row of part j, in float32. An unquantized base reads W;
        an NF4 / int8 one is read through its own forward pass, the weights as they are
        served (bitsandbytes repacks a CPU weight on its first call, and dequantizing
        the packed form is not guaranteed to give the served values): ||W||^2 once per
        part, from the identity, and W A^T from A's rows, so that
        ||W + B A||^2 = ||W||^2 + 2 (B * W A^T) 1 + ||B A||^2. A w8a8 layer's weights
        are its int8 rows times their scales, read as such."""
        part = self.parts[j]
        span = slice(part.offset, part.offset + part.out_features)
        if type(self.base) is nn.Linear:  # unquantized, fused or not
            return torch.linalg.norm(self.base.weight[span].float() + b @ a, dim=1)
        if isinstance(self.base, W8A8Linear):
            return torch.linalg.norm(self.base.dequantized(span) + b @ a, dim=1)
        module = self.base.parts[j] if isinstance(self.base, Concatenated) else self.base
        if j not in self.squared_norms:
            eye = torch.eye(a.shape[1], device=a.device)
            self.squared_norms[j] = sum(
                (self._served(module, rows) ** 2).sum(0) for rows in eye.split(512))
        cross = (b * self._served(module, a).T).sum(1)
        squared = self.squared_norms[j] + 2 * cross + ((b @ a) ** 2).sum(1)
        return squared.clamp_min(0).sqrt()

    @staticmethod
    def _served(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x W^T as `module` computes it, without its bias, in float32."""
        dtype = getattr(module, "compute_dtype", None) or x.dtype
        with torch.no_grad():
            y = module(x.to(dtype)).float()
        return y if module.bias is None else y - module.bias.float()

    def merge(self, slot: int) -> None:
        """Serve `slot` through a merged weight (unquantized base only)."""
        if slot not in self.filled | self.ia3_outputs | self.ia3_inputs:
            return  # the adapter does not target this projection: the base serves it
        merged, bias = self.base.weight.clone(), self.base.bias
        for j, part in enumerate(self.parts):  # W + B A per part, accumulated in fp32
            rows = merged[part.offset:part.offset + part.out_features]
            rows.addmm_(self.b[j][slot].T, self.a[slot, :, j])
        if slot in self.dora or slot in self.ia3_outputs:  # m / ||W + B A|| (W + B A)
            merged.mul_(self.scale[slot].unsqueeze(1))
        if slot in self.ia3_outputs and bias is not None:  # l (W x + bias)
            bias = bias * self.scale[slot]
        if slot in self.ia3_inputs:  # W (l x)
            merged.mul_(self.input_scale[slot])
        self.merged, self.merged_bias = merged, bias

    def unmerge(self) -> None:
        """Back to the untouched base weight; exact, nothing was modified."""
        self.merged = self.merged_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in_features]
        batch = self.batch
        scaled = batch.scaled if batch.active else None
        if scaled is not None and not self.ia3_inputs.isdisjoint(batch.slot_set):
            x = self._scale_inputs(x, *scaled)
        if self.merged is not None:
            y = F.linear(x, self.merged, self.merged_bias)
        else:
            y = self.base(x)
        if batch.active and not self.filled.isdisjoint(batch.slot_set):
            self._add_deltas(y, x)
        if scaled is not None and not (self.dora.isdisjoint(batch.slot_set)
                                       and self.ia3_outputs.isdisjoint(batch.slot_set)):
            self._scale_rows(y, *scaled)  # after the deltas: DoRA scales W x + B A x
        return y

    def _add_deltas(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """Every routed token's B A x, by its slot, into y."""
        batch = self.batch
        rank = batch.rank
        if batch.segments is not None:  # decode tokens by the SGMV kernel
            self._add_delta_sgmv(y, x, batch.segments, rank)
        if batch.decode is not None:  # group g is slot g: a view of the stacks
            size = batch.decode.size
            self._add_delta(y, x, batch.decode, self.a[:size, :rank],
                            [b[:size, :rank] for b in self.b])
        if batch.chunks is not None:  # one group per prompt chunk: gather its slot
            slots = batch.chunk_slots
            self._add_delta(y, x, batch.chunks, self.a[slots, :rank],
                            [b[slots, :rank] for b in self.b])

    def _scale_rows(self, y: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        """Scaled slots' rows of y, W x + B A x + bias so far, times their column scale:
        DoRA's m / ||W + B A|| (W x + B A x) + bias (PEFT's `(g - 1) base(x) + g B A x`
        added to the base output), IA3's l (W x + bias). LoRA slots' scale is 1."""
        rows = y.index_select(0, tokens)
        scale, bias = self.scale[slots], self.output_bias
        if bias is not None:  # DoRA's rows keep their bias as it was
            rows = rows * scale + bias * (1 - scale) * self.keeps_bias[slots]
        else:
            rows = rows * scale
        y.index_copy_(0, tokens, rows.to(y.dtype))

    def _scale_inputs(self, x: torch.Tensor, tokens: torch.Tensor,
                      slots: torch.Tensor) -> torch.Tensor:
        """x with the IA3 input scale of each scaled token's slot (1 for the others'),
        as a new tensor: the caller's x feeds the residual stream."""
        x = x.clone()
        x.index_copy_(0, tokens, (x.index_select(0, tokens) * self.input_scale[slots])
                      .to(x.dtype))
        return x

    def _add_delta(self, y, x, groups: _Groups, a: torch.Tensor,
                   b: list[torch.Tensor]) -> None:
        """y[tokens, part's columns] += B_part (A_part x) for the groups' tokens. a: [size,
        rank, parts, in]; b[part]: [size, rank, out]. The shrink is one bmm over every
        part; the expand one per part."""
        size, rank, parts, _ = a.shape
        shrunk = torch.bmm(groups.pad(x, a.dtype), a.flatten(1, 2).transpose(1, 2))
        if parts > 1:  # part-major, so that each part's expand reads a contiguous batch
            shrunk = shrunk.view(size, -1, rank, parts).permute(3, 0, 1, 2).contiguous()
        else:  # (bmm loops over the batch, copying each matrix, on a strided one)
            shrunk = shrunk.unsqueeze(0)
        for j, part in enumerate(self.parts):
            groups.add(y[:, part.offset:part.offset + part.out_features],
                       torch.bmm(shrunk[j], b[j]))

    def _add_delta_sgmv(self, y, x, segments: _Segments, rank: int) -> None:
        """The same delta by the SGMV kernel: one shrink over every part (fp32 [routed,
        rank * parts], columns ordered (rank, part) as `a` is), one expand that adds
        each part's delta in place into its columns of y."""
        a = self.a[:, :rank].flatten(1, 2)  # [slots, rank * parts, in], a view
        route = segments.tokens, segments.starts, segments.slots
        shrunk = torch.ops.lorag.lora_shrink(x.to(a.dtype), a, *route)
        torch.ops.lorag.lora_expand(y, shrunk, [b[:, :rank] for b in self.b], self.offsets,
                                    *route)
