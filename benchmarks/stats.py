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
    after 3 to warm up."""
    for _ in range(3):
        fn(*args)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1e6, 1)
