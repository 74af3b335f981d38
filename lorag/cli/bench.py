"""`lorag bench serving|training|methods|retrieval|load|soak|fleet|rag|latency|threads|kernels|
compile`: every peer in one run, JSON."""

import signal
from pathlib import Path
from typing import Annotated

import typer

from lorag import catalog
from lorag.cli.common import JsonOut, group
from lorag.errors import InvalidRequest
from lorag.retrieval import RAG_MAX_TOP_K, RAG_TOP_K

app = group("Benchmarks that measure every peer in the same run; JSON out.")


@app.callback()
def stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does, through its `finally` blocks, so the
    daemons, engines and servers it started stop with it instead of running on."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@app.command("serving")
def bench_serving(
    adapters: Annotated[int, typer.Option(min=1, help="Distinct adapters in the workload.")] = 64,
    requests: Annotated[int, typer.Option(min=1, help="Requests, all sent at t=0.")] = 256,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 32,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float32, for every system.")] =
        "bfloat16",
    quantize: Annotated[str, typer.Option(help="Base quantization for every system.")] =
        "none",
    registered: Annotated[int, typer.Option(
        min=0, help="Also run with this many adapters registered (64 slots).")] = 0,
    constrained_share: Annotated[float, typer.Option(
        min=0, max=1, help="Also run the workload with this share of the requests under a "
                           "JSON schema (lorag_constrained).")] = 0.0,
    repeats: Annotated[int, typer.Option(
        min=1, help="Runs of each native-engine row (lorag*, but NF4), interleaved; each "
                    "row reports its median run and lists every run's tok/s.")] = 3,
    json_path: JsonOut = None,
    only: Annotated[str | None, typer.Option(
        help="Comma-separated systems to run (default all): lorag, lorag_no_adapters, "
             "lorag_merged, lorag_registered, lorag_constrained, hot_load, lorag_nf4, "
             "peft_mixed, peft_sequential, vllm_cpu, lorag_vllm, llamacpp, "
             "llamacpp_no_adapters, llamacpp_q4_0 (after make bench-setup).")] = None,
) -> None:
    """The engine vs HF + PEFT (mixed batch, sequential), vLLM-CPU and llama.cpp on one
    workload."""
    from lorag.benchmarks.serving import main  # imports torch and the engine: on demand

    systems = [name.strip() for name in only.split(",") if name.strip()] if only else None
    main(adapters, requests, max_new_tokens, dtype, quantize, registered, json_path,
         only=systems, constrained_share=constrained_share, repeats=repeats)


@app.command("training")
def bench_training(
    examples: Annotated[int, typer.Option(min=1, help="Chat examples generated.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for each system.")] = 16,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate for both.")] = 2e-4,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank (alpha = 2 rank).")] = 16,
    json_path: JsonOut = None,
) -> None:
    """Plain TRL SFTTrainer defaults vs `lorag train`: tokens/s, peak RSS, final loss."""
    from lorag.benchmarks.training import main

    main(examples, steps, batch_size, lr, rank, json_path)


@app.command("methods")
def bench_methods(
    model: Annotated[str, typer.Option(help="Base model: catalog name or folder.")] =
        catalog.DEFAULT_BASE_MODEL,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] =
        "full,freeze,lora,qlora,dora,ia3,prompt,prefix",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for each method.")] = 60,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    dtype: Annotated[str, typer.Option(help="Training dtype: auto, bfloat16 or float32.")] =
        "auto",
    held_out: Annotated[int, typer.Option(
        min=1, max=24, help="House-style examples evaluated (held out of training).")] = 24,
    facts: Annotated[int, typer.Option(min=1, max=30, help="Facts questions asked.")] = 30,
    neutral: Annotated[int, typer.Option(
        min=1, max=24, help="Neutral prompts forgetting is measured on.")] = 24,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer.")] = 48,
    chart: Annotated[Path | None, typer.Option(help="Write the table as a PNG here.")] = None,
    folder: Annotated[Path | None, typer.Option(
        help="Train into this folder (default: a new temporary one); methods already "
             "trained there with the same model, steps, batch, dtype and seed are reused.")]
        = None,
    json_path: JsonOut = None,
) -> None:
    """Every `lorag train --method` on the same data and steps: trainable parameters, peak
    memory, s/step, tokens/s, size on disk, held-out task and facts accuracy, forgetting."""
    from lorag.benchmarks.methods import Workload, main
    from lorag.trainer.methods import method_named

    names = [name.strip() for name in methods.split(",") if name.strip()]
    for name in names:
        method_named(name)  # an unknown one is refused before anything trains
    main(Workload(model=model, methods=names, steps=steps, batch_size=batch_size,
                  dtype=dtype, held_out=held_out, facts=facts, neutral=neutral,
                  max_new_tokens=max_new_tokens), json_path, chart, folder)


@app.command("retrieval")
def bench_retrieval(
    sizes: Annotated[str, typer.Option(help="Comma-separated index sizes (vectors).")] =
        "100000,1000000",
    documents: Annotated[int, typer.Option(min=1, help="Documents ingested for real.")] =
        600,
    queries: Annotated[int, typer.Option(min=1, help="Embedded questions searched.")] = 200,
    nprobe: Annotated[str, typer.Option(help="Comma-separated IVF nprobe values.")] =
        "4,16,64",
    state: Annotated[str | None, typer.Option(
        help="Also measure two replicas on this state database (postgresql://...) beside "
             "SQLite: ingest rate, catch-up lag, search p50.")] = None,
    json_path: JsonOut = None,
) -> None:
    """Ingest chunks/s through the store; flat vs IVF search p50/p99 and recall@10; with
    --state, replicas on a shared state database."""
    from lorag.benchmarks.retrieval import main

    try:
        size_list = [int(s) for s in sizes.split(",")]
        nprobes = [int(p) for p in nprobe.split(",")]
    except ValueError as e:
        raise InvalidRequest(f"--sizes and --nprobe take comma-separated integers ({e})",
                             field="sizes") from e
    main(size_list, documents, queries, nprobes, json_path, state)


@app.command("load")
def bench_load(
    requests: Annotated[int, typer.Option(min=1, help="Concurrent streaming clients.")] = 200,
    adapters: Annotated[int, typer.Option(min=1, help="Adapters the clients use.")] = 16,
    disconnect: Annotated[float, typer.Option(
        min=0, max=1, help="Fraction of clients that hang up mid-stream.")] = 0.2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 32,
    json_path: JsonOut = None,
) -> None:
    """A real daemon under concurrent streams, disconnects and adapter churn."""
    from lorag.benchmarks.load import main

    main(requests, adapters, disconnect, max_tokens, json_path)


@app.command("load-gap")
def bench_load_gap(
    loads: Annotated[int, typer.Option(min=1, help="Large adapters registered, one at a "
                                                   "time, each under running streams.")] = 3,
    max_tokens: Annotated[int, typer.Option(min=10, help="Output tokens of each stream.")]
        = 200,
    json_path: JsonOut = None,
) -> None:
    """The longest gap between a running stream's SSE events while a large adapter is
    registered, against the gaps outside it; on the native and the vLLM backend."""
    from lorag.benchmarks.loadgap import main

    main(loads, max_tokens, json_path=json_path)


@app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option(min=0.1, help="How long the traffic runs.")] = 30,
    rate: Annotated[float, typer.Option(min=0.1, help="Requests started per second.")] = 4.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = 16,
    sample_seconds: Annotated[float, typer.Option(
        min=1, help="Seconds between samples of the daemon's process.")] = 60,
    warmup_minutes: Annotated[float, typer.Option(
        min=0, help="Minutes before the memory bound is measured from.")] = 5,
    model: Annotated[str, typer.Option(help="The daemon's base model.")] =
        "smollm2-135m-instruct",
    quantize: Annotated[str, typer.Option(help="nf4, int8, w8a8 or none.")] = "nf4",
    json_path: JsonOut = None,
) -> None:
    """Mixed traffic at a steady rate; memory (RssAnon + VmSwap), fds, threads and /metrics
    sampled every minute, with the bounds they must hold."""
    from lorag.benchmarks.soak import main

    if warmup_minutes >= minutes:
        raise InvalidRequest(f"--warmup-minutes must be below --minutes ({minutes:g}), got "
                             f"{warmup_minutes:g}", field="warmup_minutes")
    main(minutes, rate, concurrency, sample_seconds, warmup_minutes, model, quantize,
         json_path)


@app.command("batch")
def bench_batch(
    lines: Annotated[int, typer.Option(min=1, help="Chat lines in the batch.")] = 48,
    batch_concurrency: Annotated[int, typer.Option(
        min=1, help="Lines the daemon runs at once (--batch-concurrency), and the peer's "
                    "concurrent clients.")] = 4,
    line_tokens: Annotated[int, typer.Option(min=1, help="Tokens each line generates.")]
        = 64,
    samples: Annotated[int, typer.Option(
        min=3, help="Interactive requests measured each way.")] = 20,
    model: Annotated[str, typer.Option(help="The daemon's base model.")] =
        "smollm2-135m-instruct",
    quantize: Annotated[str, typer.Option(help="nf4, int8, w8a8 or none.")] = "nf4",
    json_path: JsonOut = None,
) -> None:
    """Interactive TTFT idle, while a batch runs, and under the same load sent as
    interactive requests (the peer)."""
    from lorag.benchmarks.batch import main

    main(model, quantize, lines, batch_concurrency, line_tokens, samples, json_path)


@app.command("fleet")
def bench_fleet(
    adapters: Annotated[int, typer.Option(min=1, help="Adapters in the traffic.")] = 24,
    per_adapter: Annotated[int, typer.Option(min=1, help="Requests per adapter.")] = 8,
    slots: Annotated[int, typer.Option(
        min=1, help="Adapter compute slots per replica (--max-active-adapters).")] = 8,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests at once.")] = 6,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 16,
    json_path: JsonOut = None,
) -> None:
    """Three replicas behind HAProxy: adapter affinity (deploy/haproxy) vs round-robin."""
    from lorag.benchmarks.fleet import main

    main(adapters, per_adapter, slots, concurrency, max_tokens, json_path)


@app.command("rag")
def bench_rag(
    adapters: Annotated[int, typer.Option(min=1, help="Adapters (note i uses i mod N).")] = 16,
    documents: Annotated[int, typer.Option(min=2, help="Notes in the namespace.")] = 200,
    questions: Annotated[int, typer.Option(min=1, help="Questions asked.")] = 400,
    hot: Annotated[int, typer.Option(min=1, help="Notes that draw most questions.")] = 20,
    hot_share: Annotated[float, typer.Option(
        min=0, max=1, help="Share of the questions about the hot notes.")] = 0.8,
    clients: Annotated[int, typer.Option(min=1, help="Questions in flight at once.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 16,
    top_k: Annotated[int, typer.Option(
        min=1, max=RAG_MAX_TOP_K, help="Passages per question.")] = RAG_TOP_K,
    model: Annotated[str, typer.Option(help="Base model (name or folder).")] =
        "smollm2-135m-instruct",
    kv_blocks: Annotated[int, typer.Option(
        min=32, help="KV-cache blocks of 32 tokens for both daemons (2048: 65k tokens, "
                     "3 GB in fp32 for the default model).")] = 2048,
    max_num_batched_tokens: Annotated[int, typer.Option(
        min=16, help="Tokens per engine step for both daemons: a step carrying a prompt "
                     "chunk this long delays every answer in it.")] = 512,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16, for both daemons.")] =
        "float32",
    json_path: JsonOut = None,
) -> None:
    """RAG chat through the daemon, prefix caching on vs off: tok/s, TTFT, prefill saved."""
    from lorag.benchmarks.rag import RagWorkload, main

    if hot >= documents:
        raise InvalidRequest(f"--hot must be below --documents ({documents}), got {hot}",
                             field="hot")
    if dtype not in ("float32", "bfloat16"):
        raise InvalidRequest(f"--dtype must be float32 or bfloat16, got {dtype!r}",
                             field="dtype")
    workload = RagWorkload(
        adapters=adapters, documents=documents, questions=questions, hot=hot,
        hot_share=hot_share, clients=clients, max_tokens=max_tokens, top_k=top_k, model=model,
        dtype=dtype, kv_blocks=kv_blocks, max_num_batched_tokens=max_num_batched_tokens)
    main(workload, json_path)


@app.command("latency")
def bench_latency(
    adapter: Annotated[Path | None, typer.Option(
        help="The format adapter answering (default: the one `make demo` trains, "
             "demo-results/adapters/house-style).")] = None,
    speculative_tokens: Annotated[int, typer.Option(
        min=1, max=16, help="Drafts per step of the peer with speculation on.")] = 8,
    questions: Annotated[int, typer.Option(min=1, help="Demo questions asked.")] = 16,
    streams: Annotated[int, typer.Option(min=1, help="Clients at once, the second pass.")]
        = 8,
    max_tokens: Annotated[int, typer.Option(min=2, help="Tokens per answer, at most.")]
        = 96,
    quantize: Annotated[str, typer.Option(help="nf4, int8, w8a8 or none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    schema: Annotated[bool, typer.Option(
        help="Ask with the demo's answer schema as response_format (constrained "
             "decoding).")] = False,
    json_path: JsonOut = None,
) -> None:
    """RAG chat through a format adapter, speculative decoding off vs on: decode tok/s,
    TTFT, end to end, 8 streams, identical greedy answers, acceptance."""
    from lorag.benchmarks.latency import ADAPTER, main

    adapter = adapter or ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise InvalidRequest(f"--adapter {adapter} holds no adapter; run `make demo` (it "
                             "trains house-style) or give an adapter folder",
                             field="adapter")
    main(adapter.resolve(), speculative_tokens, questions, streams, max_tokens, quantize,
         dtype, json_path, schema)


@app.command("threads")
def bench_threads(
    requests: Annotated[int, typer.Option(min=2, help="Streams per peer, over its daemons.")]
        = 32,
    concurrency: Annotated[int, typer.Option(min=2, help="Streams at once, in all.")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 64,
    json_path: JsonOut = None,
) -> None:
    """One daemon with every core against two side by side, each with half the cores
    (--threads) or each with every core (oversubscribed)."""
    from lorag.benchmarks.threads import main

    main(requests, concurrency, max_tokens, json_path)


@app.command("kernels")
def bench_kernels(
    rows: Annotated[str, typer.Option(help="Comma-separated prompt chunk sizes (rows).")] =
        "16,32,64,128,256,512,1024",
    prompt_tokens: Annotated[int, typer.Option(min=16, max=4096,
                                               help="Prompt length, the prefill part.")] = 800,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts per prefill peer.")] = 5,
    json_path: JsonOut = None,
) -> None:
    """The SGMV kernel against oneDNN per chunk size and on decode tokens, the w8a8 base's
    int8 matmuls beside the base's, and a long prompt's time to first token."""
    from lorag.benchmarks.kernels import main

    main(_sizes(rows, "rows"), prompt_tokens, prompts, json_path)


@app.command("compile")
def bench_compile(
    sizes: Annotated[str, typer.Option(help="Comma-separated step sizes (tokens).")] =
        "8,16,64,128,512",
    json_path: JsonOut = None,
) -> None:
    """torch.compile vs eager on a step's elementwise work and its LoRA delta."""
    from lorag.benchmarks.compile import main

    main(_sizes(sizes, "sizes"), json_path=json_path)


def _sizes(text: str, field: str) -> list[int]:
    """A comma-separated list of positive token counts, or a clear error naming `field`."""
    try:
        counts = [int(size) for size in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise InvalidRequest(f"--{field} takes positive token counts like 8,64,128; got "
                             f"{text!r}", field=field)
    return counts
