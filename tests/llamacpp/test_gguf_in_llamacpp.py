"""`lorag export --gguf`, checked by llama.cpp itself: its server, with the base model as
GGUF (converted by llama.cpp's own script) and an exported adapter preloaded, answers as
lorag's engine does. Runs in `make test-llamacpp`, after `make bench-setup` has built
llama-server (minutes of compiling: not in `make test`)."""

import httpx
import pytest
import torch

from lorag import catalog
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.llamacpp import LlamaCpp, LlamaServer, completion_body
from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.trainer.gguf import export_gguf

pytestmark = [pytest.mark.llamacpp, pytest.mark.e2e]

MODEL = catalog.DEFAULT_BASE_MODEL
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.",
             "List three uses of a paperclip.", "How do plants make food?"]
TOKENS = 16


@pytest.fixture(scope="module")
def llama() -> LlamaCpp:
    llama = LlamaCpp()
    missing = llama.missing(MODEL)
    if missing:
        pytest.fail(missing)
    return llama


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model, _ = load_base(MODEL, quantize="none", dtype="float32")
    root = tmp_path_factory.mktemp("gguf-check")
    spec = AdapterSpec(rank=16, alpha=32, targets=ALL, scale=0.03)
    return make_adapters(model, root, {"style": spec}, seed=11)["style"]


@pytest.fixture(scope="module")
def lorag_tokens(adapter, prompts) -> dict[str | None, list[list[int]]]:
    """Greedy tokens from lorag's engine in float32, base alone and with the adapter."""
    model, tokenizer = load_base(MODEL, quantize="none", dtype="float32")
    config = EngineConfig(max_model_len=256, adapter_roots=[adapter.parent])
    params = SamplingParams(max_tokens=TOKENS)
    with Engine(model, tokenizer, config).start() as engine:
        engine.load_adapter("style", str(adapter))
        return {name: [engine.submit(ids, params, adapter=name).result().token_ids
                       for ids in prompts] for name in (None, "style")}


def llamacpp_tokens(llama, fmt, base_model_dir, adapter, prompts, tmp_path) -> dict:
    lora = export_gguf(adapter, base_model_dir, tmp_path / f"style-{fmt}.gguf",
                       "float32" if fmt == "f32" else "float16")
    with LlamaServer(llama, llama.model(MODEL, fmt), [lora], parallel=1, slot_tokens=256,
                     threads=torch.get_num_threads(), log=tmp_path / "server.log") as server:
        def run(index):
            return [httpx.post(f"{server.url}/completion", timeout=120,
                               json=completion_body(ids, TOKENS, index, 1, ignore_eos=False)
                               ).json()["tokens"]
                    for ids in prompts]

        return {None: run(None), "style": run(0)}


@pytest.mark.parametrize("fmt", ["f32", "f16"])
def test_llamacpp_gives_lorags_greedy_tokens(llama, base_model_dir, adapter, prompts,
                                             lorag_tokens, fmt, tmp_path):
    """Base and adapter both as GGUF in `fmt`, against lorag's engine in float32: the
    same greedy tokens, up to 16 or the end of the answer. In f16 a near tie between two
    tokens could flip after rounding; for these prompts none does."""
    theirs = llamacpp_tokens(llama, fmt, base_model_dir, adapter, prompts, tmp_path)
    assert lorag_tokens["style"] != lorag_tokens[None]  # the adapter changes the answers
    assert theirs[None] == lorag_tokens[None]
    assert theirs["style"] == lorag_tokens["style"]
