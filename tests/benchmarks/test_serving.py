"""`bench serving`'s runners on the tiny model: they work with few adapters and stop their
engine when they fail."""

import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.roofline import matmul_roofline, workload_flops
from lorag.benchmarks.serving import median_run, run_hot_load
from lorag.errors import LoragError
from tests.tiny import tiny_model


@pytest.fixture
def adapters(tmp_path):
    specs = {f"ad{i}": AdapterSpec(rank=4, alpha=8, scale=0.1) for i in range(3)}
    return make_adapters(tiny_model(), tmp_path, specs, seed=0)


def engine_threads() -> int:
    return sum(t.name == "lorag-engine" and t.is_alive() for t in threading.enumerate())


@pytest.mark.slow
def test_hot_load_with_fewer_adapters_than_background_streams(adapters, tokenizer):
    """Two resident adapters under four background streams (an IndexError before)."""
    resident = {name: adapters[name] for name in ("ad0", "ad1")}
    result = run_hot_load(tiny_model(), tokenizer, resident, {"ad2": adapters["ad2"]},
                          background=4)
    assert result["adapters_loaded"] == 1 and result["background_streams"] == 4
    assert result["load_to_first_token_ms_p50"] >= result["load_ms_p50"] > 0


@pytest.mark.slow
def test_a_failing_benchmark_leaves_no_engine_running(adapters, tokenizer, tmp_path):
    before = engine_threads()
    with pytest.raises(LoragError):
        run_hot_load(tiny_model(), tokenizer, {"ad0": adapters["ad0"]},
                     {"gone": adapters["ad0"].parent / "no-such-adapter"}, background=2)
    assert engine_threads() == before


@pytest.mark.slow
def test_the_roofline_counts_the_flops_a_forward_pass_does():
    """workload_flops against torch's own FLOP counter over real prefill and decode steps
    (the linear layers' mm/addmm; attention's matmuls are not part of the roofline)."""
    model = tiny_model()
    jobs, max_new = [([5, 6, 7, 8, 9], "a"), ([10, 11], None)], 3
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for ids, _ in jobs:
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            for _ in range(max_new - 1):
                out = model(torch.tensor([[1]]), past_key_values=out.past_key_values,
                            use_cache=True, logits_to_keep=1)
    counts = counter.get_flop_counts()["Global"]
    linear = sum(count for op, count in counts.items()
                 if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    assert linear > 0 and workload_flops(model, jobs, max_new) == linear
    roofline = matmul_roofline(model, jobs, max_new, rows=8)
    assert roofline["tokens_per_s"] > 0 and roofline["matmul_gflop_per_s"] > 0


def test_an_engine_row_is_its_median_run_with_every_run_listed():
    rows = [{"tokens_per_s": 300.0, "wall_s": 1.0}, {"tokens_per_s": 280.0, "wall_s": 2.0},
            {"tokens_per_s": 310.0, "wall_s": 3.0}]
    assert median_run(rows) == {"tokens_per_s": 300.0, "wall_s": 1.0,
                                "runs_tokens_per_s": [300.0, 280.0, 310.0]}
    assert median_run(rows[:2])["tokens_per_s"] == 280.0  # the slower of the middle two
    assert median_run(rows[:1]) == rows[0]  # one run: as measured
