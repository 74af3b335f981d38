"""The vLLM backend: the daemon's `Backend` (server/backend.py) on vLLM's `AsyncLLM`.

Everything lorag adds (tenants, the adapter registry, retrieval, metrics, HTTP and gRPC)
stays in the service; this file only translates the interface to vLLM's engine, which
brings CUDA kernels, paged attention, prefix caching and tensor / pipeline parallelism.

- **Its own event loop.** `AsyncLLM` lives on an asyncio loop in a thread of its own, so
  the interface stays what the native engine offers: `submit` from any thread returns a
  `TokenStream`, which the HTTP loop or a gRPC worker thread reads.
- **Prompts are token ids** rendered by the service with lorag's chat template, so both
  backends see the same prompt; vLLM's own template and detokenising of prompts are unused.
- **Adapters vLLM sees are written by lorag.** A file is validated by lorag exactly as for
  the native engine (`lorag.adapters.load_lora`: adapter roots, safetensors only, rank,
  base shapes, finite values), then written back as a PEFT folder under `adapter_dir`
  (`save_lora`); vLLM reads only that copy. A file changed on disk after validation is
  never served, even when vLLM's LRU evicts and re-reads an adapter.
- **A weighted composition is one adapter of concatenated rank** (`lorag.adapters.compose`,
  exact: sum of w_i B_i A_i), written once, cached by its parts and weights, and removed
  with any part. vLLM serves one adapter per request; this keeps compositions working on
  both backends, at the cost of a rank up to the sum of the parts' (bounded by
  max_lora_rank).
- **Queue bound.** vLLM queues without limit; lorag refuses a request (429) once
  max_num_seqs + max_waiting are in flight, as the native engine does.
- **Structured outputs, penalties, logprobs** go to vLLM's own. A constraint goes as the
  grammar the native engine compiles (`structured.ebnf`, to vLLM's xgrammar backend), so
  both constrain alike, and one that cannot compile is the same 400 on both backends
  rather than an error from inside vLLM's engine. Logprobs are vLLM's
  default, `raw_logprobs`: after the grammar mask, before penalties and temperature, as on
  native.
"""

import asyncio
import itertools
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import REGISTRY
from transformers import AutoConfig, AutoTokenizer

from lorag.adapters import BaseShape, Composition, LoraWeights, compose, save_lora
from lorag.errors import AdapterNotFound, InvalidRequest, Overloaded, Unavailable
from lorag.models import resolve_model
from lorag.provision import ModelCache
from lorag.server.backend import SERVICE_FAMILIES, AdapterStatus, Occupancy
from lorag.server.engine.config import EngineConfig, Limits
from lorag.server.engine.registry import AdapterRegistry
from lorag.server.engine.sampling import SamplingParams
from lorag.server.engine.stream import Output, TokenLogprob, TokenStream
from lorag.server.engine.structured import ebnf
from lorag.server.vllm_config import (
    VllmOptions,
    bind_cpu_workers,
    check_for_device,
    check_lora_rank,
    engine_args,
    kv_cache_bytes,
    vllm_quantization,
)
from lorag.settings import Settings

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


# vLLM's LoRA layers serve LoRA only: the adapter kinds it has no layers for
KIND_REFUSED = ("{path} is {kind} adapter; vLLM has no {name}, so the vLLM backend does not "
                "serve it: serve it on the native backend (lorag serve --backend native), or "
                "merge it into the base (lorag export)")
KINDS = {"dora": ("a DoRA (use_dora=true)", "DoRA"), "ia3": ("an IA3", "IA3 layers"),
         "prompt": ("a prompt-tuning", "prompt adapters (removed in vLLM 0.10)"),
         "prefix": ("a prefix-tuning", "prefix-tuning KV")}


def refusal(lora: LoraWeights, path) -> str:
    """Why vLLM cannot serve `lora`'s kind, or "" when it can."""
    if lora.kind not in KINDS:
        return ""
    kind, name = KINDS[lora.kind]
    return KIND_REFUSED.format(path=path, kind=kind, name=name)


@dataclass
class _Adapter:
    """What vLLM knows of an adapter or composition: its id, and lorag's copy once written."""

    lora_id: int
    folder: Path | None = None  # the validated copy vLLM reads; None until first use
    pinned: bool = False


class VllmBackend:
    """Serves one base model with many LoRA adapters on vLLM's engine."""

    def __init__(self, model: str, dtype: str, quantize: str, config: EngineConfig,
                 options: VllmOptions, adapter_dir: Path):
        """model: a catalog name, HF folder, .gguf file or hub id, provisioned only once the
        options are known to be servable; dtype: "bfloat16" / "float32" / ...; quantize:
        lorag's name (none, nf4, int8, w8a8), refused where vLLM cannot serve it on this device.
        vLLM-CPU's workers get the threads torch has here (the daemon's --threads)."""
        from vllm.platforms import current_platform

        self.config, self.options = config, options
        self.device = current_platform.device_type
        self.quantization = vllm_quantization(quantize, self.device)
        check_lora_rank(config.max_lora_rank)
        check_for_device(options, self.device)
        if self.device == "cpu":
            bind_cpu_workers(torch.get_num_threads(),
                             options.pipeline_parallel_size * options.tensor_parallel_size)
        model = str(resolve_model(model, ModelCache(Settings().models_dir)))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        hf_config = AutoConfig.from_pretrained(model)
        self.base = BaseShape.from_config(hf_config)
        self.vocab_size = hf_config.vocab_size
        if options.gpu_memory_utilization is not None and config.kv_cache_memory is not None:
            raise InvalidRequest("give --kv-cache-memory or --gpu-memory-utilization, not "
                                 "both", field="kv_cache_memory")
        self.kv_cache_bytes = None if options.gpu_memory_utilization is not None else \
            kv_cache_bytes(config, hf_config, getattr(torch, dtype))
        self.adapter_dir = adapter_dir
        shutil.rmtree(adapter_dir, ignore_errors=True)  # copies of a previous run
        adapter_dir.mkdir(parents=True)
        # names, paths and validated weights: the native engine's registry (its RAM tier
        # feeds compositions and copies); vLLM's side of each adapter in self.adapters
        self.registry = AdapterRegistry(self.base, config.adapter_roots, config.max_lora_rank,
                                        config.max_cpu_adapter_bytes, torch.float32)
        self.adapters: dict[str, _Adapter] = {}
        self.compositions: dict[Composition, _Adapter] = {}
        self.in_flight: dict[str, _Request] = {}
        self.tasks: dict[str, asyncio.Task] = {}  # touched on the loop only
        self.retired: dict[int, Path] = {}  # copies to delete once their requests finish
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.writing = threading.Lock()  # one adapter copy written at a time
        self.scheduler = _SchedulerStats()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lorag-vllm",
                                       daemon=True)
        self.thread.start()
        try:
            self.llm = self._call(self._start(model, dtype))
        except Exception:
            self._stop_loop()
            raise
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")

    async def _start(self, model: str, dtype: str):
        # created on its own loop, so vLLM's output handler runs there
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(model, dtype, self.quantization, self.config, self.options,
                           self.kv_cache_bytes)
        try:
            return AsyncLLM.from_engine_args(args, stat_loggers=[self.scheduler.factory])
        except (ValueError, TypeError) as e:  # vLLM's verdict on the configuration
            raise InvalidRequest(f"vLLM refused the engine configuration: {e}",
                                 field="backend") from e

    # ---- the Backend interface ----

    @property
    def limits(self) -> Limits:
        c = self.config
        return Limits(c.max_model_len, c.max_lora_rank, self.options.max_loras,
                      tuple(c.adapter_roots), self.vocab_size)

    @property
    def alive(self) -> bool:
        return self.llm is not None and self.thread.is_alive() and not self.llm.errored

    def describe(self) -> str:
        from vllm import __version__

        quantization = f", {self.quantization}" if self.quantization else ""
        kv = "KV cache sized by vLLM" if self.kv_cache_bytes is None else \
            f"KV cache {self.kv_cache_bytes / 2**30:.2f} GiB"
        return f"vLLM {__version__} on {self.device}, torch.{self.dtype}{quantization}, {kv}"

    def submit(self, prompt: list[int], params: SamplingParams, adapter, request_id: str,
               after: str | None = None, priority: int = 0, history=None) -> TokenStream:
        # `after` is not passed on: vLLM fans its own n > 1 out into requests the same way,
        # and its prefix cache shares whatever of the prompt is cached when each is scheduled.
        # Nor `history`: vLLM's ngram method drafts from the prompt alone (its `suffix`
        # method, which would draft from earlier outputs, needs arctic-inference)
        if not self.alive:
            raise Unavailable("vLLM's engine stopped (the daemon's log says why); this "
                              "replica serves no requests until it is restarted")
        self.limits.check_prompt(prompt, params.max_tokens)
        grammar = None if params.constraint is None else ebnf(params.constraint)  # or a 400
        lora = None if adapter is None else self._lora(adapter)
        request = _Request(TokenStream(request_id), list(prompt), params, lora, grammar,
                           priority)
        with self.lock:
            limit = self.config.max_num_seqs + self.config.max_waiting
            if len(self.in_flight) >= limit:
                raise Overloaded(f"the engine's queue is full ({limit} requests in flight); "
                                 "retry later")
            if request_id in self.in_flight:
                raise InvalidRequest(f"request id {request_id!r} is already in use",
                                     field="request_id")
            self.in_flight[request_id] = request
        self.loop.call_soon_threadsafe(self._start_request, request)
        return request.stream

    def cancel(self, request_id: str) -> bool:
        with self.lock:
            running = request_id in self.in_flight
        if running:
            self.loop.call_soon_threadsafe(self._cancel_request, request_id)
        return running

    def load_adapter(self, key: str, path: str, lazy: bool = False,
                     version: str | None = None) -> bool:
        if lazy:  # a restored record: validated on first use
            self.registry.remember(key, path, version)
            return True
        new = self.registry.register(key, path, version)  # validates, or refuses
        refused = refusal(self.registry.get(key), path)
        if refused:
            if new:
                self.registry.unregister(key)
            raise InvalidRequest(refused, field="path")
        self._ensure_added(key, self._entry(key))
        return new

    def unload_adapter(self, key: str) -> bool:
        if not self.registry.unregister(key):
            raise AdapterNotFound.named(key)
        with self.lock:
            doomed = [self.adapters.pop(key, None)] + [
                self.compositions.pop(c) for c in list(self.compositions) if key in c.names]
        for gone in doomed:
            if gone is not None:
                self._remove(gone)
        return True

    def pin_adapter(self, key: str) -> None:
        entry = self._entry(key)
        self._ensure_added(key, entry)
        self._call(self.llm.pin_lora(entry.lora_id))
        entry.pinned = True

    def unpin_adapter(self, key: str) -> bool:
        """vLLM has no unpin: the adapter is removed and added again, unpinned (running
        requests keep it: vLLM reloads an adapter a running request needs)."""
        entry = self._entry(key)
        if not entry.pinned:
            return False
        entry.pinned = False
        self._call(self.llm.remove_lora(entry.lora_id))
        self._call(self.llm.add_lora(self._request(key, entry)))
        return True

    def list_adapters(self) -> list[AdapterStatus]:
        loaded = self._call(self.llm.list_loras())
        with self.lock:
            running: dict[int, int] = {}
            for request in self.in_flight.values():
                running[request.lora_id] = running.get(request.lora_id, 0) + 1
            # vLLM does not say which adapters hold its GPU slots; a pinned one or one
            # with running requests certainly does
            entries = {key: self.adapters.get(key) for key in self.registry.names()}
        return [AdapterStatus(name=key, path=str(self.registry.path(key) or ""),
                              in_ram=entry is not None and entry.lora_id in loaded,
                              active=entry is not None and (entry.pinned
                                                            or entry.lora_id in running),
                              slot=None, pinned=entry is not None and entry.pinned,
                              running_requests=0 if entry is None
                              else running.get(entry.lora_id, 0))
                for key, entry in entries.items()]

    def occupancy(self) -> Occupancy:
        stats = self.scheduler
        with self.lock:  # vLLM names a request's adapter by str(key)
            keys = {str(key): key for key in [*self.adapters, *self.compositions]}
        return Occupancy(running=stats.running, waiting=stats.waiting,
                         kv_slots_free=max(0, self.config.max_num_seqs - stats.running),
                         kv_cache_usage=stats.kv_cache_usage, evictions=None,
                         slot_loads=None, prefix_cache_queries=stats.prefix_queries,
                         prefix_cache_hits=stats.prefix_hits,
                         running_adapters=[keys[n] for n in stats.running_loras if n in keys],
                         waiting_adapters=[keys[n] for n in stats.waiting_loras if n in keys])

    def metric_families(self):
        """vLLM's own Prometheus families (`vllm:*`), for /metrics beside lorag's; less
        the ones the routers read, which the service writes for both backends alike."""
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:") and family.name not in SERVICE_FAMILIES:
                yield family

    def shutdown(self) -> None:
        with self.lock:
            running = list(self.in_flight)
        for request_id in running:
            self.cancel(request_id)
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self._call(self._shutdown())
        self._stop_loop()
        self.llm = None  # its finalizer runs now, not at interpreter exit
        shutil.rmtree(self.adapter_dir, ignore_errors=True)

    async def _shutdown(self) -> None:
        self.llm.shutdown()  # on its loop, where its output handler runs

    # ---- requests, on the loop ----

    def _start_request(self, request: "_Request") -> None:
        task = self.loop.create_task(self._generate(request))
        self.tasks[request.stream.request_id] = task
        task.add_done_callback(lambda _: self._settle(request, task))

    def _cancel_request(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is not None:
            task.cancel()  # vLLM aborts the request as its generator closes

    async def _generate(self, request: "_Request") -> None:
        async for out in self.llm.generate({"prompt_token_ids": request.prompt},
                                           _sampling(request.params, request.grammar),
                                           request.stream.request_id,
                                           lora_request=request.lora,
                                           priority=request.priority):
            completion = out.outputs[0]
            request.produced += len(completion.token_ids)
            reason = None
            if out.finished:
                reason = FINISH_REASONS.get(completion.finish_reason, "stop")
                request.finished = True
            logprobs = None if completion.logprobs is None else [
                _logprob(token, entries, request.params.logprobs)
                for token, entries in zip(completion.token_ids, completion.logprobs,
                                          strict=True)]
            request.stream.put(Output(completion.text, list(completion.token_ids), reason,
                                      len(request.prompt), request.produced,
                                      logprobs=logprobs))

    def _settle(self, request: "_Request", task: asyncio.Task) -> None:
        """A request's task ended: finish its stream if vLLM did not, and forget it."""
        request_id = request.stream.request_id
        self.tasks.pop(request_id, None)
        if not request.finished:
            error = None if task.cancelled() else task.exception()
            reason = "cancelled" if error is None else "error"
            if error is not None:
                error = RuntimeError(f"vLLM failed the request: {error}")
            request.stream.put(Output("", [], reason, len(request.prompt), request.produced,
                                      error))
        lora_id = request.lora_id
        with self.lock:
            self.in_flight.pop(request_id, None)
            still_used = {r.lora_id for r in self.in_flight.values()}
            folder = self.retired.pop(lora_id) if lora_id in self.retired and \
                lora_id not in still_used else None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- adapters ----

    def _lora(self, adapter):
        """The LoRARequest a request runs with: validated and written on first use."""
        if isinstance(adapter, Composition):
            adapter = adapter.simplest()
        if isinstance(adapter, Composition):
            return self._composition(adapter)
        entry = self._entry(adapter)
        self._ensure_added(adapter, entry)
        return self._request(adapter, entry)

    def _composition(self, key: Composition):
        with self.writing:
            with self.lock:
                entry = self.compositions.get(key)
            if entry is None:
                parts = [(self._weights(name), weight) for name, weight in key.parts]
                entry = _Adapter(next(self.ids))
                self._add(str(key), entry, compose(key, parts, self.config.max_lora_rank))
                with self.lock:
                    self.compositions[key] = entry
        return self._request(str(key), entry)

    def _entry(self, key: str) -> _Adapter:
        """vLLM's side of a registered adapter (an id now, a copy on first use)."""
        if key not in self.registry:
            raise AdapterNotFound.named(key, "adapter")
        with self.lock:
            return self.adapters.setdefault(key, _Adapter(next(self.ids)))

    def _ensure_added(self, key: str, entry: _Adapter) -> None:
        with self.writing:
            if entry.folder is None:
                self._add(key, entry, self._weights(key))

    def _weights(self, key: str) -> LoraWeights:
        """Validated weights: from the registry's RAM tier, else read and checked again."""
        if key not in self.registry:
            raise AdapterNotFound.named(key, "adapter")
        return self.registry.get(key)

    def _add(self, key: str, entry: _Adapter, lora: LoraWeights) -> None:
        """Write the validated weights where vLLM reads them, and load them into vLLM."""
        refused = refusal(lora, self.registry.path(key))
        if refused:  # a record restored from the state database, read on first use
            raise InvalidRequest(refused, field="model")
        entry.folder = save_lora(lora, self.adapter_dir / str(entry.lora_id))
        self._call(self.llm.add_lora(self._request(key, entry)))

    def _remove(self, entry: _Adapter) -> None:
        self._call(self.llm.remove_lora(entry.lora_id))
        if entry.folder is None:
            return
        with self.lock:
            used = any(r.lora_id == entry.lora_id for r in self.in_flight.values())
            if used:  # a running request may need vLLM to read it again
                self.retired[entry.lora_id] = entry.folder
        if not used:
            shutil.rmtree(entry.folder, ignore_errors=True)

    @staticmethod
    def _request(key: str, entry: _Adapter):
        from vllm.lora.request import LoRARequest

        return LoRARequest(key, entry.lora_id, str(entry.folder))

    # ---- the loop ----

    def _call(self, coroutine):
        """Run `coroutine` on vLLM's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class _Request:
    """A request in flight: what it asked, and how far it got."""

    stream: TokenStream
    prompt: list[int]
    params: SamplingParams
    lora: object | None  # vLLM's LoRARequest
    grammar: str | None  # the constraint in xgrammar's EBNF
    priority: int = 0  # vLLM's: lower first
    produced: int = 0  # tokens so far
    finished: bool = False  # vLLM sent the last output

    @property
    def lora_id(self) -> int | None:
        return None if self.lora is None else self.lora.lora_int_id


class _SchedulerStats:
    """The latest scheduler figures, from vLLM's stat-logger hook: running / waiting
    counts, KV-cache usage (0-1), and the adapters (vLLM's lora_name) of each."""

    def __init__(self):
        self.running = self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = self.prefix_hits = 0  # tokens, summed over every update
        self.running_loras: list[str] = []
        self.waiting_loras: list[str] = []

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class Recorder(StatLoggerBase):
            def __init__(self, *args, **kwargs):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.running = scheduler_stats.num_running_reqs
                    stats.waiting = scheduler_stats.num_waiting_reqs
                    stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                    stats.prefix_queries += scheduler_stats.prefix_cache_stats.queries
                    stats.prefix_hits += scheduler_stats.prefix_cache_stats.hits
                    # vLLM keeps an adapter with running requests only in both maps
                    stats.running_loras = [name for name, count in
                                           scheduler_stats.running_lora_adapters.items()
                                           if count]
                    stats.waiting_loras = [name for name, count in
                                           scheduler_stats.waiting_lora_adapters.items()
                                           if count]

            def log_engine_initialized(self):
                pass

        return Recorder()


def _sampling(params: SamplingParams, grammar: str | None):
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None if grammar is None else StructuredOutputsParams(grammar=grammar)
    return VllmSampling(max_tokens=params.max_tokens, temperature=params.temperature,
                        top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                        stop=list(params.stop), ignore_eos=params.ignore_eos,
                        presence_penalty=params.presence_penalty,
                        frequency_penalty=params.frequency_penalty,
                        repetition_penalty=params.repetition_penalty,
                        logprobs=params.logprobs, structured_outputs=structured,
                        output_kind=RequestOutputKind.DELTA)


def _logprob(token: int, entries: dict, wanted: int) -> TokenLogprob:
    """vLLM's logprobs at one position ({token id: Logprob}: the sampled token and the
    `wanted` most likely, ranked) as the engine's."""
    top = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in entries.items()
                 if entry.rank <= wanted and entry.logprob > float("-inf"))
    return TokenLogprob(token, entries[token].logprob,
                        [(token_id, logprob) for _, token_id, logprob in top])

