"""The `w8a8` base: the kernel's per-token int8 products against the same math in float32,
the engine's fused layer against bitsandbytes' own int8 forward pass, DoRA's norms read
from the served weights, and a sequence's tokens independent of the batch it runs in."""

import pytest
import torch

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.server.engine.kernels import kernels_available
from lorag.server.engine.lora import LoraBatch, MultiLoraLinear, Part
from lorag.server.engine.w8a8 import W8A8Linear, int8_dot_products, w8a8_modules


@pytest.fixture(autouse=True)
def kernels():
    assert kernels_available(), "the engine's CPU kernels did not build: see the warning logged"


def reference(x: torch.Tensor, weight: torch.Tensor, col_scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """Per-token int8 activations times int8 weights, in float32."""
    absmax = x.float().abs().amax(1, keepdim=True)
    # 127 / absmax rounded once, as the kernel's (torch's `127 / t` is 127 * (1 / t))
    inverse = torch.full_like(absmax, 127) / absmax
    q = torch.where(absmax > 0, torch.round(x.float() * inverse), 0)
    y = (q @ weight.float().T) * (absmax / 127) * col_scale
    return y if bias is None else y + bias.float()


def int8_weight(out: int, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(out, inputs)
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_the_kernel_computes_per_token_int8_products(dtype, tokens):
    torch.manual_seed(tokens)
    weight, scale = int8_weight(100, 72)  # widths that are not multiples of 16
    bias = torch.randn(100).to(dtype)
    wide = torch.randn(tokens, 90).to(dtype)
    x = wide[:, 5:77]  # rows strided, as a view of a wider tensor
    x[0] = 0  # a row of zeros: its output is the bias
    for b in (None, bias):
        got = torch.ops.lorag.w8a8_linear(x, weight, scale, b)
        want = reference(x, weight, scale, b)
        assert got.dtype == dtype and got.shape == (tokens, 100)
        # float32: summation order only; bf16: the output's rounding
        tolerance = 1e-4 if dtype is torch.float32 else 8e-3
        torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    assert torch.ops.lorag.w8a8_linear(x[:0], weight, scale, None).shape == (0, 100)


def test_a_row_that_is_not_finite_gives_nan_in_that_row_alone():
    weight, scale = int8_weight(32, 48)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    clean = torch.ops.lorag.w8a8_linear(x, weight, scale, None)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    y = torch.ops.lorag.w8a8_linear(x, weight, scale, None)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[[0, 3]], clean[[0, 3]])


def test_the_kernel_names_what_it_refuses():
    weight, scale = int8_weight(8, 16)
    with pytest.raises(RuntimeError, match="weight must be contiguous int8"):
        torch.ops.lorag.w8a8_linear(torch.randn(2, 12), weight, scale, None)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.lorag.w8a8_linear(torch.randn(2, 16, dtype=torch.float64), weight, scale,
                                    None)


@pytest.fixture(scope="module")
def w8a8_base(tiny_base):
    return load_base(str(tiny_base), quantize="w8a8", dtype="float32")[0]


def test_the_fused_layer_matches_bitsandbytes_and_leaves_the_model_working(tiny_base):
    model = load_base(str(tiny_base), quantize="w8a8", dtype="float32")[0]
    attention = model.model.layers[0].self_attn
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    assert w8a8_modules(parts) == int8_dot_products()
    ids = torch.tensor([[1, 400, 2100, 77, 9]])
    torch.manual_seed(0)
    x = torch.randn(9, parts[0].in_features)
    with torch.inference_mode():
        before = model(ids).logits
        bnb = torch.cat([p(x) for p in parts], dim=-1)  # its first call moves its scales
        layer = W8A8Linear(parts, torch.float32)
        fused = layer(x)
        after = model(ids).logits
    # bitsandbytes' int8 weights and row scales, per-token int8 activations
    torch.testing.assert_close(fused, reference(x, layer.weight, layer.col_scale, None),
                               rtol=1e-5, atol=1e-5)
    # bitsandbytes quantizes the activations in float16 on CPU, so its rounding of some of
    # them differs by one step (outputs of ~0.7: wrong scales or parts would be ~0.5 off)
    difference = (fused - bnb.float()).abs()
    assert difference.max() < 0.02 and difference.mean() < 3e-3
    assert torch.equal(before, after)  # the modules read views of the fused weight
    start = layer.weight.data_ptr()
    assert [p.weight.data_ptr() - start for p in parts] == [0, 64 * 64, 64 * 64 + 32 * 64]
    # int8 with its outlier threshold is not w8a8
    int8 = load_base(str(tiny_base), quantize="int8", dtype="float32")[0]
    assert not w8a8_modules([int8.model.layers[0].self_attn.q_proj])


def test_dora_norms_on_a_w8a8_layer_are_those_of_the_served_weights(w8a8_base):
    attention = w8a8_base.model.layers[1].self_attn
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    served = torch.cat([p.weight.data.float() * (p.weight.SCB if p.weight.SCB is not None
                                                 else p.state.SCB)[:, None] / 127
                        for p in parts])
    layer = MultiLoraLinear(W8A8Linear(parts, torch.float32), 64,
                            [Part((1, "q_proj"), 0, 64), Part((1, "k_proj"), 64, 32),
                             Part((1, "v_proj"), 96, 32)], 2, 8, torch.float32,
                            LoraBatch(True, True))
    torch.manual_seed(0)
    a, b = torch.randn(8, 64) * 0.1, torch.randn(32, 8) * 0.1
    want = torch.linalg.norm(served[64:96] + b @ a, dim=1)
    torch.testing.assert_close(layer._norms(1, a, b), want, rtol=1e-4, atol=1e-4)


def test_a_sequence_gives_the_same_tokens_alone_and_in_any_batch(w8a8_base, tokenizer,
                                                                 tmp_path):
    """Each token's activations have their own scale and the products are exact integer
    sums, so neither the batch nor speculative drafts change what a sequence says."""
    make_adapters(w8a8_base, tmp_path, {"a": AdapterSpec(rank=8, scale=0.3)}, seed=1)
    prompts = [tokenizer.encode(text) for text in
               ("The capital of France is", "Count with me: one two three one two three",
                "A B C D A B C D A B C", "Rain falls on")]
    params = SamplingParams(max_tokens=16, temperature=0)
    adapters = [None, "a", None, "a"]

    def run(speculative: int) -> list[list[int]]:
        config = EngineConfig(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                              max_lora_rank=8, max_active_adapters=2, adapter_roots=[tmp_path],
                              speculative_tokens=speculative)
        with Engine(w8a8_base, tokenizer, config) as engine:
            engine.load_adapter("a", str(tmp_path / "a"))
            layer = engine.runner.projections[0]["o"]
            # without int8 dot products, bitsandbytes' own layer (the same math)
            assert (type(getattr(layer, "base", layer)) is W8A8Linear) == int8_dot_products()
            alone = [engine.generate([p], params, adapters=[a])[0].token_ids
                     for p, a in zip(prompts, adapters, strict=True)]
            together = [out.token_ids for out in engine.generate(prompts, params, adapters)]
        assert together == alone
        return alone

    assert run(0) == run(4)
