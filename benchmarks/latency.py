"""`lorag bench latency`: what speculative decoding does for RAG chat.

The demo's knowledge base (demo/kb) in a namespace, the demo's questions asked through a
trained format adapter (the demo's `house-style`, or `--adapter`) with server-side RAG,
greedy, streamed. Two peers in one run, each a fresh `lorag serve` with the same flags:
speculation off (`--speculative-tokens 0`) and on (`--speculative-tokens K`). Each peer
answers the questions one at a time (single-stream latency: time to first token, decode
tokens per second after it, end to end), then all of them again by `--streams` clients at
once (throughput). `--schema` asks with the demo's answer schema as response_format
(constrained decoding, which drafts within its grammar). Reported beside: whether every
answer is the same with and without speculation (greedy: it must be), and the acceptance
the daemon's vllm:spec_decode_* counters give. Prints JSON.
"""

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorag.benchmarks.daemon import DaemonProcess, register_adapters
from lorag.benchmarks.stats import print_json
from lorag.client import DaemonClient, sse_event
from lorag.models import cpu_has_bf16
from lorag.retrieval.ingest import ingest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
ADAPTER = ROOT / "demo-results" / "adapters" / "house-style"
NAMESPACE = "kestrel"
SCHEMA = json.loads((DEMO / "answer.schema.json").read_text())
SPEC = "vllm:spec_decode_num_"


def ask(http: httpx.Client, question: str, max_tokens: int, schema: bool = False) -> dict:
    """One streamed RAG chat (with the demo's answer schema as its response_format, if
    `schema`): its text, tokens, and when its first and last token came."""
    body = {"model": "house-style", "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "rag": {"namespace": NAMESPACE, "top_k": 3},
            "messages": [{"role": "user", "content": question}]}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": SCHEMA, "strict": True}}
    start, first, text, tokens = time.perf_counter(), None, [], 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            chunk = sse_event(line)
            if chunk is None:
                continue
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    end = time.perf_counter()
    first = first or end
    return {"text": "".join(text), "tokens": tokens, "ttft_s": first - start,
            "e2e_s": end - start,
            "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


def spec_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {family.name.removeprefix(SPEC): family.samples[0].value
            for family in text_string_to_metric_families(text)
            if family.name.startswith(SPEC) and "per_pos" not in family.name}


def concurrent(url: str, questions: list[str], streams: int, max_tokens: int,
               schema: bool) -> dict:
    """Every question once, by `streams` clients at a time: tokens per second overall."""
    pending, lock, tokens = list(questions), threading.Lock(), []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not pending:
                        return
                    question = pending.pop()
                tokens.append(ask(http, question, max_tokens, schema)["tokens"])

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"streams": streams, "tok_s": round(sum(tokens) / wall, 1), "wall_s": round(wall, 1)}


def peer(folder: Path, flags: list[str], adapter: Path, questions: list[str],
         streams: int, max_tokens: int, schema: bool) -> dict:
    daemon = DaemonProcess(folder / "data", [*flags, "--adapter-root", str(adapter.parent)],
                           folder / "daemon.log")
    try:
        ingest(DaemonClient(daemon.url), NAMESPACE, [DEMO / "kb"])
        register_adapters(daemon.url, {"house-style": adapter})
        with httpx.Client(base_url=daemon.url, timeout=600) as http:
            ask(http, questions[0], 8)  # warm-up
            before = spec_counts(daemon.url)
            answers = [ask(http, question, max_tokens, schema) for question in questions]
            after = spec_counts(daemon.url)
        loaded = concurrent(daemon.url, questions, streams, max_tokens, schema)
    finally:
        daemon.stop()
    drafted = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
    accepted = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    rates = [a["decode_tok_s"] for a in answers if a["decode_tok_s"]]
    return {"single_stream": {
                "decode_tok_s_p50": round(statistics.median(rates), 1),
                "e2e_ms_p50": round(1000 * statistics.median(a["e2e_s"] for a in answers)),
                "ttft_ms_p50": round(1000 * statistics.median(a["ttft_s"] for a in answers)),
                "tokens_mean": round(statistics.mean(a["tokens"] for a in answers), 1),
                "draft_tokens": int(drafted), "accepted_tokens": int(accepted),
                "acceptance": round(accepted / drafted, 3) if drafted else None},
            "concurrent": loaded, "answers": [a["text"] for a in answers]}


def main(adapter: Path, tokens: int, questions: int, streams: int, max_tokens: int,
         quantize: str, dtype: str, json_path: Path | None, schema: bool = False) -> dict:
    asked = [json.loads(line)["question"] for line in
             (DEMO / "questions.jsonl").read_text().splitlines()][:questions]
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-latency-"))
    flags = ["--quantize", quantize, "--dtype", dtype]
    peers = {}
    for name, k in (("speculation off", 0), (f"speculation on (k={tokens})", tokens)):
        (folder / name).mkdir()
        peers[name] = peer(folder / name, [*flags, "--speculative-tokens", str(k)], adapter,
                           asked, streams, max_tokens, schema)
    off, on = peers.values()
    same = sum(a == b for a, b in zip(off.pop("answers"), on.pop("answers"), strict=True))
    result = {
        "machine": {"cpu_bf16": cpu_has_bf16()},
        "workload": {"adapter": str(adapter), "questions": len(asked), "rag_top_k": 3,
                     "max_tokens": max_tokens, "quantize": quantize, "dtype": dtype,
                     "concurrent_streams": streams,
                     "response_format": "demo/answer.schema.json" if schema else None},
        "peers": peers,
        "identical_greedy_answers": f"{same}/{len(asked)}",
        "speedup": {
            "decode_tok_s": round(on["single_stream"]["decode_tok_s_p50"]
                                  / off["single_stream"]["decode_tok_s_p50"], 2),
            "e2e_p50": round(off["single_stream"]["e2e_ms_p50"]
                             / on["single_stream"]["e2e_ms_p50"], 2),
            "concurrent_tok_s": round(on["concurrent"]["tok_s"] / off["concurrent"]["tok_s"],
                                      2)}}
    print_json(result, json_path)
    return result
