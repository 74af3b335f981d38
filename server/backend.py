"""What the service needs of an engine: the one interface every backend implements.

Two implement it: the native engine (server/engine: continuous batching with per-token
LoRA slots, CPU or CUDA), the default and the embedded path, and the vLLM backend
(server/vllm_backend.py, on vLLM's AsyncLLM). Everything lorag adds on top (tenants, the
adapter registry, retrieval, metrics, HTTP and gRPC) talks to an engine only through
this, so both serve the same API unchanged.

Prompts arrive as token ids the service rendered with the base model's chat template, so
every backend sees the same prompt. Adapter keys are engine keys (`tenant.name`, or a
weighted `Composition` of them); tenancy is resolved before a backend sees a request. The
values passed across (Limits, SamplingParams, TokenStream) are the native engine's, which
every backend shares.
"""

from collections.abc import Hashable, Iterable
from typing import Protocol, TypedDict, runtime_checkable

from prometheus_client import Metric
from transformers import PreTrainedTokenizerBase

from lorag.adapters import AdapterKey
from lorag.server.engine.config import Limits
from lorag.server.engine.sampling import SamplingParams
from lorag.server.engine.stream import TokenStream

# vLLM's families that the service writes from `occupancy()` for every backend alike, so
# `metric_families()` leaves them out: those routers read (queue, KV cache, LoRA) and the
# prefix cache's counters
SERVICE_FAMILIES = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting",
                              "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                              "vllm:lora_requests_info", "vllm:prefix_cache_queries",
                              "vllm:prefix_cache_hits", "vllm:lora_adapter_loaded",
                              "vllm:num_gpu_loaded_lora_adapters",
                              "vllm:num_cpu_loaded_lora_adapters",
                              "vllm:max_gpu_lora_adapters"})


class AdapterStatus(TypedDict):
    """Where a registered adapter is: on disk only, in RAM, in a compute slot."""

    name: str
    path: str
    in_ram: bool
    active: bool  # in a compute slot now
    slot: int | None  # which one, where the engine says
    pinned: bool
    running_requests: int


class Occupancy(TypedDict):
    """Queue and occupancy, read for /health and at every metrics scrape."""

    running: int
    waiting: int
    kv_slots_free: int
    kv_cache_usage: float  # 0-1: the share of the KV cache held by requests
    evictions: int | None  # adapters moved out of a compute slot since start; None: unknown
    slot_loads: int | None  # adapters written into a compute slot since start; None: unknown
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hits: int  # ... of which found: KV reused, not computed
    running_adapters: list[AdapterKey]  # the adapters of running requests, each once
    waiting_adapters: list[AdapterKey]  # ... and of requests waiting to run


BATCH_PRIORITY = 1  # a batch's lines wait behind interactive requests


@runtime_checkable
class Backend(Protocol):
    """An engine serving one base model with many LoRA adapters."""

    tokenizer: PreTrainedTokenizerBase

    @property
    def limits(self) -> Limits: ...

    @property
    def alive(self) -> bool:
        """Whether it still serves (its loop runs, its workers answer)."""
        ...

    def describe(self) -> str:
        """One line for the start-up banner: which engine, on what, in which dtype."""
        ...

    def submit(self, prompt: list[int], params: SamplingParams, adapter: AdapterKey | None,
               request_id: str, after: str | None = None, priority: int = 0,
               history: Hashable | None = None) -> TokenStream:
        """Queue a request; raises InvalidRequest, AdapterNotFound or Overloaded. after:
        the id of a request just submitted with the same prompt and adapter (the choices
        of an n > 1 request), whose prompt's KV this one may start from. priority: lower
        numbers first (interactive 0, a batch's lines BATCH_PRIORITY). history: requests
        of one key may draft speculative tokens from each other's outputs."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Stop a request; whether it was still running."""
        ...

    def load_adapter(self, key: str, path: str, lazy: bool = False,
                     version: str | None = None) -> bool:
        """Validate and register an adapter (lazy: remember the path, read it on first
        use; version: the files' content_version, which every read must find); True if
        new, False if it was already registered."""
        ...

    def unload_adapter(self, key: str) -> bool: ...

    def pin_adapter(self, key: str) -> object:
        """Keep an adapter in a compute slot (the native engine returns which)."""
        ...

    def unpin_adapter(self, key: str) -> bool: ...

    def list_adapters(self) -> list[AdapterStatus]: ...

    def occupancy(self) -> Occupancy: ...

    def metric_families(self) -> Iterable[Metric]:
        """The engine's own Prometheus families, exposed on /metrics beside lorag's
        (vLLM's `vllm:*`, which dashboards read), less `SERVICE_FAMILIES`."""
        ...

    def shutdown(self) -> None:
        """Stop serving; requests still running end with finish_reason "cancelled"."""
        ...
