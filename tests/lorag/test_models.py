"""Loading the real default base model (e2e lane): quantized footprints and answers."""

import logging
import time

import pytest
import torch

from lorag.models import load_base

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
