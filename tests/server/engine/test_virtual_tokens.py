"""Prompt and prefix tuning served by the native engine. A prompt-tuning adapter's virtual
tokens are embeddings run in place of tokens before the prompt (not text); a prefix-tuning
adapter's are every layer's keys and values, written once into KV blocks the adapter holds,
from which each of its requests starts. Checked against PEFT's own forward pass, token for
token in fp32 on the tiny Llama, in ONE batch with a LoRA adapter and the base; then the
prefix cache (keyed by the soft prompt's content, never shared between soft prompts), pin,
unload, a composition and a prompt too long once the virtual tokens are counted."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from lorag.adapters import Composition
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.errors import InvalidRequest, RequestFailed
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.server.engine.peft_reference import chat_prompts, greedy
from tests.tiny import tiny_model

MAX_NEW = 10
BLOCK = 16
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "Count to five."]
ADAPTERS = {  # virtual tokens shorter than a block, and over two blocks with a tail
    "p8": AdapterSpec(virtual="prompt", virtual_tokens=8, scale=0.1),
    "p37": AdapterSpec(virtual="prompt", virtual_tokens=37, scale=0.1),
    "x8": AdapterSpec(virtual="prefix", virtual_tokens=8, scale=1.0),
    "x37": AdapterSpec(virtual="prefix", virtual_tokens=37, scale=1.0),
    "l0": AdapterSpec(rank=8, alpha=16, scale=0.1),
}


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """An engine over the tiny model with every adapter; PEFT's model for each beside it."""
    root = tmp_path_factory.mktemp("virtual")
    paths = make_adapters(tiny_model(), root, ADAPTERS, seed=5)
    references = {name: PeftModel.from_pretrained(tiny_model(), path).eval()
                  for name, path in paths.items()}
    config = EngineConfig(max_model_len=192, max_num_seqs=16, max_num_batched_tokens=64,
                          max_lora_rank=16, max_active_adapters=4, kv_block_size=BLOCK,
                          adapter_roots=[root])
    prompts = chat_prompts(tokenizer, QUESTIONS)
    with Engine(tiny_model(), tokenizer, config) as engine:
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        yield engine, references, prompts


def run(engine, prompts, names, **params) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, **params)
    streams = [engine.submit(p, params, adapter=name)
               for p, name in zip(prompts, names, strict=True)]
    return [s.result().token_ids for s in streams]


@pytest.mark.slow
def test_prompt_prefix_lora_and_base_in_one_mixed_batch_match_peft(served):
    engine, references, prompts = served
    names = ["p8", "p37", "x8", "x37", "l0", None]
    want = [greedy(tiny_model() if name is None else references[name], prompt, MAX_NEW)
            for prompt, name in zip(prompts, names, strict=True)]
    assert run(engine, prompts, names) == want
    hits = engine.stats()["prefix_cache_hits"]
    # again: prompt tuning's virtual blocks (and the prompts) come from the prefix cache,
    # prefix tuning's from the blocks the adapter holds; the same tokens either way
    assert run(engine, prompts, names) == want
    assert engine.stats()["prefix_cache_hits"] > hits


def test_each_soft_prompt_changes_the_answer_and_never_shares_cached_blocks(served):
    engine, _, prompts = served
    names = ["p8", "p37", "x8", "x37", None]
    outputs = run(engine, [prompts[1]] * len(names), names, ignore_eos=True)
    assert len({tuple(out) for out in outputs}) == len(names)


def test_usage_counts_the_prompt_the_caller_sent(served):
    engine, _, prompts = served
    for name in ("p37", "x37"):
        out = engine.submit(prompts[2], SamplingParams(max_tokens=2), adapter=name).result()
        assert out.prompt_tokens == len(prompts[2]), name


def test_a_prefix_adapter_holds_its_blocks_until_unloaded(served, tmp_path):
    engine, _, prompts = served
    root = engine.config.adapter_roots[0]
    engine.load_adapter("x37-again", str(root / "x37"))
    engine.pin_adapter("x37-again")  # written now: two full blocks of its 37 tokens
    prefixes = engine.scheduler.prefixes
    held = prefixes.held["x37-again"][1]
    assert len(held) == 37 // BLOCK
    row = next(r for r in engine.list_adapters() if r["name"] == "x37-again")
    assert row["pinned"] and row["active"] and row["slot"] is None
    out = engine.submit(prompts[0], SamplingParams(max_tokens=MAX_NEW),
                        adapter="x37-again").result()
    assert prefixes.held["x37-again"][1] == held  # started from them, wrote none
    assert out.token_ids == engine.submit(prompts[0], SamplingParams(max_tokens=MAX_NEW),
                                          adapter="x37").result().token_ids
    assert all(engine.kv.refs[block] == 1 for block in held)  # the adapter's own hold
    assert engine.unpin_adapter("x37-again")
    engine.unload_adapter("x37-again")
    assert "x37-again" not in prefixes.held
    assert all(engine.kv.refs[block] == 0 for block in held)


def test_a_composition_with_a_virtual_token_adapter_is_refused(served):
    engine, _, prompts = served
    for name in ("p8", "x8"):
        with pytest.raises(InvalidRequest, match=f"'{name}' is a (prompt|prefix)-tuning "
                                                 "adapter, which is not composed"):
            engine.submit(prompts[0], SamplingParams(max_tokens=2),
                          adapter=Composition(((name, 0.5), ("l0", 0.5)))).result()


def test_the_virtual_tokens_count_against_the_context_length(served):
    engine, _, _ = served
    prompt = [1] * 155
    engine.submit(prompt, SamplingParams(max_tokens=5)).result()  # fits without them
    with pytest.raises(InvalidRequest, match="155 prompt tokens after the adapter's 37 "
                                             "virtual tokens and asks for 5 more"):
        engine.submit(prompt, SamplingParams(max_tokens=5), adapter="x37")


@pytest.mark.parametrize("change, message", [
    ("shape", r"prompt_embeddings has shape \[8, 32\], this base model needs \[8, 64\]"),
    ("extra", "a PROMPT_TUNING adapter holds one tensor, 'prompt_embeddings'"),
    ("count", "num_virtual_tokens must be an integer in 1..1024, got 0"),
    ("task", "task_type is 'SEQ_CLS'; prompt and prefix tuning are served for CAUSAL_LM"),
])
def test_broken_virtual_token_files_are_refused_by_what_is_wrong(served, change, message):
    engine, _, _ = served
    root = engine.config.adapter_roots[0]
    folder = root / f"p8-{change}"
    folder.mkdir()
    config = json.loads((root / "p8" / "adapter_config.json").read_text())
    tensors = load_file(root / "p8" / "adapter_model.safetensors")
    if change == "shape":
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :32].contiguous()
    elif change == "extra":
        tensors["extra"] = torch.zeros(2)
    elif change == "count":
        config["num_virtual_tokens"] = 0
    else:
        config["task_type"] = "SEQ_CLS"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidRequest, match=message):
        engine.load_adapter(f"p8-{change}", str(folder))
    assert f"p8-{change}" not in engine.registry


@pytest.mark.slow
def test_prefix_kv_written_through_vllms_cpu_kernel_matches_peft(tokenizer, tmp_path):
    """A head size vLLM's CPU attention runs (32), its own block layout: the prefix KV
    goes in with the kernel's write op, as computed KV does; same tokens as PEFT."""
    shape = {"hidden_size": 128, "intermediate_size": 256}
    specs = {"x40": AdapterSpec(virtual="prefix", virtual_tokens=40, scale=1.0),
             "p40": AdapterSpec(virtual="prompt", virtual_tokens=40, scale=0.1)}
    paths = make_adapters(tiny_model(**shape), tmp_path, specs, seed=7)
    prompts = [tokenizer(q)["input_ids"] for q in QUESTIONS[:4]]
    names = ["x40", "p40", None, "x40"]
    config = EngineConfig(max_model_len=192, max_num_seqs=8, max_num_batched_tokens=64,
                          adapter_roots=[tmp_path], attention_backend="vllm-cpu")
    with Engine(tiny_model(**shape), tokenizer, config) as engine:
        assert engine.runner.attention.name == "vllm-cpu"
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        got = run(engine, prompts, names)
    for prompt, name, tokens in zip(prompts, names, got, strict=True):
        reference = tiny_model(**shape) if name is None else \
            PeftModel.from_pretrained(tiny_model(**shape), paths[name]).eval()
        assert tokens == greedy(reference, prompt, MAX_NEW), name


def test_a_prefix_kv_write_that_fails_ends_its_request_alone(served, monkeypatch):
    engine, _, prompts = served
    used = engine.kv.used
    want = run(engine, prompts[:2], ["l0", None])

    def broken(blocks, kv):
        raise RuntimeError("a broken KV write")

    monkeypatch.setattr(engine.scheduler, "write_kv", broken)  # x37's tail copy
    params = SamplingParams(max_tokens=MAX_NEW)
    unseen = list(range(1000, 1040))  # no cached block holds x37's tail before it
    streams = [engine.submit(p, params, adapter=name)
               for p, name in zip([prompts[0], unseen, prompts[1]], ["l0", "x37", None],
                                  strict=True)]
    with pytest.raises(RequestFailed, match="KV cache could not be prepared for request"):
        streams[1].result()
    assert [streams[0].result().token_ids, streams[2].result().token_ids] == want
    assert engine.alive and engine.kv.used == used  # nothing leaked


def test_idle_prefixes_give_their_blocks_back_when_a_request_needs_them(tokenizer, tmp_path):
    """A KV cache of 4 blocks, two prefix adapters of 2 full blocks each: each request
    takes back the other adapter's idle blocks, and its prefix is written again, the same."""
    specs = {name: AdapterSpec(virtual="prefix", virtual_tokens=2 * BLOCK, scale=1.0)
             for name in ("a", "b")}
    paths = make_adapters(tiny_model(), tmp_path, specs, seed=9)
    config = EngineConfig(max_model_len=4 * BLOCK, max_num_seqs=2, kv_block_size=BLOCK,
                          num_kv_blocks=4, adapter_roots=[tmp_path])
    prompt = tokenizer("Name three colors.")["input_ids"]
    with Engine(tiny_model(), tokenizer, config) as engine:
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        first = {name: run(engine, [prompt], [name])[0] for name in ("a", "b")}
        assert list(engine.scheduler.prefixes.held) == ["b"]  # a's went back for b
        assert run(engine, [prompt], ["a"])[0] == first["a"]
        assert first["a"] != first["b"]
        # a pin that would leave a max_model_len request waiting for blocks forever
        with pytest.raises(InvalidRequest, match="its prefix takes 2 KV blocks and pins "
                                                 "may hold 0 more"):
            engine.pin_adapter("a")
