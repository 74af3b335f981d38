"""The figures every serving benchmark reports, computed one way, and how a benchmark
hands its result over."""

import json
import statistics
import time
from pathlib import Path


def ttft_ms(ttfts: list[float]) -> dict:
    """Time to first token, p50 and p99 in ms, of `ttfts` (seconds); the p99 is the
    nearest-rank one (with under 100 samples, the largest)."""
    ordered = sorted(ttfts)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"ttft_ms_p50": round(1000 * statistics.median(ordered), 1),
            "ttft_ms_p99": round(1000 * p99, 1)}


def summary(tokens: int, wall: float, ttfts: list[float]) -> dict:
    """Generated tokens per second over the wall time, the wall time, and `ttft_ms`."""
    return {"tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
            **ttft_ms(ttfts)}


def print_json(result: dict, json_path: Path | str | None = None) -> None:
    """Print `result` as indented JSON, and write it to `json_path` too if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")


def median_us(fn, *args, seconds: float = 0.5) -> float:
    """Median microseconds of `fn(*args)` over about `seconds` of calls (at least 5),
    after 3 to warm up: `interleaved_us` of one call."""
    return interleaved_us({"call": (fn, *args)}, seconds)["call"]


def interleaved_us(calls: dict[str, tuple], seconds: float = 1.0) -> dict[str, float]:
    """Median microseconds of each of `calls` (name -> (fn, *args)), timed in turns, one
    call of each per round, over about `seconds` in all (at least 5 rounds) after 3 rounds
    to warm up: a machine whose speed drifts (a neighbour on the host) moves every peer
    alike, so their ratios hold where timing one after another would not."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds, deadline = 0, None
    while deadline is None or time.perf_counter() < deadline or rounds < 8:
        for name, (fn, *args) in calls.items():
            start = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - start)
        rounds += 1
        if rounds == 3:  # warm-up done
            times = {name: [] for name in calls}
            deadline = time.perf_counter() + seconds
    return {name: round(sorted(t)[len(t) // 2] * 1e6, 1) for name, t in times.items()}
