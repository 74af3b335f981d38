"""`lorag bench soak`, briefly, on the tiny model: every kind of request in the mix
(bad ones included) ends as it should, the daemon's process is sampled, and the verdict
is computed from the samples. The 30-minute figures are in docs/isolation.md."""

import pytest

from lorag.benchmarks.soak import main, slope, verdict

pytestmark = pytest.mark.fuzz


def test_a_short_soak_has_no_failure_but_the_deliberate_ones(tiny_base, tmp_path):
    result = main(minutes=0.25, rate=8, sample_seconds=5, warmup_minutes=0.05,
                  model=str(tiny_base), quantize="none", json_path=tmp_path / "soak.json")
    kinds = {key.split(":")[0] for key in result["outcomes"]}
    assert kinds == {"chat", "stream", "dropped", "rag", "structured", "composition",
                     "adapter_churn", "document_churn", "bad"}, result["outcomes"]
    assert result["verdict"]["failures"] == {}, result["outcomes"]
    assert len(result["samples"]) >= 3 and result["samples"][0]["anon_mb"] > 0
    assert result["after"]["running"] == result["after"]["waiting"] == 0


def test_the_verdict_reads_growth_and_counts():
    samples = [{"minute": m, "anon_mb": 100 + 2 * m, "fds": 20, "threads": 9,
                "metrics_bytes": 1000} for m in range(10)]
    result = verdict(samples, {"chat:ok": 5, "bad:ok": 2}, warmup_minutes=4)
    assert result["anon_mb_slope_per_minute"] == 2.0
    assert result["anon_growth_pct"] == round(100 * 10 / 108, 2)  # 108 -> 118 MB: over 5%
    assert not result["holds"]
    leaky = verdict([{**s, "anon_mb": 100} for s in samples], {"chat:unexpected_500": 1}, 4)
    assert leaky["failures"] == {"chat:unexpected_500": 1} and not leaky["holds"]
    assert slope([(0, 1.0)]) == 0.0
