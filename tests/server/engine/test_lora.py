"""The grouped multi-LoRA layer against a per-token loop of `W x + B_s (A_s x)`, for the
routings a step can have: every decode token on an adapter (one contiguous run), decode
tokens without one between them, prompt chunks with and without adapters, long ones
(many tiles of 4 tokens, then a short one) and a decode token sharing a long chunk's
slot, a rank below the slots' maximum. Both ways of computing the deltas: the SGMV CPU kernel
(fp32, prompt chunks included where it has a GEMM path, as the engine runs it; bf16 by
AVX512-BF16 where the CPU has it) and batched matmuls. The widths leave partial vector
blocks in the kernel (44 inputs: 32 + 12, and 5 vectors of 8 + 4; 136 outputs: 128 + 8,
and 5 tiles of 24 + 16)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorag.models import cpu_has_bf16
from lorag.server.engine.kernels import kernel_takes_chunks, kernels_available
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse

IN, OUTS, SLOTS, MAX_RANK = 44, [136, 8, 8], 6, 8
PATHS = [pytest.param(True, torch.float32, id="sgmv-fp32"),
         pytest.param(True, torch.bfloat16, id="sgmv-bf16"),
         pytest.param(False, torch.float32, id="bmm-fp32"),
         pytest.param(False, torch.bfloat16, id="bmm-bf16")]


def test_the_kernels_build_here():
    """The suite must exercise the kernel, not quietly fall back to batched matmuls."""
    assert kernels_available(), "the engine's CPU kernels did not build: see the warning logged"


@pytest.mark.slow
def test_a_failed_build_is_reported_and_falls_back(tmp_path):
    """In a process of its own: this one has the kernel loaded, and a second build of
    the same op library in one process would abort it (torch registers a namespace once)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "/bin/false"}
    probe = ("from lorag.server.engine.kernels import kernels_available; "
             "print('available' if kernels_available() else 'fell back')")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fell back"
    assert "the engine's CPU kernels could not be built" in done.stderr


def layer_with_adapters(rank: int, use_kernel: bool = True, dtype=torch.float32,
                        outs: list[int] = OUTS):
    """A fused q/k/v-shaped layer (or one of `outs`' parts) with random adapters in slots
    0-4 (slot 3 targets only the first part), and the adapters as a dict slot -> (a, b)
    per part."""
    torch.manual_seed(0)
    modules = [nn.Linear(IN, out, bias=False, dtype=dtype) for out in outs]
    parts = [Part((0, name), sum(outs[:j]), out)
             for j, (name, out) in enumerate(zip(["q", "k", "v"], outs, strict=False))]
    batch = LoraBatch(use_kernel, kernel_takes_chunks(dtype))
    layer = MultiLoraLinear(fuse(modules, outs), IN, parts, SLOTS, MAX_RANK, dtype, batch)
    adapters = {}
    for slot in range(5):
        a = [torch.randn(rank, IN, dtype=dtype) for _ in outs]
        b = [torch.randn(out, rank, dtype=dtype) for out in outs]
        if slot == 3:
            a[1:] = b[1:] = [None] * (len(outs) - 1)
        layer.install(slot, a, b)
        adapters[slot] = (a, b)
    return layer, batch, adapters


def reference(layer, adapters, x, slot_of_token):
    """The base output plus each token's own adapter, one token and one part at a time,
    the delta in fp32."""
    y = layer.base(x).float()
    for token, slot in enumerate(slot_of_token):
        if slot < 0:
            continue
        a_parts, b_parts = adapters[slot]
        for part, a, b in zip(layer.parts, a_parts, b_parts, strict=True):
            if a is not None:
                y[token, part.offset:part.offset + part.out_features] += (
                    b.float() @ (a.float() @ x[token].float()))
    return y


def assert_close(got, expected):
    """Within rounding of the delta, which is ~20 here (a wrong slot or token is off by
    about that): 1e-4 in fp32; in bf16 1% (the batched-matmul path rounds `A x` to bf16
    before the expand, so near-cancelling outputs carry an error ~0.1)."""
    bf16 = got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2 if bf16 else 1.3e-6,
                               atol=0.25 if bf16 else 1e-4)


@pytest.mark.parametrize("use_kernel, dtype", PATHS)
@pytest.mark.parametrize("rank", [MAX_RANK, 4])
@pytest.mark.parametrize("decode_slots, chunks", [
    ([2, 0, 2, 4, 1], []),  # every decode token routed: one contiguous run
    ([2, -1, 0, 2, -1, 3], []),  # tokens without an adapter between routed ones
    ([1, 1, 2, 1, 1, 1, 2, 1, 1, -1, 1, 1], []),  # 9 on slot 1: tiles of 4, 4 and 1
    ([], [(0, 5, 1), (5, 9, 3)]),  # prompt chunks only
    ([0, -1, 4], [(3, 7, 1), (9, 12, 2)]),  # tokens 7-8: a chunk without an adapter
    ([], [(0, 37, 1), (37, 40, 3), (40, 57, 3)]),  # long chunks: tiles of 4, then 1
    ([1, 2, 1], [(3, 23, 1), (30, 61, 4)]),  # slot 1: 2 decode tokens + a long chunk
])
def test_grouped_delta_matches_a_per_token_loop(use_kernel, dtype, rank, decode_slots,
                                                chunks):
    layer, batch, adapters = layer_with_adapters(rank, use_kernel, dtype)
    tokens = max([len(decode_slots), *(end for _, end, _ in chunks)])
    x = torch.randn(tokens, IN, dtype=dtype)
    slot_of_token = [*decode_slots, *([-1] * (tokens - len(decode_slots)))]
    for start, end, slot in chunks:
        slot_of_token[start:end] = [slot] * (end - start)
    batch.route(torch.tensor(decode_slots, dtype=torch.long), chunks, rank)
    with torch.inference_mode():
        got = layer(x)
    if any(slot >= 0 for slot in decode_slots):  # the path asked for ran
        assert (batch.segments is not None) == use_kernel
    if chunks:  # by the kernel: fp32 ones (AVX2), bf16 ones where the CPU has AVX512-BF16
        assert (batch.chunks is None) == batch.kernel_chunks
        assert batch.kernel_chunks == (use_kernel and (dtype == torch.float32 or cpu_has_bf16()))
    assert_close(got, reference(layer, adapters, x, slot_of_token))


@pytest.mark.parametrize("use_kernel, dtype", PATHS)
def test_a_single_projection_with_a_rank_that_leaves_a_short_block(use_kernel, dtype):
    """o_proj-like: one part, rank 5, so the shrink's last block of A rows is short (3 +
    2 in float32's blocks of 3, 4 + 1 in bf16's of 4), on decode tokens and chunks."""
    layer, batch, adapters = layer_with_adapters(5, use_kernel, dtype, outs=[136])
    decode_slots, chunks = [1, 4, 1], [(3, 25, 2), (25, 30, 1)]
    x = torch.randn(30, IN, dtype=dtype)
    slot_of_token = decode_slots + [2] * 22 + [1] * 5
    batch.route(torch.tensor(decode_slots), chunks, 5)
    with torch.inference_mode():
        got = layer(x)
    assert_close(got, reference(layer, adapters, x, slot_of_token))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, inputs", [(5, 44), (24, 44), (100, 64), (24, 45)])
def test_the_shrink_is_fp32_math_on_short_and_long_segments(dtype, rows, inputs):
    """Segments of 3, 40 and 300 tokens, routed out of order from rows of x further apart
    than their width, A rows in counts that leave short blocks (5, 24, 100) and an odd
    number of inputs (45): each y row is its segment's A rows dotted with its token's
    inputs, summed in fp32."""
    assert kernels_available()  # loads the ops
    torch.manual_seed(1)
    x = torch.randn(360, inputs + 3, dtype=dtype)[:, :inputs]
    a = torch.randn(4, rows, inputs, dtype=dtype)
    tokens, starts, slots = torch.randperm(360)[:343], [0, 3, 43, 343], [2, 0, 3]
    y = torch.ops.lorag.lora_shrink(x, a, tokens, torch.tensor(starts), torch.tensor(slots))
    expected = torch.cat([x[tokens[start:end]].float() @ a[slot].float().T
                          for start, end, slot in zip(starts, starts[1:], slots, strict=False)])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_merged_weight_serves_what_the_lora_path_does(use_kernel):
    layer, batch, _ = layer_with_adapters(MAX_RANK, use_kernel)
    x = torch.randn(4, IN)
    batch.route(torch.tensor([1, 1, 1, 1]), [], MAX_RANK)
    with torch.inference_mode():
        unmerged = layer(x)
        layer.merge(1)
        batch.route(torch.tensor([-1, -1, -1, -1]), [], MAX_RANK)  # merged: no LoRA path
        merged = layer(x)
    torch.testing.assert_close(merged, unmerged)


def test_the_kernel_refuses_mismatched_inputs_by_name():
    assert kernels_available()  # loads the ops
    x, a = torch.randn(3, IN), torch.randn(2, 4, IN, dtype=torch.bfloat16)
    route = (torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="x is Float but a is BFloat16"):
        torch.ops.lorag.lora_shrink(x, a, *route)
    with pytest.raises(RuntimeError, match="starts needs one more entry than slots"):
        torch.ops.lorag.lora_shrink(x, a.float(), route[0], route[1], torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="slot 2 outside the 2 slots"):
        torch.ops.lorag.lora_shrink(x, a.float(), route[0], route[1], torch.tensor([2]))
    with pytest.raises(RuntimeError, match="token 3 outside the 3 rows"):
        torch.ops.lorag.lora_shrink(x, a.float(), torch.tensor([0, 1, 3]), *route[1:])
    y, out, b = torch.randn(3, 8), torch.zeros(3, 10), torch.randn(2, 4, 6)
    with pytest.raises(RuntimeError, match="one offset per part expected, got 2 parts and 1"):
        torch.ops.lorag.lora_expand(out, y, [b, b], [0], *route)
    with pytest.raises(RuntimeError, match=r"part 1 \(columns 6 to 12\) outside out's 10"):
        torch.ops.lorag.lora_expand(out, y, [b, b], [0, 6], *route)
    with pytest.raises(RuntimeError, match="y has 8 columns, expected rows \\* parts = 4"):
        torch.ops.lorag.lora_expand(out, y, [b], [0], *route)
