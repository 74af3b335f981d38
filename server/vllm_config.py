"""vLLM's configuration as `lorag serve --backend vllm` sets it: the options vLLM alone
has, the checks that refuse what vLLM cannot serve (by flag name, before vLLM starts), and
the engine arguments built from lorag's engine limits and these options.
"""

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from lorag.errors import InvalidRequest
from lorag.server.engine.config import EngineConfig, kv_bytes_per_token
from lorag.server.engine.speculative import MAX_NGRAM, MIN_NGRAM

log = logging.getLogger("lorag.vllm")

# the ranks vLLM's LoRA kernels are built for (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EXECUTORS = ("mp", "ray")


@dataclass(frozen=True)
class VllmOptions:
    """vLLM's own knobs (`lorag serve --backend vllm`), passed to its AsyncEngineArgs.

    None leaves vLLM's default. lorag sizes vLLM's KV cache on either build (vLLM's
    `kv_cache_memory_bytes`) by the native engine's rule (`kv_cache_bytes`), unless
    gpu_memory_utilization (GPUs only) hands the sizing to vLLM's profiling. Without
    either, vLLM would reserve 92% of the machine's memory on the CPU build and refuse to
    start whenever less than that is free.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_loras: int = 8  # adapters in one batch (vLLM's GPU slots)
    max_cpu_loras: int | None = None  # adapters vLLM caches in host memory
    enable_prefix_caching: bool | None = None
    distributed_executor_backend: str | None = None  # mp or ray
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs: faster start-up

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_loras"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"--{name.replace('_', '-')} must be >= 1", field=name)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise InvalidRequest(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= "
                                 f"--max-loras ({self.max_loras})", field="max_cpu_loras")
        utilization = self.gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            raise InvalidRequest(f"--gpu-memory-utilization must be in (0, 1], got "
                                 f"{utilization}", field="gpu_memory_utilization")
        executor = self.distributed_executor_backend
        if executor is not None and executor not in EXECUTORS:
            raise InvalidRequest(f"--distributed-executor-backend must be one of "
                                 f"{', '.join(EXECUTORS)}, got {executor!r}",
                                 field="distributed_executor_backend")


def vllm_quantization(quantize: str, device: str) -> str | None:
    """lorag's --quantize as vLLM's `quantization`, or a refusal: a backend never serves
    another precision than the one asked for."""
    if quantize == "none":
        return None
    if quantize == "nf4" and device == "cuda":
        return "bitsandbytes"  # vLLM quantizes in flight to bitsandbytes NF4
    if quantize == "nf4":
        raise InvalidRequest(
            f"--quantize nf4: vLLM has no bitsandbytes kernels on {device}; on vLLM's CPU "
            "build serve --quantize none (bfloat16 or float32), or nf4 on --backend native",
            field="quantize")
    raise InvalidRequest(
        f"--quantize {quantize}: vLLM quantizes in flight to bitsandbytes 4-bit only; use "
        "--quantize nf4 (CUDA) or none, or int8 / w8a8 on --backend native",
        field="quantize")


def kv_cache_bytes(config: EngineConfig, hf_config, dtype: torch.dtype) -> int:
    """The KV cache vLLM reserves: the native engine's rule (EngineConfig.sized: the
    --kv-cache-memory budget, else room for max_num_seqs sequences of max_model_len
    tokens up to a default cap). VLLM_CPU_KVCACHE_SPACE, if set, still wins on the CPU
    build (vLLM reads it itself): said in the log."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        log.warning("VLLM_CPU_KVCACHE_SPACE=%s GiB overrides lorag's KV cache size on vLLM-CPU",
                    os.environ["VLLM_CPU_KVCACHE_SPACE"])
    token_bytes = kv_bytes_per_token(hf_config, dtype)
    sized = config.sized(token_bytes)
    return sized.kv_blocks * sized.kv_block_size * token_bytes


def bind_cpu_workers(threads: int, workers: int) -> None:
    """vLLM-CPU binds each worker's OpenMP threads to cores (VLLM_CPU_OMP_THREADS_BIND):
    `auto` gives a worker a NUMA node's cores but one, whatever a cgroup quota allows, and
    refuses more workers than NUMA nodes. lorag sets the binding from the daemon's
    `threads` instead: pipeline or tensor stages get the first `threads` cores split
    evenly, one list each; a lone worker with fewer threads than cores is left unbound with
    OMP_NUM_THREADS (lorag/threads.py), so that two replicas on one box do not bind the
    same cores; with every core it keeps vLLM's own binding. A VLLM_CPU_OMP_THREADS_BIND
    set by hand wins."""
    cpus = sorted(os.sched_getaffinity(0))
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        log.warning("VLLM_CPU_OMP_THREADS_BIND=%s binds vLLM's CPU workers; --threads does "
                    "not size them", os.environ["VLLM_CPU_OMP_THREADS_BIND"])
    elif workers > 1:
        share = min(threads, len(cpus)) // workers
        if share < 1:
            raise InvalidRequest(
                f"{workers} vLLM workers (--pipeline-parallel-size x --tensor-parallel-size) "
                f"need a core each; this daemon has {min(threads, len(cpus))} (--threads, "
                "CPU affinity, cgroup quota)", field="pipeline_parallel_size")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cpus[i * share:(i + 1) * share])) for i in range(workers))
    elif threads < len(cpus):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def check_lora_rank(rank: int) -> None:
    if rank not in VLLM_LORA_RANKS:
        raise InvalidRequest(f"--max-lora-rank {rank}: vLLM's LoRA kernels take one of "
                             f"{', '.join(map(str, VLLM_LORA_RANKS))}", field="max_lora_rank")


def check_for_device(options: VllmOptions, device: str) -> None:
    if device == "cpu" and options.gpu_memory_utilization is not None:
        raise InvalidRequest("--gpu-memory-utilization applies to GPUs; on the CPU build "
                             "size the KV cache with --kv-cache-memory",
                             field="gpu_memory_utilization")
    if device == "cpu" and options.distributed_executor_backend == "ray":
        # vLLM 0.32's own words, 20 s into the start: CpuPlatform has no ray_device_key
        raise InvalidRequest("--distributed-executor-backend ray: vLLM's CPU build runs no "
                             "Ray workers (vLLM: \"current platform cpu does not support "
                             "ray.\"); Ray's workers are for GPUs (docs/backends.md)",
                             field="distributed_executor_backend")
    if device == "cpu" and options.pipeline_parallel_size > 1:
        # run by hand on vLLM-CPU 0.32: stages start, then the first step fails
        raise InvalidRequest("--pipeline-parallel-size above 1: vLLM's CPU build runs a "
                             "model with LoRA eagerly and skips its warm-up step, so a "
                             "later pipeline stage fails its first step (vLLM 0.32: "
                             "AssertionError in sync_and_gather_intermediate_tensors), "
                             "and lorag always serves with LoRA; pipeline stages are for "
                             "GPUs (docs/backends.md)", field="pipeline_parallel_size")
    if options.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise InvalidRequest("--distributed-executor-backend ray: ray is not installed "
                             "(pip install ray)", field="distributed_executor_backend")


def engine_args(model: str, dtype: str, quantization: str | None, config: EngineConfig,
                options: VllmOptions, kv_cache_bytes: int | None):
    """vLLM's AsyncEngineArgs: lorag's engine limits, LoRA on, xgrammar for structured
    outputs, priority scheduling (FIFO within a priority), the KV cache sized in bytes
    (else by GPU memory share)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    c, o = config, options
    return AsyncEngineArgs(
        model=model, dtype=dtype, quantization=quantization,
        max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
        max_num_batched_tokens=c.max_num_batched_tokens, enable_lora=True,
        max_lora_rank=c.max_lora_rank, max_loras=o.max_loras,
        max_cpu_loras=o.max_cpu_loras, enable_prefix_caching=o.enable_prefix_caching,
        tensor_parallel_size=o.tensor_parallel_size,
        pipeline_parallel_size=o.pipeline_parallel_size,
        distributed_executor_backend=o.distributed_executor_backend,
        enforce_eager=o.enforce_eager, disable_log_stats=False,
        scheduling_policy="priority",  # a batch's lines wait behind interactive requests
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"),
        # --speculative-tokens: vLLM's own prompt lookup, with the native engine's n-grams
        **({"speculative_config": {"method": "ngram",
                                   "num_speculative_tokens": c.speculative_tokens,
                                   "prompt_lookup_max": MAX_NGRAM,
                                   "prompt_lookup_min": MIN_NGRAM}}
           if c.speculative_tokens else {}),
        **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes
           else {"gpu_memory_utilization": o.gpu_memory_utilization}))
