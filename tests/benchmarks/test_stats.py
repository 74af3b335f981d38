"""The benchmarks' timing helpers."""

import time

from lorag.benchmarks.stats import interleaved_us


def test_interleaved_timing_takes_turns_and_gives_each_peer_its_median():
    order = []

    def peer(name: str, seconds: float) -> None:
        order.append(name)
        time.sleep(seconds)

    medians = interleaved_us({"slow": (peer, "slow", 0.004), "fast": (peer, "fast", 0.001)},
                             seconds=0.05)
    assert order[:6] == ["slow", "fast"] * 3  # one call of each per round
    assert len(order) >= 2 * 8  # 3 rounds to warm up, then at least 5
    assert medians["slow"] >= 4000 and medians["fast"] >= 1000  # microseconds, each its own
