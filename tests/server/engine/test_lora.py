"""The grouped multi-LoRA layer against a per-token loop of `W x + B_s (A_s x)`, for the
routings a step can have: every decode token on an adapter (one contiguous run), decode
tokens without one between them, prompt chunks with and without adapters, a rank below
the slots' maximum."""

import pytest
import torch
from torch import nn

from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part, fuse

IN, OUTS, SLOTS, MAX_RANK = 24, [24, 8, 8], 6, 8


def layer_with_adapters(rank: int):
    """A fused q/k/v-shaped layer with random adapters in slots 0-4 (slot 3 targets only
    the first part), and the adapters as a dict slot -> (a, b) per part."""
    torch.manual_seed(0)
    modules = [nn.Linear(IN, out, bias=False) for out in OUTS]
    parts = [Part((0, name), sum(OUTS[:j]), out)
             for j, (name, out) in enumerate(zip(["q", "k", "v"], OUTS, strict=True))]
    batch = LoraBatch()
    layer = MultiLoraLinear(fuse(modules, OUTS), IN, parts, SLOTS, MAX_RANK, torch.float32,
                            batch)
    adapters = {}
    for slot in range(5):
        a = [torch.randn(rank, IN) for _ in OUTS]
        b = [torch.randn(out, rank) for out in OUTS]
        if slot == 3:
            a[1:], b[1:] = [None, None], [None, None]
        layer.install(slot, a, b)
        adapters[slot] = (a, b)
    return layer, batch, adapters


def reference(layer, adapters, x, slot_of_token):
    """The base output plus each token's own adapter, one token and one part at a time."""
    y = layer.base(x).clone()
    for token, slot in enumerate(slot_of_token):
        if slot < 0:
            continue
        a_parts, b_parts = adapters[slot]
        for part, a, b in zip(layer.parts, a_parts, b_parts, strict=True):
            if a is not None:
                y[token, part.offset:part.offset + part.out_features] += b @ (a @ x[token])
    return y


@pytest.mark.parametrize("rank", [MAX_RANK, 4])
@pytest.mark.parametrize("decode_slots, chunks", [
    ([2, 0, 2, 4, 1], []),  # every decode token routed: one contiguous run
    ([2, -1, 0, 2, -1, 3], []),  # tokens without an adapter between routed ones
    ([], [(0, 5, 1), (5, 9, 3)]),  # prompt chunks only
    ([0, -1, 4], [(3, 7, 1), (9, 12, 2)]),  # tokens 7-8: a chunk without an adapter
])
def test_grouped_delta_matches_a_per_token_loop(rank, decode_slots, chunks):
    layer, batch, adapters = layer_with_adapters(rank)
    tokens = max([len(decode_slots), *(end for _, end, _ in chunks)])
    x = torch.randn(tokens, IN)
    slot_of_token = [*decode_slots, *([-1] * (tokens - len(decode_slots)))]
    for start, end, slot in chunks:
        slot_of_token[start:end] = [slot] * (end - start)
    batch.route(torch.tensor(decode_slots, dtype=torch.long), chunks, rank)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, reference(layer, adapters, x, slot_of_token))


def test_merged_weight_serves_what_the_lora_path_does():
    layer, batch, _ = layer_with_adapters(MAX_RANK)
    x = torch.randn(4, IN)
    batch.route(torch.tensor([1, 1, 1, 1]), [], MAX_RANK)
    with torch.inference_mode():
        unmerged = layer(x)
        layer.merge(1)
        batch.route(torch.tensor([-1, -1, -1, -1]), [], MAX_RANK)  # merged: no LoRA path
        merged = layer(x)
    torch.testing.assert_close(merged, unmerged)
