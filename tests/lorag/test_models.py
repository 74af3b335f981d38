"""Loading the real default base model (e2e lane): quantized footprints and answers."""

import logging
import time

import pytest
import torch

from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.server.engine.w8a8 import W8A8Linear, int8_dot_products

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy_answer(model, tokenizer, messages=QUESTION, max_new_tokens=16) -> str:
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_nf4_is_under_half_of_bf16_and_both_answer_paris(base_model_dir):
    bf16, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="bfloat16")
    nf4, _ = load_base(str(base_model_dir), quantize="nf4", dtype="bfloat16")
    bf16_bytes, nf4_bytes = bf16.get_memory_footprint(), nf4.get_memory_footprint()
    print(f"\nfootprint bf16 {bf16_bytes / 1e6:.1f} MB, nf4 {nf4_bytes / 1e6:.1f} MB")
    assert nf4_bytes < 0.5 * bf16_bytes
    assert type(nf4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert "Paris" in _greedy_answer(bf16, tokenizer)
    assert "Paris" in _greedy_answer(nf4, tokenizer)


def test_catalog_name_loads_the_converted_folder_quickly(base_model_dir):
    start = time.perf_counter()
    model, tokenizer = load_base("smollm2-135m-instruct", quantize="none", dtype="float32")
    print(f"\nreload of the converted folder (fp32, unquantized): "
          f"{time.perf_counter() - start:.2f} s")
    assert model.config.model_type == "llama" and model.dtype is torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template and tokenizer.model_max_length == 8192


def test_int8_answers_and_its_per_forward_log_line_is_filtered(base_model_dir, caplog):
    int8, tokenizer = load_base(str(base_model_dir), quantize="int8", dtype="bfloat16")
    assert type(int8.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with caplog.at_level(logging.INFO):
        assert "Paris" in _greedy_answer(int8, tokenizer)
    # bitsandbytes logs this on every forward; the logger's filter drops it at the source
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]


def test_w8a8_answers_paris_and_the_engine_computes_what_its_layers_do(base_model_dir):
    """bitsandbytes' forward pass over the w8a8 weights answers; the engine's first-token
    log-probabilities are those of the model with each projection run as the engine runs
    it (by its kernel where the CPU has int8 dot products). Float32: rounding each token's
    activations to int8 amplifies the smallest difference (an attention kernel's
    summation order flips a few roundings a step), and in bf16 that moves this 135M
    model's near-tied first tokens by up to ~0.45 nats (~0.12 in float32); wrong scales
    or parts would move them by many."""
    w8a8, tokenizer = load_base(str(base_model_dir), quantize="w8a8", dtype="float32")
    assert w8a8.model.layers[0].mlp.down_proj.state.threshold == 0.0
    assert "Paris" in _greedy_answer(w8a8, tokenizer)
    ids = tokenizer(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                  tokenize=False)).input_ids
    with Engine(w8a8, tokenizer, EngineConfig(max_model_len=256)) as engine:
        fused = type(engine.runner.projections[0]["qkv"].base) is W8A8Linear
        assert fused == int8_dot_products()  # else bitsandbytes' layers, the same math
        out = engine.submit(ids, SamplingParams(max_tokens=1, logprobs=5)).result()
    for layer in w8a8.model.layers if fused else []:  # each projection by the kernel
        for module in (*layer.self_attn.children(), *layer.mlp.children()):
            if hasattr(module, "state"):
                module.forward = W8A8Linear([module], torch.float32).forward
    with torch.inference_mode():
        logits = w8a8(torch.tensor([ids])).logits[0, -1].float()
    want = torch.log_softmax(logits, -1)
    for token, logprob in out.logprobs[0].top:
        assert logprob == pytest.approx(float(want[token]), abs=0.25)
