"""A tiny random-weight Llama with the real tokenizer: fast engine unit tests."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.server.engine import Engine, EngineConfig

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to build in milliseconds; float32, eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture
def adapter_root(tmp_path):
    """Four adapters for the tiny model under one adapter root."""
    specs = {f"t{i}": AdapterSpec(rank=4 * (i + 1), alpha=8, scale=0.3) for i in range(4)}
    make_adapters(tiny_model(), tmp_path, specs, seed=3)
    return tmp_path


@pytest.fixture
def make_engine(tokenizer, adapter_root):
    """Build engines on the tiny model; all are shut down after the test."""
    engines = []

    def build(start: bool = True, **limits) -> Engine:
        config = EngineConfig(**{"max_model_len": 128, "max_num_seqs": 8,
                                 "max_num_batched_tokens": 64, "max_lora_rank": 16,
                                 "max_active_adapters": 2, "adapter_roots": [adapter_root],
                                 **limits})
        engine = Engine(tiny_model(), tokenizer, config)
        engines.append(engine.start() if start else engine)
        return engine

    yield build
    for engine in engines:
        engine.shutdown()
