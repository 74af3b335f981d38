"""`lorag bench batch`, briefly, on the tiny model: the three ways are measured in one
run, the batch completes, and the report says how each compares with idle."""

import json

import pytest

from lorag.benchmarks.batch import main


@pytest.mark.slow
def test_a_short_batch_bench_reports_every_way(tiny_base, tmp_path):
    result = main(str(tiny_base), "none", lines=8, concurrency=2, max_tokens=8, samples=3,
                  json_path=tmp_path / "batch.json")
    ways = result["ttft"]
    assert set(ways) == {"idle", "batch", "same load, interactive"}
    assert ways["batch"]["lines"] == {"total": 8, "completed": 8, "failed": 0}
    for name in ("batch", "same load, interactive"):
        assert ways[name]["ttft_ms_p50"] > 0 and ways[name]["lines_per_s"] > 0
        assert ways[name]["ttft_p50_vs_idle"] == round(
            ways[name]["ttft_ms_p50"] / ways["idle"]["ttft_ms_p50"], 2)
    assert json.loads((tmp_path / "batch.json").read_text()) == result
