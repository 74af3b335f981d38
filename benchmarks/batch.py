"""`lorag bench batch`: what a running batch costs interactive users.

Starts `lorag serve` on loopback (the default model, NF4, or `--model`) and measures the
time to first token of interactive chat requests, one at a time, streamed, three ways in
one run:

- `idle`: nothing else on the daemon;
- `batch`: while a Batch API batch runs (`--lines` chat lines, `--batch-concurrency` of
  them at a time, at the engine's batch priority);
- `same load, interactive`: while the same lines are sent as ordinary requests by as many
  concurrent clients: the load the batch adds, without its priority (the peer).

Each way also reports the lines' throughput. Prints JSON (and writes it with --json).
"""

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lorag.benchmarks.daemon import DaemonProcess
from lorag.benchmarks.stats import print_json, ttft_ms
from lorag.client import sse_data
from lorag.models import cpu_has_bf16

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["Name a colour.", "What is tea?", "Describe the sea in a sentence.",
             "Say hello in French.", "What is rain?", "Name a city in Spain."]


def line(i: int, max_tokens: int) -> dict:
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                     "ignore_eos": True, "messages": [
                         {"role": "user", "content": f"{QUESTIONS[i % 6]} ({i})"}]}}


def first_token_s(http: httpx.Client, url: str, question: str) -> float:
    """Seconds to the first content of a streamed chat."""
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": question}]}
    start = time.perf_counter()
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for text in response.iter_lines():
            data = sse_data(text)
            if data and data != "[DONE]" and json.loads(data)["choices"] and \
                    json.loads(data)["choices"][0]["delta"].get("content"):
                return time.perf_counter() - start
    return time.perf_counter() - start


def interactive(http: httpx.Client, url: str, count: int) -> list[float]:
    return [first_token_s(http, url, f"{QUESTIONS[i % 6]} [{i}]") for i in range(count)]


def run_batch(http: httpx.Client, url: str, lines: list[dict]) -> str:
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = http.post(f"{url}/v1/files", files={"file": ("b.jsonl", content)},
                       data={"purpose": "batch"}).json()
    return http.post(f"{url}/v1/batches", json={
        "input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json()["id"]


def batch_state(http: httpx.Client, url: str, batch_id: str) -> dict:
    return http.get(f"{url}/v1/batches/{batch_id}").json()


def main(model: str, quantize: str, lines: int, concurrency: int, max_tokens: int,
         samples: int, json_path: Path | None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-batch-"))
    daemon = DaemonProcess(folder / "data", [
        "--model", model, "--quantize", quantize, "--served-model-name", MODEL,
        "--batch-concurrency", str(concurrency)], folder / "daemon.log")
    work = [line(i, max_tokens) for i in range(lines)]
    try:
        with httpx.Client(timeout=600) as http:
            url = daemon.url
            interactive(http, url, 2)  # warm-up
            idle = interactive(http, url, samples)

            started = time.perf_counter()
            batch_id = run_batch(http, url, work)
            while batch_state(http, url, batch_id)["request_counts"]["completed"] < 1:
                time.sleep(0.2)
            during = interactive(http, url, samples)
            while (state := batch_state(http, url, batch_id))["status"] != "completed":
                time.sleep(0.5)
            batch_s = time.perf_counter() - started

            # the peer: the same lines as interactive requests, `concurrency` at a time
            pending, lock = list(work), threading.Lock()

            def client() -> None:
                with httpx.Client(timeout=600) as own:
                    while True:
                        with lock:
                            if not pending:
                                return
                            item = pending.pop()
                        own.post(f"{url}/v1/chat/completions", json=item["body"])

            started = time.perf_counter()
            clients = [threading.Thread(target=client) for _ in range(concurrency)]
            for thread in clients:
                thread.start()
            time.sleep(1.0)
            direct = interactive(http, url, samples)
            for thread in clients:
                thread.join()
            direct_s = time.perf_counter() - started
    finally:
        daemon.stop()
    base = ttft_ms(idle)["ttft_ms_p50"]
    ways = {"idle": ttft_ms(idle),
            "batch": {**ttft_ms(during), "lines_per_s": round(lines / batch_s, 2),
                      "lines": state["request_counts"]},
            "same load, interactive": {**ttft_ms(direct),
                                       "lines_per_s": round(lines / direct_s, 2)}}
    for name in ("batch", "same load, interactive"):
        ways[name]["ttft_p50_vs_idle"] = round(ways[name]["ttft_ms_p50"] / base, 2)
    result = {"machine": {"cpu_bf16": cpu_has_bf16()},
              "workload": {"model": model, "quantize": quantize, "lines": lines,
                           "batch_concurrency": concurrency, "line_max_tokens": max_tokens,
                           "interactive_samples": samples},
              "ttft": ways}
    print_json(result, json_path)
    return result
