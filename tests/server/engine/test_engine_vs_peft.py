"""The engine's greedy outputs equal HF + PEFT's, token for token, in fp32, on the tiny
Llama with the real tokenizer (test_train_e2e.py checks a trained adapter on the real
model against PEFT the same way).

Eight adapters of different ranks, targets and scalings run in ONE mixed batch (with
chunked prefill mixing into decode steps); a weighted composition is checked against
PEFT's add_weighted_adapter(combination_type="cat"); and outputs survive an automatic
merge / unmerge cycle unchanged.
"""

import pytest
import torch

from lorag.adapters import Composition
from lorag.benchmarks.adapters import AdapterSpec
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.server.engine.peft_reference import peft_beside
from tests.tiny import tiny_model

MAX_NEW = 12
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "Say hello in Spanish.",
             "What is the boiling point of water?", "List two fruits.", "Why is the sky blue?"]
SPECS = {
    "a0": AdapterSpec(rank=8, alpha=32),
    "a1": AdapterSpec(rank=16, alpha=16, targets=("q_proj", "v_proj"), scale=0.1),
    "a2": AdapterSpec(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"), scale=0.1),
    "a3": AdapterSpec(rank=16, alpha=8, rslora=True),
    "a4": AdapterSpec(rank=8, alpha=8, targets=("o_proj", "down_proj"), scale=0.1),
    "a5": AdapterSpec(rank=12, alpha=24, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj")),
    "a6": AdapterSpec(rank=2, alpha=4, targets=("k_proj",), scale=0.2),
    "a7": AdapterSpec(rank=16, alpha=64, targets=("up_proj",)),
}


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """An engine and PEFT over two copies of the tiny model, with the same 8 adapters."""
    root = tmp_path_factory.mktemp("adapters")
    peft, paths = peft_beside(root, SPECS, seed=1)
    config = EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                          max_lora_rank=32, max_active_adapters=10, adapter_roots=[root])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=False)
               for q in QUESTIONS]
    with Engine(tiny_model(), tokenizer, config) as engine:
        for name, path in paths.items():
            assert engine.load_adapter(name, str(path)) is True
        yield engine, peft, tokenizer, prompts


def peft_greedy(peft, tokenizer, prompt: str, adapter: str | None) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
        else:
            out = peft.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False,
                                adapter_names=[adapter])
    return out[0, ids["input_ids"].shape[1]:].tolist()


def engine_prompt_ids(tokenizer, prompt):
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_mixed_batch_of_eight_adapters_matches_peft(tiny):
    engine, peft, tokenizer, prompts = tiny
    names = [*SPECS, None]  # 8 adapters and the base, all in one batch
    params = SamplingParams(max_tokens=MAX_NEW)  # stops at end-of-sequence, as HF does
    streams = [engine.submit(engine_prompt_ids(tokenizer, p), params, adapter=name)
               for p, name in zip(prompts, names, strict=True)]
    outputs = [s.result().token_ids for s in streams]
    expected = [peft_greedy(peft, tokenizer, p, name)
                for p, name in zip(prompts, names, strict=True)]
    for name, got, want in zip(names, outputs, expected, strict=True):
        assert got == want, f"adapter {name}: engine {got} != peft {want}"
    assert engine.stats()["running"] == 0 and engine.stats()["adapter_refs"] == [0] * 10


def test_every_adapter_changes_the_answer(tiny):
    engine, _, tokenizer, prompts = tiny
    ids = engine_prompt_ids(tokenizer, prompts[1])
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    streams = [engine.submit(ids, params, adapter=name) for name in [None, *SPECS]]
    outputs = [tuple(s.result().token_ids) for s in streams]
    assert len(set(outputs)) == len(outputs), f"base and all 8 adapters must differ: {outputs}"


def test_weighted_composition_matches_peft_cat(tiny):
    engine, peft, tokenizer, prompts = tiny
    peft.add_weighted_adapter(["a0", "a2"], [0.7, 1.3], "mix", combination_type="cat")
    want = peft_greedy(peft, tokenizer, prompts[0], "mix")
    stream = engine.submit(engine_prompt_ids(tokenizer, prompts[0]),
                           SamplingParams(max_tokens=MAX_NEW),
                           adapter=Composition((("a0", 0.7), ("a2", 1.3))))
    assert stream.result().token_ids == want
    assert want != peft_greedy(peft, tokenizer, prompts[0], "a0")


@pytest.mark.slow
def test_outputs_survive_an_automatic_merge_unmerge_cycle(tiny):
    engine, peft, tokenizer, prompts = tiny
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ids = [engine_prompt_ids(tokenizer, p) for p in prompts[:3]]
    before = [engine.submit(i, params, adapter="a3").result().token_ids for i in ids]
    merges = engine.stats()["merges"]
    assert merges >= 1, "homogeneous traffic on a3 should have merged it"
    # mixed traffic: a0 arrives beside a3 -> unmerge; then the same requests again
    mixed = [engine.submit(ids[0], params, adapter="a0")] + \
            [engine.submit(i, params, adapter="a3") for i in ids]
    after = [s.result().token_ids for s in mixed[1:]]
    assert engine.stats()["unmerges"] >= 1
    assert after == before
    for prompt, got in zip(prompts[:3], before, strict=True):
        want = peft_greedy(peft, tokenizer, prompt, "a3")
        assert got[:len(want)] == want



def test_other_weights_under_a_merged_name_are_served_not_the_merged_old_ones(tiny):
    """A merged weight belongs to what was in the slot, not to the name: unload a merged
    adapter, register other weights under its name (they land in the same slot), and the
    new weights serve, token for token as PEFT has them."""
    _, peft, tokenizer, prompts = tiny
    root = tiny[0].config.adapter_roots[0]
    with Engine(tiny_model(), tokenizer, EngineConfig(
            max_model_len=256, max_lora_rank=32, max_active_adapters=2,
            adapter_roots=[root])) as engine:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        ids = engine_prompt_ids(tokenizer, prompts[0])
        engine.load_adapter("moving", str(root / "a5"))
        engine.submit(ids, params, adapter="moving").result()
        assert engine.stats()["merged_adapter"] == "moving"
        slot = engine.pool.slot_of("moving")
        engine.unload_adapter("moving")
        engine.load_adapter("moving", str(root / "a6"))
        got = engine.submit(ids, params, adapter="moving").result().token_ids
        assert engine.pool.slot_of("moving") == slot
    want = peft_greedy(peft, tokenizer, prompts[0], "a6")
    assert got[:len(want)] == want