"""IA3 served by the native engine: an adapter of scaling vectors (rank 0) rides the same
slots as LoRA, its vectors in the column scale of the projections whose output it scales
and in an input scale where it scales the input (PEFT's feedforward modules). Checked
against PEFT's own IA3 forward pass, token for token in fp32, on the tiny Llama: two IA3
adapters, a LoRA and a DoRA one and the base in ONE mixed batch, through a merge, refused
in a composition and where its input scaling would fall on the fused q/k/v matmul."""

import json

import pytest
from peft import PeftModel

from lorag.adapters import Composition
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.errors import InvalidRequest
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.server.engine.peft_reference import chat_prompts, greedy
from tests.tiny import tiny_model

MAX_NEW = 12
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?",
             "Write a haiku about rain.", "Who wrote Hamlet?"]
IA3 = {  # PEFT's default for Llama; and outputs of q and o with the inputs of up and gate
    "i0": AdapterSpec(ia3=True, targets=("k_proj", "v_proj", "down_proj"),
                      feedforward=("down_proj",), scale=0.3),
    "i1": AdapterSpec(ia3=True, targets=("q_proj", "o_proj", "gate_proj", "up_proj"),
                      feedforward=("gate_proj", "up_proj"), scale=0.3),
}
LORA = {"l0": AdapterSpec(rank=8, alpha=16, scale=0.1),
        "d0": AdapterSpec(rank=4, alpha=8, targets=("v_proj", "down_proj"), dora=True,
                          scale=0.1)}


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """An engine over the tiny model with all four adapters; PEFT references beside it
    (one PeftModel per adapter: PEFT does not mix IA3 and LoRA in one model)."""
    root = tmp_path_factory.mktemp("ia3")
    paths = make_adapters(tiny_model(), root, {**IA3, **LORA}, seed=11)
    references = {name: PeftModel.from_pretrained(tiny_model(), path).eval()
                  for name, path in paths.items()}
    config = EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                          max_lora_rank=16, max_active_adapters=6, adapter_roots=[root])
    prompts = chat_prompts(tokenizer, QUESTIONS)
    with Engine(tiny_model(), tokenizer, config) as engine:
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        yield engine, references, prompts


@pytest.mark.slow
def test_ia3_lora_dora_and_base_in_one_mixed_batch_match_peft(served):
    engine, references, prompts = served
    names = ["i0", "i1", "l0", "d0", None]
    params = SamplingParams(max_tokens=MAX_NEW)
    streams = [engine.submit(p, params, adapter=name)
               for p, name in zip(prompts, names, strict=True)]
    outputs = [s.result().token_ids for s in streams]
    for prompt, name, got in zip(prompts, names, outputs, strict=True):
        want = greedy(tiny_model().eval() if name is None else references[name], prompt,
                      MAX_NEW)
        assert got == want, f"adapter {name}"


def test_the_vectors_change_the_answer(served):
    engine, _, prompts = served
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    outputs = [engine.submit(prompts[1], params, adapter=name).result().token_ids
               for name in ("i0", "i1", None)]
    assert len({tuple(out) for out in outputs}) == 3


@pytest.mark.slow
def test_a_merged_ia3_adapter_serves_the_same_tokens(served):
    engine, references, prompts = served
    params = SamplingParams(max_tokens=MAX_NEW)
    for name in ("i0", "i1"):
        merges = engine.stats()["merges"]
        alone = [engine.submit(p, params, adapter=name).result().token_ids
                 for p in prompts[:2]]
        assert engine.stats()["merges"] > merges, f"traffic on {name} alone should merge it"
        for prompt, got in zip(prompts[:2], alone, strict=True):
            assert got == greedy(references[name], prompt, MAX_NEW), name


def test_a_composition_with_an_ia3_adapter_is_refused(served):
    engine, _, prompts = served
    with pytest.raises(InvalidRequest, match="'i0' is an IA3 adapter, which is not composed"):
        engine.submit(prompts[0], SamplingParams(max_tokens=2),
                      adapter=Composition((("i0", 0.5), ("l0", 0.5)))).result()


def test_input_scaling_on_the_fused_qkv_is_refused(served, tmp_path):
    engine, _, _ = served
    root = engine.config.adapter_roots[0]
    folder = root / "i0-on-k-input"
    folder.mkdir()
    config = json.loads((root / "i0" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(
        {**config, "feedforward_modules": ["k_proj", "down_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(
        (root / "i0" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InvalidRequest, match=r"feedforward_modules \['k_proj'\] are not "
                                             r"served: q, k and v run as one fused matmul"):
        engine.load_adapter("i0-on-k-input", str(folder))
