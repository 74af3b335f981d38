"""`lorag bench rag`: RAG chat through the daemon, prefix caching on against off.

One workload for both runs: a namespace of D product notes (about 150 tokens each, one
chunk), Q questions sent by C clients at a time (a closed loop, as users wait for their
answers). A hot set of H notes draws most questions (`hot_share`); each note belongs to
one of A adapters (note i to adapter i mod A), as a tenant's assistant answers about its
own documents, and a question goes through its note's adapter. Questions come in four
phrasings per note. Server-side RAG puts the retrieved passages into the system message
ahead of the question (docs/engine.md: "RAG prompts are laid out to share a prefix"), so two
questions that retrieve the same passages under the same adapter share every full KV
block up to the question.

Each peer runs on a fresh `lorag serve` (float32 unless told: docs/engine.md's figures come
from a CPU without fast bf16) with `kv_blocks` KV blocks: a cache of a few prompts' worth
thrashes, since the hot prompts alone need their blocks kept (measured: the default 512
blocks, 17 cached prompts here, saved 24.5% of the prompt tokens). Reported: generated
tokens/s and requests/s over the wall time, time to first token p50 / p99
(from each request's send), and the prompt tokens the prefix cache served (read from
/metrics, vllm:prefix_cache_*). Prints JSON.
"""

import asyncio
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess, register_adapters
from lorag.benchmarks.progress import BenchProgress, Report, Tracker
from lorag.benchmarks.stats import ttft_ms
from lorag.client import sse_event
from lorag.models import load_base
from lorag.retrieval import RAG_TOP_K

MODEL = "smollm2-135m-instruct"
NAMESPACE = "products"
COLORS = ["red", "blue", "green", "silver", "black", "white", "amber", "violet"]
THINGS = ["kettle", "lamp", "drill", "router", "speaker", "camera", "heater", "scanner"]
CITIES = ["Lyon", "Osaka", "Quito", "Tartu", "Perth", "Accra", "Bergen", "Cusco"]
PHRASINGS = ["How long does the battery of model {code} last?",
             "How much does model {code} weigh?",
             "Where does model {code} ship from?",
             "Which extension reaches support for model {code}?"]


@dataclass(frozen=True)
class RagWorkload:
    """What both daemons are given: the namespace, the questions and the engine's sizes."""

    adapters: int = 16
    documents: int = 200
    questions: int = 400
    hot: int = 20  # notes that draw `hot_share` of the questions
    hot_share: float = 0.8
    clients: int = 8
    max_tokens: int = 16
    top_k: int = RAG_TOP_K
    model: str = MODEL
    dtype: str = "float32"
    kv_blocks: int = 2048
    max_num_batched_tokens: int = 512


def notes(count: int, seed: int = 0) -> list[dict]:
    """`count` product notes with distinct facts, as documents for the namespace."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        code = f"{rng.choice('KLMNPRSTVX')}{rng.choice('AEIOU')}-{1000 + i}"
        color, thing, city = rng.choice(COLORS), rng.choice(THINGS), rng.choice(CITIES)
        text = (f"Product note for model {code}, the {color} {thing}. Model {code} ships "
                f"from the {city} warehouse within {rng.randint(2, 9)} working days. Its "
                f"battery lasts {rng.randint(4, 40)} hours on a full charge, and the "
                f"charger takes {rng.randint(1, 5)} hours. The {thing} weighs "
                f"{rng.randint(200, 4000)} grams and measures {rng.randint(10, 60)} by "
                f"{rng.randint(10, 60)} centimetres. Support for model {code} is reached "
                f"at extension {rng.randint(100, 999)}, on weekdays from "
                f"{rng.randint(7, 10)} to {rng.randint(16, 20)} o'clock. The warranty "
                f"covers {rng.randint(1, 5)} years of normal use and excludes water damage. "
                f"Spare parts for the {color} {thing} are listed under code {code}-SP.")
        out.append({"id": f"note-{i}", "text": text, "metadata": {"code": code}})
    return out


def questions(documents: list[dict], count: int, hot: int, hot_share: float,
              adapters: int, seed: int = 1) -> list[tuple[str, str]]:
    """(question, adapter) pairs: a share `hot_share` about the first `hot` notes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        index = rng.randrange(hot) if rng.random() < hot_share else \
            rng.randrange(hot, len(documents))
        code = documents[index]["metadata"]["code"]
        out.append((rng.choice(PHRASINGS).format(code=code), f"ad{index % adapters}"))
    return out


def prefix_counters(url: str) -> dict[str, float]:
    """vllm:prefix_cache_queries / _hits (prompt tokens) from the daemon's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {name.removeprefix("vllm:prefix_cache_"): families[name].samples[0].value
            for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")}


async def _ask_all(url: str, asks: list[tuple[str, str]], clients: int, max_tokens: int,
                   top_k: int, tracker: Tracker | None) -> tuple[list[float], float, dict]:
    """Every question through `clients` concurrent clients; (TTFTs, wall s, token
    usage summed: prompt_tokens, completion_tokens)."""
    queue: asyncio.Queue = asyncio.Queue()
    for ask in asks:
        queue.put_nowait(ask)
    ttfts, tokens = [], {"prompt_tokens": 0, "completion_tokens": 0}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            question, adapter = queue.get_nowait()
            body = {"model": adapter, "messages": [{"role": "user", "content": question}],
                    "rag": {"namespace": NAMESPACE, "top_k": top_k},
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            sent, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                async for line in response.aiter_lines():
                    if event := sse_event(line):
                        first = first or time.perf_counter() - sent
                        usage = event.get("usage")
                        if usage:
                            for key in tokens:
                                tokens[key] += usage[key]
            ttfts.append(first)
            if tracker:
                tracker.done(max_tokens)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return ttfts, time.perf_counter() - start, tokens


def run_peer(caching: bool, workload: RagWorkload, folder: Path, adapters: dict[str, Path],
             documents: list[dict], asks: list[tuple[str, str]],
             tracker: Tracker | None = None) -> dict:
    """One fresh daemon, prefix caching on or off; the workload through its HTTP API."""
    data = folder / ("cached" if caching else "uncached")
    data.mkdir()
    flags = ["--model", workload.model, "--quantize", "none", "--dtype", workload.dtype,
             "--max-model-len", "1024", "--max-num-seqs", "16",
             "--max-num-batched-tokens", str(workload.max_num_batched_tokens),
             "--max-lora-rank", "16",
             "--max-active-adapters", str(min(16, len(adapters))),
             "--num-kv-blocks", str(workload.kv_blocks),
             "--adapter-root", str(next(iter(adapters.values())).parent),
             "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"]
    daemon = DaemonProcess(data, flags, data / "daemon.log")
    try:
        register_adapters(daemon.url, adapters)
        with httpx.Client(base_url=daemon.url, timeout=600) as http:
            for start in range(0, len(documents), 100):
                http.post(f"/v1/namespaces/{NAMESPACE}/documents",
                          json={"documents": documents[start:start + 100]}).raise_for_status()
        before = prefix_counters(daemon.url)
        if tracker:
            tracker.restart()
        ttfts, wall, tokens = asyncio.run(_ask_all(
            daemon.url, asks, workload.clients, workload.max_tokens, workload.top_k, tracker))
        after = prefix_counters(daemon.url)
    finally:
        daemon.stop()
    hit = after["hits"] - before["hits"]
    prompt = tokens["prompt_tokens"]
    return {"tokens_per_s": round(tokens["completion_tokens"] / wall, 1),
            "requests_per_s": round(len(asks) / wall, 2),
            "wall_s": round(wall, 1),
            **ttft_ms(ttfts),
            "prompt_tokens": prompt, "prefill_tokens_saved": int(hit),
            "saved_share": round(hit / prompt, 3)}


def main(workload: RagWorkload = RagWorkload(), json_path: Path | None = None) -> dict:
    """Both peers on the same workload; prints (and saves after each peer) the JSON."""
    base, _ = load_base(workload.model, quantize="none", dtype=workload.dtype)
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-rag-"))
    specs = {f"ad{i}": AdapterSpec(rank=16, alpha=32, scale=0.02)
             for i in range(workload.adapters)}
    paths = make_adapters(base, folder / "adapters", specs, seed=0)
    del base
    docs = notes(workload.documents)
    asks = questions(docs, workload.questions, workload.hot, workload.hot_share,
                     workload.adapters)

    def build(systems: dict) -> dict:
        on, off = systems.get("prefix_caching"), systems.get("no_prefix_caching")
        both = on and off
        return {"workload": asdict(workload), "systems": systems,
                "throughput_ratio": round(on["tokens_per_s"] / off["tokens_per_s"], 2)
                if both else None,
                "ttft_p50_ratio": round(off["ttft_ms_p50"] / on["ttft_ms_p50"], 2)
                if both else None}

    report = Report(json_path, build)
    with BenchProgress() as progress:
        for name, caching in (("prefix_caching", True), ("no_prefix_caching", False)):
            with progress.system(name, workload.questions) as tracker:
                report.add(name, run_peer(caching, workload, folder, paths, docs, asks,
                                          tracker))
    return report.finish()
