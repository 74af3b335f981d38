"""Prometheus metrics of the daemon, with per-adapter labels.

Request metrics are observed as outputs flow to the client (`TrackedStream`); engine
state (queue depth, residency, evictions) is read from the engine at scrape time, so it
is never stale and costs nothing between scrapes. The registry is the daemon's own, not
prometheus_client's global one: two daemons in one process (tests) do not collide.

Beside lorag's own families, the few that existing routers read from vLLM servers, and
the prefix cache's counters (server/backend.py's `SERVICE_FAMILIES`), are written under
vLLM's names and meaning, for both backends alike: the Gateway API Inference
Extension's endpoint picker (llm-d's router, its lora-affinity-scorer) and vLLM's
production-stack router route on them, so they route a lorag fleet with no router of
lorag's own.

Who sees what: the full exposition names every tenant's adapters, for the operator's
Prometheus and the routers (`lorag serve --metrics-port`, or the API port of a daemon
without keys). A tenant's view (`exposition(tenant)`, the API port's /metrics with a key)
holds the same families with only that tenant's adapters in them.
"""

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lorag.adapters import AdapterKey, Composition
from lorag.server import tenancy
from lorag.server.engine.stream import Output

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BASE_LABEL = "base"  # the adapter label of requests served by the base model alone
# ... and of requests on a weighted composition: one label for all of them, since a label
# per composition (its weights, or even its set of names) would mint a new series per request
COMPOSITION_LABEL = "composition"


class Metrics:
    """Every metric the daemon exports; `engine_state()` is read at each scrape."""

    def __init__(self, engine_state: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.engine = _EngineCollector(engine_state)
        labels = ["adapter"]
        self.requests = Counter("lorag_requests", "Finished requests by adapter and reason.",
                                ["adapter", "finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("lorag_prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("lorag_generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.ttft = Histogram("lorag_time_to_first_token_seconds",
                              "From submit to the first output.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lorag_inter_token_latency_seconds",
                             "Between consecutive outputs of a stream.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapter_load = Histogram("lorag_adapter_load_seconds",
                                      "Reading and validating an adapter file.",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(self.engine)
        self.observed = (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft,
                         self.itl, self.adapter_load)  # beside the engine's, read at scrape

    def exposition(self, tenant: str | None = None) -> bytes:
        """The Prometheus text: everything, or what tenant `tenant` may see."""
        return generate_latest(self.registry if tenant is None else _TenantView(self, tenant))


class _TenantView:
    """One tenant's /metrics: every family, the per-adapter ones cut to its own adapters
    (and the base and composition labels, which name nobody's)."""

    def __init__(self, metrics: Metrics, tenant: str):
        self.metrics = metrics
        self.tenant = tenant

    def collect(self):
        for metric in self.metrics.observed:
            for family in metric.collect():
                yield self._own_samples(family)
        yield from self.metrics.engine.collect(self.tenant)

    def _own_samples(self, family: Metric) -> Metric:
        own = Metric(family.name, family.documentation, family.type, family.unit)
        own.samples = [s for s in family.samples
                       if "adapter" not in s.labels or _owns(self.tenant, s.labels["adapter"])]
        return own


def _owns(tenant: str | None, label: str) -> bool:
    """Whether an `adapter` label value is one tenant `tenant` may see (None: anyone)."""
    return tenant is None or label in (BASE_LABEL, COMPOSITION_LABEL) or \
        tenancy.split(label)[0] == tenant


class _EngineCollector:
    """Engine state as gauges, computed when Prometheus scrapes; `collect(tenant)` names
    only that tenant's adapters."""

    def __init__(self, engine_state: Callable[[], dict]):
        self.engine_state = engine_state

    def collect(self, tenant: str | None = None):
        state = self.engine_state()
        for name, help_text in (("waiting", "Requests waiting for a running slot."),
                                ("running", "Sequences in the running batch."),
                                ("kv_slots_free", "Free KV-cache sequence slots.")):
            yield GaugeMetricFamily(f"lorag_{name}", help_text, value=state[name])
        for name, help_text in (("evictions", "Adapters evicted from compute slots."),
                                ("slot_loads", "Adapters written into compute slots.")):
            if state[name] is not None:  # None: the backend does not say
                yield CounterMetricFamily(f"lorag_adapter_{name}", help_text,
                                          value=state[name])
        resident = GaugeMetricFamily("lorag_adapter_resident",
                                     "1 where the adapter is resident in that tier.",
                                     labels=["adapter", "tier"])
        for row in (r for r in state["adapters"] if _owns(tenant, r["name"])):
            resident.add_metric([row["name"], "ram"], float(row["in_ram"]))
            resident.add_metric([row["name"], "active"], float(row["active"]))
        yield resident
        yield from _router_families(state, tenant)
        yield from state["engine_families"]


def _router_families(state: dict, tenant: str | None):
    """vLLM's queue, KV-cache and LoRA gauges and prefix-cache counters
    (`SERVICE_FAMILIES`), with vLLM's meaning, for every backend. lora_requests_info
    is one sample: the adapters of running and waiting requests as their requests name
    them (comma-separated, empty when none), the adapter slots, and as its value the Unix
    time they were read (now: routers take the newest sample)."""
    model = [state["model"]]
    for name, help_text, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", state["running"]),
            ("vllm:num_requests_waiting", "Requests waiting to run.", state["waiting"]),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1.", state["kv_cache_usage"]),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage, 0-1 (the older name).",
             state["kv_cache_usage"])):
        family = GaugeMetricFamily(name, help_text, labels=["model_name"])
        family.add_metric(model, value)
        yield family
    lora = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and waiting "
                             "requests; the value is when they were read.",
                             labels=["max_lora", "running_lora_adapters",
                                     "waiting_lora_adapters"])
    lora.add_metric([str(state["max_lora"]),
                     ",".join(_request_names(state["running_adapters"], tenant)),
                     ",".join(_request_names(state["waiting_adapters"], tenant))], time.time())
    yield lora
    yield from _residency_families(state, tenant)
    for name, help_text, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             state["prefix_cache_queries"]),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             state["prefix_cache_hits"])):
        family = CounterMetricFamily(name, help_text, labels=["model_name"])
        family.add_metric(model, value)
        yield family


def _residency_families(state: dict, tenant: str | None):
    """Which adapters this replica holds, as vLLM's residency gauges name them (vLLM PR
    #54830, read by llm-d's lora-load-state-scorer): `vllm:lora_adapter_loaded` is 1 per
    resident adapter, at `level` "gpu" while it holds a compute slot (on a CPU replica
    the slot is in RAM too: the level names the tier, as routers score it) or "cpu" while
    it is loaded but slotless; with counts of each and the number of compute slots. An
    adapter only registered (its weights on disk) has no series: loading it costs a read."""
    loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "1 per adapter loaded, at the "
                               "tier it is in: gpu (a compute slot) or cpu (memory only).",
                               labels=["model_name", "adapter_name", "level", "pinned"])
    levels = {"gpu": 0, "cpu": 0}
    for row in state["adapters"]:
        if not _owns(tenant, row["name"]) or not (row["active"] or row["in_ram"]):
            continue
        level = "gpu" if row["active"] else "cpu"
        levels[level] += 1
        loaded.add_metric([state["model"], tenancy.split(row["name"])[1], level,
                           str(row["pinned"]).lower()], 1.0)
    yield loaded
    for name, help_text, value in (
            ("vllm:num_gpu_loaded_lora_adapters", "Adapters in a compute slot.",
             levels["gpu"]),
            ("vllm:num_cpu_loaded_lora_adapters", "Adapters loaded, not in a compute slot.",
             levels["cpu"]),
            ("vllm:max_gpu_lora_adapters", "Compute slots for adapters.", state["max_lora"])):
        family = GaugeMetricFamily(name, help_text, labels=["model_name"])
        family.add_metric([state["model"]], value)
        yield family


def _request_names(keys: list[AdapterKey], tenant: str | None) -> list[str]:
    """Engine keys as a request's `model` (or `adapters`) names them, each once, sorted;
    a composition by its parts' names; only tenant `tenant`'s (None: everyone's)."""
    names = set()
    for key in keys:
        parts = key.names if isinstance(key, Composition) else (key,)
        names.update(tenancy.split(part)[1] for part in parts if _owns(tenant, part))
    return sorted(names)


def metric_label(adapter: AdapterKey | None) -> str:
    """The `adapter` label of a request's metrics: its adapter's key, or one label for the
    base model and one for every composition, so label values stay bounded."""
    if adapter is None:
        return BASE_LABEL
    return COMPOSITION_LABEL if isinstance(adapter, Composition) else adapter


class TrackedStream:
    """A TokenStream that observes request metrics as it is read (sync or async), and
    calls `on_end(self)` when its last output has been read."""

    def __init__(self, stream, metrics: Metrics, label: str,
                 on_end: Callable[["TrackedStream"], None] = lambda stream: None):
        self.stream = stream
        self.request_id = stream.request_id
        self.metrics = metrics
        self.label = label
        self.on_end = on_end
        self.start = self.last = time.perf_counter()
        self.first = True
        self.tokens = 0  # output tokens read so far; prompt and output once it ended

    def fail(self, error: Exception) -> None:
        """End the stream for its reader now, with `error` as its last output (the
        engine's own last output, if one follows, is never read)."""
        self.stream.put(Output("", [], "error", error=error))

    def _observe(self, output) -> None:
        now = time.perf_counter()
        histogram = self.metrics.ttft if self.first else self.metrics.itl
        histogram.labels(self.label).observe(now - self.last)
        self.first, self.last = False, now
        self.tokens += len(output.token_ids)  # what a request cancelled midway used
        if output.finish_reason is not None:
            if output.finish_reason != "cancelled":  # counted by Service.cancel
                self.metrics.requests.labels(self.label, output.finish_reason).inc()
            self.metrics.prompt_tokens.labels(self.label).inc(output.prompt_tokens)
            self.metrics.generation_tokens.labels(self.label).inc(output.completion_tokens)
            self.tokens = output.prompt_tokens + output.completion_tokens
            self.on_end(self)

    def __iter__(self):
        for output in self.stream:
            self._observe(output)
            yield output

    async def __aiter__(self):
        async for output in self.stream:
            self._observe(output)
            yield output
