"""DoRA served by the native engine: each projection's magnitude scale m / ||W + B A|| is
computed once per adapter at install, and serving adds one elementwise scale to the
grouped LoRA path. Checked against PEFT's own DoRA forward pass, token for token in fp32,
on the tiny Llama: three DoRA adapters and two LoRA ones in ONE mixed batch with the base,
through a merge / unmerge cycle, refused in a composition, and on an NF4 base within a
stated tolerance."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from lorag.adapters import Composition
from lorag.benchmarks.adapters import AdapterSpec
from lorag.errors import InvalidRequest
from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.server.engine.peft_reference import chat_prompts, peft_beside
from tests.tiny import tiny_model

MAX_NEW = 12
NF4_TOLERANCE = 0.05  # nats; the base alone differs from its dequantized weights by ~0.015
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "Say hello in Spanish."]
SPECS = {
    "d0": AdapterSpec(rank=8, alpha=16, dora=True, scale=0.1),  # q/k/v fused, and o
    "d1": AdapterSpec(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"),
                      dora=True, scale=0.1),
    "d2": AdapterSpec(rank=16, alpha=16, targets=("v_proj", "o_proj"), rslora=True, dora=True,
                      scale=0.1),
    "l0": AdapterSpec(rank=8, alpha=16, scale=0.1),
    "l1": AdapterSpec(rank=4, alpha=8, targets=("up_proj",), scale=0.1),
}


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """An engine and PEFT over two copies of the tiny model, with the same 5 adapters."""
    root = tmp_path_factory.mktemp("dora")
    peft, paths = peft_beside(root, SPECS, seed=7)
    config = EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                          max_lora_rank=32, max_active_adapters=6, adapter_roots=[root])
    prompts = chat_prompts(tokenizer, QUESTIONS)
    with Engine(tiny_model(), tokenizer, config) as engine:
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        yield engine, peft, prompts


def peft_greedy(peft, prompt: list[int], adapter: str | None) -> list[int]:
    """PEFT's own forward pass with one adapter active (its DoRA layers compute the
    magnitude scale on every call)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
        else:
            peft.set_adapter(adapter)
            out = peft.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_dora_and_lora_in_one_mixed_batch_match_peft(served):
    engine, peft, prompts = served
    names = [*SPECS, None]
    params = SamplingParams(max_tokens=MAX_NEW)
    streams = [engine.submit(p, params, adapter=name)
               for p, name in zip(prompts, names, strict=True)]
    outputs = [s.result().token_ids for s in streams]
    for prompt, name, got in zip(prompts, names, outputs, strict=True):
        assert got == peft_greedy(peft, prompt, name), f"adapter {name}"


def test_the_magnitude_changes_the_answer(served, tmp_path):
    """d0 served as DoRA differs from its own A and B served as plain LoRA."""
    engine, _, prompts = served
    root = engine.config.adapter_roots[0]
    twin = root / "d0-as-lora"
    twin.mkdir()
    config = json.loads((root / "d0" / "adapter_config.json").read_text())
    (twin / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(root / "d0" / "adapter_model.safetensors")
    save_file({k: t for k, t in tensors.items() if "magnitude" not in k},
              twin / "adapter_model.safetensors")
    engine.load_adapter("d0-as-lora", str(twin))
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    outputs = [engine.submit(prompts[1], params, adapter=name).result().token_ids
               for name in ("d0", "d0-as-lora", None)]
    assert len({tuple(out) for out in outputs}) == 3


@pytest.mark.slow
def test_a_merged_dora_adapter_serves_the_same_tokens(served):
    engine, peft, prompts = served
    params = SamplingParams(max_tokens=MAX_NEW)
    merges = engine.stats()["merges"]
    alone = [engine.submit(p, params, adapter="d1").result().token_ids for p in prompts[:2]]
    assert engine.stats()["merges"] > merges, "traffic on d1 alone should have merged it"
    for prompt, got in zip(prompts[:2], alone, strict=True):
        assert got == peft_greedy(peft, prompt, "d1")


def test_a_composition_with_a_dora_adapter_is_refused(served):
    engine, _, prompts = served
    with pytest.raises(InvalidRequest, match="'d0' is a DoRA adapter, which is not composed"):
        engine.submit(prompts[0], SamplingParams(max_tokens=2),
                      adapter=Composition((("d0", 0.5), ("l0", 0.5)))).result()


@pytest.mark.slow
def test_on_an_nf4_base_dora_matches_peft_within_tolerance(tiny_base, tokenizer, served):
    """On an NF4 base the scale comes from the weights as served. The reference is PEFT's
    DoRA over the same NF4 weights dequantized before any forward pass (bitsandbytes
    repacks a CPU weight on its first call, after which its dequantize_4bit, and so
    PEFT's DoRA over the live NF4 layer, reads the packed bytes wrongly). The served NF4
    kernel differs from the dequantized weights by about 1e-3, so the likeliest first
    tokens' log-probabilities agree within NF4_TOLERANCE."""
    engine, _, prompts = served
    root = engine.config.adapter_roots[0]
    reference = load_base(str(tiny_base), quantize="nf4", dtype="float32")[0].dequantize()
    peft = PeftModel.from_pretrained(reference, root / "d0").eval()
    config = EngineConfig(max_model_len=256, max_lora_rank=32, max_active_adapters=2,
                          adapter_roots=[root])
    base = load_base(str(tiny_base), quantize="nf4", dtype="float32")[0]
    with Engine(base, tokenizer, config) as nf4:
        nf4.load_adapter("d0", str(root / "d0"))
        for prompt in prompts[:3]:
            out = nf4.submit(prompt, SamplingParams(max_tokens=1, logprobs=5),
                             adapter="d0").result()
            with torch.inference_mode():
                logits = peft(input_ids=torch.tensor([prompt])).logits[0, -1]
            want = torch.log_softmax(logits.float(), -1)
            for token, logprob in out.logprobs[0].top:
                assert logprob == pytest.approx(float(want[token]), abs=NF4_TOLERANCE)
