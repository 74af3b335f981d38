"""`lorag bench load-gap`: does registering a large adapter stall the streams already running?

For each backend, starts `lorag serve` on loopback (default model), makes large adapters
(rank 64 on all seven projections: ~78 MB each in float32 for the 135M default), and
for each of them: starts streaming chats, registers the adapter over HTTP once they are
flowing, and records when every SSE event arrives. Reports, per backend, how long each
registration took (read, validate, and for vLLM its copy and add_lora) and the longest
gap between a stream's consecutive events during the registration against the gaps
outside it (p50 and max). A registration that ran on the step loop or the event loop
shows as a gap as long as itself. Prints JSON.
"""

import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lorag.adapters import TARGET_MODULES
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess
from lorag.benchmarks.stats import print_json
from lorag.client import sse_data
from lorag.models import load_base

MODEL = "smollm2-135m-instruct"
STREAMS = 2
LARGE = AdapterSpec(rank=64, alpha=64, scale=0.01, targets=TARGET_MODULES)


def stream_times(url: str, index: int, max_tokens: int, times: list[float],
                 flowing: threading.Event) -> None:
    """Read one streaming chat, appending each event's arrival time to `times`."""
    body = {"model": Path(MODEL).name, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell story number {index}."}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                      timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if sse_data(line) is not None:
                times.append(time.perf_counter())
                if len(times) == 5:
                    flowing.set()


def one_load(url: str, name: str, path: Path, max_tokens: int) -> dict:
    """Streams running, one registration among them: its time and the streams' gaps."""
    events = [[] for _ in range(STREAMS)]
    flowing = [threading.Event() for _ in range(STREAMS)]
    readers = [threading.Thread(target=stream_times, args=(url, i, max_tokens, events[i],
                                                           flowing[i])) for i in range(STREAMS)]
    for reader in readers:
        reader.start()
    for event in flowing:
        event.wait(timeout=300)
    start = time.perf_counter()
    httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
               timeout=600).raise_for_status()
    end = time.perf_counter()
    for reader in readers:
        reader.join()
    during, outside = [], []
    for times in events:
        for before, after in zip(times, times[1:], strict=False):
            (during if after > start and before < end else outside).append(after - before)
    return {"load_s": round(end - start, 3),
            "gap_max_during_load_ms": round(1000 * max(during, default=0.0), 1),
            "gap_p50_outside_ms": round(1000 * statistics.median(outside), 1),
            "gap_max_outside_ms": round(1000 * max(outside), 1)}


def measure(backend: str, root: Path, paths: dict[str, Path], folder: Path,
            max_tokens: int) -> dict:
    data = folder / f"data-{backend}"
    data.mkdir()
    daemon = DaemonProcess(data, ["--backend", backend, "--adapter-root", str(root),
                                  "--max-lora-rank", "64", "--max-model-len", "1024"],
                           data / "daemon.log", timeout=600)
    try:
        loads = [one_load(daemon.url, name, path, max_tokens) for name, path in paths.items()]
    finally:
        daemon.stop()
    return {"loads": loads,
            "load_s_max": max(load["load_s"] for load in loads),
            "gap_max_during_load_ms": max(load["gap_max_during_load_ms"] for load in loads),
            "gap_max_outside_ms": max(load["gap_max_outside_ms"] for load in loads)}


def main(loads: int = 3, max_tokens: int = 200, backends: tuple[str, ...] = ("native", "vllm"),
         json_path: Path | None = None) -> dict:
    """Measure each backend in one run and print (and optionally save) JSON."""
    folder = Path(tempfile.mkdtemp(prefix="lorag-loadgap-"))
    root = folder / "adapters"
    base, _ = load_base(MODEL, quantize="none", dtype="float32")
    paths = make_adapters(base, root, {f"large-{i}": LARGE for i in range(loads)}, seed=0)
    del base
    size = sum(file.stat().st_size for path in paths.values() for file in path.iterdir())
    result = {"workload": {"model": MODEL, "streams": STREAMS, "max_tokens": max_tokens,
                           "adapter": {"rank": LARGE.rank, "targets": list(LARGE.targets),
                                       "mb": round(size / len(paths) / 1e6, 1)}},
              **{backend: measure(backend, root, paths, folder, max_tokens)
                 for backend in backends}}
    print_json(result, json_path)
    return result
