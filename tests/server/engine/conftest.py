"""Engines on the tiny random-weight Llama with the real tokenizer: fast unit tests."""

import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.server.engine import Engine, EngineConfig
from tests.tiny import tiny_model


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
