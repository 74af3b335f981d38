"""`lorag bench load`: a real daemon under concurrent streaming clients and adapter churn.

Starts `lorag serve` on loopback (default model, NF4), registers N adapters, then opens R
streaming chat requests at once over them; a fraction of the clients disconnects after a
few chunks, while another task keeps loading and unloading extra adapters. Reports how
many requests completed, disconnected, failed, and whether the engine is clean afterwards
(no running or waiting sequence, every slot reference released). Prints JSON.
"""

import asyncio
import random
import tempfile
import time
from pathlib import Path

import httpx

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess, register_adapters
from lorag.benchmarks.stats import print_json
from lorag.client import DONE, sse_data
from lorag.models import load_base

MODEL = "smollm2-135m-instruct"


async def _client(http: httpx.AsyncClient, adapter: str, disconnect: bool,
                  max_tokens: int) -> str:
    body = {"model": adapter, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": f"Write about {adapter}."}]}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return f"http_{response.status_code}"
            chunks = 0
            async for line in response.aiter_lines():
                if (data := sse_data(line)) is not None:
                    chunks += 1
                    if disconnect and chunks == 3:
                        return "disconnected"  # leaving the block closes the connection
                    if data == DONE:
                        return "completed"
        return "failed_incomplete"
    except httpx.HTTPError as e:
        return f"failed_{type(e).__name__}"


async def _churn(http: httpx.AsyncClient, paths: list[Path], stop: asyncio.Event) -> dict:
    counts = {"loads": 0, "unloads": 0, "errors": 0}
    while not stop.is_set():
        for i, path in enumerate(paths):
            name = f"churn-{i}"
            for route, body, key in (("/v1/load_lora_adapter", {"lora_name": name,
                                      "lora_path": str(path)}, "loads"),
                                     ("/v1/unload_lora_adapter", {"lora_name": name},
                                      "unloads")):
                response = await http.post(route, json=body)
                counts[key if response.status_code == 200 else "errors"] += 1
            await asyncio.sleep(0.2)
    return counts


async def _run(url: str, adapters: list[str], churn: list[Path], requests: int,
               disconnect: float, max_tokens: int) -> dict:
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        stop = asyncio.Event()
        churner = asyncio.create_task(_churn(http, churn, stop))
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(
            _client(http, rng.choice(adapters), rng.random() < disconnect, max_tokens)
            for _ in range(requests)))
        wall = time.perf_counter() - start
        stop.set()
        churned = await churner
        await asyncio.sleep(1.0)  # cancellations land at the engine's next step
        health = (await http.get("/health")).json()
        listed = (await http.get("/v1/adapters")).json()["data"]
        metrics = (await http.get("/metrics")).text
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    finished: dict[str, float] = {}  # the engine's own count, by finish reason
    for line in metrics.splitlines():
        if line.startswith("lorag_requests_total{"):
            reason = line.split('finish_reason="')[1].split('"')[0]
            finished[reason] = finished.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return {"requests": requests, "outcomes": counts, "wall_s": round(wall, 1),
            "engine_finish_reasons": finished, "adapter_churn": churned,
            "after": {"running": health["running"], "waiting": health["waiting"],
                      "slot_references": sum(a["running_requests"] for a in listed)}}


def main(requests: int = 200, adapters: int = 16, disconnect: float = 0.2,
         max_tokens: int = 32, json_path: Path | None = None) -> dict:
    """Run the load test against a fresh daemon and print (and optionally save) JSON."""
    folder = Path(tempfile.mkdtemp(prefix="lorag-load-"))
    root, data = folder / "adapters", folder / "data"
    data.mkdir(parents=True)
    model, _ = load_base(MODEL, quantize="none", dtype="bfloat16")
    specs = {f"ad{i}": AdapterSpec(rank=16, alpha=32, scale=0.02) for i in range(adapters)}
    paths = make_adapters(model, root, specs, seed=0)
    churn = make_adapters(model, root, {f"extra{i}": AdapterSpec(rank=8) for i in range(4)},
                          seed=1)
    del model
    daemon = DaemonProcess(data, ["--adapter-root", str(root), "--max-active-adapters",
                                  str(adapters), "--max-lora-rank", "16", "--max-model-len",
                                  "512"], data / "daemon.log")
    url = daemon.url
    try:
        register_adapters(url, paths)
        result = asyncio.run(_run(url, list(paths), list(churn.values()), requests,
                                  disconnect, max_tokens))
    finally:
        daemon.stop()
    result = {"workload": {"model": MODEL, "quantize": "nf4", "adapters": adapters,
                           "disconnect_fraction": disconnect, "max_tokens": max_tokens},
              **result}
    print_json(result, json_path)
    return result
