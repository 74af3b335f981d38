"""`bench serving`'s runners on the tiny model: they work with few adapters and stop their
engine when they fail."""

import threading

import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.serving import run_hot_load
from lorag.errors import LoragError
from tests.tiny import tiny_model


@pytest.fixture
def adapters(tmp_path):
    specs = {f"ad{i}": AdapterSpec(rank=4, alpha=8, scale=0.1) for i in range(3)}
    return make_adapters(tiny_model(), tmp_path, specs, seed=0)


def engine_threads() -> int:
    return sum(t.name == "lorag-engine" and t.is_alive() for t in threading.enumerate())


def test_hot_load_with_fewer_adapters_than_background_streams(adapters, tokenizer):
    """Two resident adapters under four background streams (an IndexError before)."""
    resident = {name: adapters[name] for name in ("ad0", "ad1")}
    result = run_hot_load(tiny_model(), tokenizer, resident, {"ad2": adapters["ad2"]},
                          background=4)
    assert result["adapters_loaded"] == 1 and result["background_streams"] == 4
    assert result["load_to_first_token_ms_p50"] >= result["load_ms_p50"] > 0


def test_a_failing_benchmark_leaves_no_engine_running(adapters, tokenizer, tmp_path):
    before = engine_threads()
    with pytest.raises(LoragError):
        run_hot_load(tiny_model(), tokenizer, {"ad0": adapters["ad0"]},
                     {"gone": adapters["ad0"].parent / "no-such-adapter"}, background=2)
    assert engine_threads() == before
