"""`lorag bench soak --minutes N`: a daemon under steady mixed traffic, watched for leaks.

Starts `lorag serve` on loopback (the default model, NF4, or `--model`), registers a few
adapters and fills a namespace, then for N minutes starts requests at a steady rate, each
of a random kind: chat, streamed chat, a stream its client drops after a few chunks, RAG
chat, a json_schema answer, a random weighted composition, adapter churn (register and
unload), document churn (add and delete), and a bad request (a 4xx is its success).

Every `--sample-seconds` (60) it reads the daemon's process: RssAnon + VmSwap (the
anonymous memory a leak grows; RSS also counts the model's mapped files), open file
descriptors, threads, the size of /metrics, the compiled-grammar cache, and the request
outcomes so far, printed as a JSON line on stderr as it goes. At the end: the least-squares
slope of memory after the warm-up, its growth over the run in percent, fd and thread
counts first to last, and whether the bounds hold: memory growth under 5% after warm-up,
no fd or thread growth, and no failure but the deliberate ones. Prints JSON.
"""

import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess, register_adapters
from lorag.benchmarks.stats import print_json
from lorag.client import DONE, sse_data
from lorag.models import load_base

MODEL = "smollm2-135m-instruct"
MAX_GROWTH_PCT = 5.0
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
          "required": ["answer"]}
BAD = [  # what a careless or hostile client sends; each must get a 4xx
    ("/v1/completions", {"prompt": [1000000], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "stop": ["x" * 300]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "adapters": [{"name": "soak-0", "weight": 1e30}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "wat"}}}}),
    ("/v1/load_lora_adapter", {"lora_name": "escape", "lora_path": "/etc"}),
]


class Traffic:
    """The request kinds, each an async call that returns its outcome's name."""

    def __init__(self, http: httpx.AsyncClient, base: str, adapters: list[str],
                 churn: list[Path], seed: int = 0):
        self.http, self.base, self.adapters, self.churn = http, base, adapters, churn
        self.rng = random.Random(seed)
        self.serial = 0

    def chat_body(self, **extra) -> dict:
        model = self.rng.choice([self.base, *self.adapters])
        return {"model": model, "max_tokens": self.rng.randint(4, 32), "temperature": 0.7,
                "messages": [{"role": "user", "content": "Tell me about the tide."}], **extra}

    async def post(self, path: str, body: dict, expect: int = 200) -> str:
        # json.dumps escapes a lone surrogate (a bad request's); httpx's own encoder refuses
        response = await self.http.post(path, content=json.dumps(body),
                                        headers={"Content-Type": "application/json"})
        if response.status_code == expect or expect == 400 and 400 <= response.status_code \
                < 500 and response.status_code != 429:
            return "ok"
        return f"unexpected_{response.status_code}"

    async def chat(self) -> str:
        return await self.post("/v1/chat/completions", self.chat_body())

    async def rag(self) -> str:
        return await self.post("/v1/chat/completions",
                               self.chat_body(rag={"namespace": "soak", "top_k": 2}))

    async def structured(self) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}))

    async def composition(self) -> str:
        parts = self.rng.sample(self.adapters, 2)
        return await self.post("/v1/chat/completions", {**self.chat_body(), "model": self.base,
                               "adapters": [{"name": name, "weight": self.rng.uniform(-1, 2)}
                                            for name in parts]})

    async def stream(self, drop: bool = False) -> str:
        async with self.http.stream("POST", "/v1/chat/completions",
                                    json=self.chat_body(stream=True)) as response:
            if response.status_code != 200:
                return f"unexpected_{response.status_code}"
            chunks = 0
            async for line in response.aiter_lines():
                chunks += sse_data(line) is not None
                if drop and chunks == 3:
                    return "ok"  # leaving the block drops the connection
                if sse_data(line) == DONE:
                    return "ok"
        return "unexpected_incomplete"

    async def dropped(self) -> str:
        return await self.stream(drop=True)

    async def adapter_churn(self) -> str:
        self.serial += 1
        name = f"churn-{self.serial % 4}"
        loaded = await self.post("/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": str(self.rng.choice(self.churn))})
        if loaded != "ok":
            return loaded
        return await self.post("/v1/unload_lora_adapter", {"lora_name": name})

    async def document_churn(self) -> str:
        self.serial += 1
        doc = f"note-{self.serial}"
        added = await self.post("/v1/namespaces/soak-churn/documents", {
            "id": doc, "text": f"Note {self.serial}: the ferry leaves at {self.serial % 24}h."})
        if added != "ok":
            return added
        response = await self.http.delete(f"/v1/namespaces/soak-churn/documents/{doc}")
        return "ok" if response.status_code == 200 else f"unexpected_{response.status_code}"

    async def bad(self) -> str:
        path, body = self.rng.choice(BAD)
        body = {"model": self.base, **body} if "completions" in path else body
        return await self.post(path, body, expect=400)

    def kinds(self) -> dict:
        return {"chat": self.chat, "stream": self.stream, "dropped": self.dropped,
                "rag": self.rag, "structured": self.structured,
                "composition": self.composition, "adapter_churn": self.adapter_churn,
                "document_churn": self.document_churn, "bad": self.bad}


def sample(pid: int, metrics_bytes: int, grammar_bytes: float) -> dict:
    """The daemon process's anonymous memory, fds and threads, now."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    kb = lambda name: int(status.get(name, "0 kB").split()[0])  # noqa: E731
    return {"anon_mb": round((kb("RssAnon") + kb("VmSwap")) / 1024, 1),
            "rss_mb": round(kb("VmRSS") / 1024, 1),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": int(status["Threads"]), "metrics_bytes": metrics_bytes,
            "grammar_cache_bytes": grammar_bytes}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


async def _soak(url: str, pid: int, traffic_args: tuple, minutes: float, rate: float,
                concurrency: int, sample_s: float) -> dict:
    # a pool of fixed size (the requests in flight, and the sampler's): once warm, the
    # daemon holds as many client sockets as it will, so its fd count shows leaks only
    limits = httpx.Limits(max_connections=concurrency + 1,
                          max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        traffic = Traffic(http, *traffic_args)
        kinds, outcomes, samples = traffic.kinds(), Counter(), []
        gate, tasks = asyncio.Semaphore(concurrency), set()

        async def one(kind: str) -> None:
            try:
                outcome = await kinds[kind]()
            except Exception as e:  # noqa: BLE001 - counted, never lost
                outcome = f"unexpected_{type(e).__name__}"
            finally:
                gate.release()
            outcomes[f"{kind}:{outcome}"] += 1

        start = next_sample = time.monotonic()
        while (now := time.monotonic()) - start < minutes * 60:
            if now >= next_sample:
                metrics = (await http.get("/metrics")).text
                grammar = next((float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("lorag_grammar_cache_bytes ")), 0.0)
                row = {"minute": round((now - start) / 60, 2),
                       **sample(pid, len(metrics.encode()), grammar),
                       "outcomes": dict(outcomes)}
                samples.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                next_sample += sample_s
            # a free slot first: past what the daemon keeps up with, the rate drops rather
            # than a backlog growing in this client (the achieved rate is reported)
            await gate.acquire()
            task = asyncio.create_task(one(traffic.rng.choice(list(kinds))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)  # cancellations land at the engine's next step
        health = (await http.get("/health")).json()
    achieved = sum(outcomes.values()) / (time.monotonic() - start)
    return {"samples": samples, "outcomes": dict(outcomes), "after": health,
            "achieved_rate_per_s": round(achieved, 2)}


def verdict(samples: list[dict], outcomes: dict, warmup_minutes: float) -> dict:
    """The bounds the soak must hold, from the samples after warm-up."""
    settled = [s for s in samples if s["minute"] >= warmup_minutes] or samples[-1:]
    first, last = settled[0], settled[-1]
    growth = 100 * (last["anon_mb"] - first["anon_mb"]) / first["anon_mb"]
    failures = {key: n for key, n in outcomes.items() if not key.endswith(":ok")}
    return {"anon_mb_slope_per_minute": round(slope(
                [(s["minute"], s["anon_mb"]) for s in settled]), 3),
            "anon_growth_pct": round(growth, 2),
            "fds": [first["fds"], last["fds"]], "threads": [first["threads"],
                                                           last["threads"]],
            "metrics_bytes": [first["metrics_bytes"], last["metrics_bytes"]],
            "failures": failures,
            "holds": growth < MAX_GROWTH_PCT and last["fds"] <= first["fds"]
            and last["threads"] <= first["threads"] and not failures}


def main(minutes: float = 30, rate: float = 4.0, concurrency: int = 16,
         sample_seconds: float = 60, warmup_minutes: float = 5, model: str = MODEL,
         quantize: str = "nf4", json_path: Path | None = None) -> dict:
    """Soak a fresh daemon and print (and optionally save) JSON."""
    folder = Path(tempfile.mkdtemp(prefix="lorag-soak-"))
    root, data = folder / "adapters", folder / "data"
    data.mkdir(parents=True)
    base, _ = load_base(model, quantize="none", dtype="float32")
    paths = make_adapters(base, root, {f"soak-{i}": AdapterSpec(rank=8, alpha=16, scale=0.05)
                                       for i in range(4)}, seed=0)
    churn = make_adapters(base, root, {f"extra-{i}": AdapterSpec(rank=8) for i in range(2)},
                          seed=1)
    del base
    daemon = DaemonProcess(data, ["--model", model, "--quantize", quantize, "--adapter-root",
                                  str(root), "--max-model-len", "1024", "--max-lora-rank",
                                  "16"], data / "daemon.log")
    try:
        register_adapters(daemon.url, paths)
        for name, text in (("soak", "The ferry to Skerry leaves at nine; the tide turns "
                                    "at noon."), ("soak-churn", "A note to keep.")):
            httpx.post(f"{daemon.url}/v1/namespaces/{name}/documents", timeout=120,
                       json={"id": f"{name}-seed", "text": text}).raise_for_status()
        name = Path(model).name if Path(model).exists() else model
        run = asyncio.run(_soak(daemon.url, daemon.process.pid,
                                (name, list(paths), list(churn.values())), minutes, rate,
                                concurrency, sample_seconds))
    finally:
        daemon.stop()
    result = {"workload": {"model": model, "quantize": quantize, "minutes": minutes,
                           "rate_per_s": rate, "concurrency": concurrency,
                           "warmup_minutes": warmup_minutes},
              **run, "verdict": verdict(run["samples"], run["outcomes"], warmup_minutes)}
    print_json(result, json_path)
    return result
