"""The `lorag` command line."""

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorag import catalog
from lorag.errors import InvalidRequest, LoragError
from lorag.provision import PULL_STAGES, ModelCache
from lorag.settings import Settings

console = Console(stderr=True)


class _App(typer.Typer):
    """Typer app that turns lorag's errors into one clear line and an exit code."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except LoragError as e:  # the caller's mistake: say what and where
            # one unwrapped line, and the message taken literally (no rich markup)
            console.print("[red]error:[/red]", escape(e.message), soft_wrap=True)
            raise SystemExit(2) from None
        except RuntimeError as e:  # infrastructure: say what failed
            console.print("[red]failed:[/red]", escape(str(e)), soft_wrap=True)
            raise SystemExit(1) from None


app = _App(help="One quantized base model, many LoRA adapters, grounded by retrieval.",
           no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Provision and list models in the model cache.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(
        help="Catalog names; the default base model and embedder when left out.")] = None,
) -> None:
    """Provision catalog models into the model cache (idempotent)."""
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own tqdm bar; ours is the display
    entries = [catalog.lookup(n) for n in names or
               (catalog.DEFAULT_BASE_MODEL, catalog.DEFAULT_EMBEDDER)]
    cache = ModelCache(Settings().models_dir)
    columns = (SpinnerColumn(), TextColumn("{task.fields[model]:<24}"), BarColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for entry in entries:
            if cache.is_provisioned(entry):
                progress.add_task("already provisioned", model=entry.name, total=1, completed=1)
                continue
            task = progress.add_task("starting", model=entry.name, total=PULL_STAGES)

            def on_stage(stage: str, task=task) -> None:
                progress.update(task, description=stage)
                progress.advance(task)

            cache.pull(entry, on_stage)
            progress.update(task, description="done", completed=PULL_STAGES)
    for entry in entries:
        console.print(f"{entry.name}: {cache.path(entry.name)}")


@models_app.command("list")
def models_list() -> None:
    """Show the catalog and what is provisioned, with sizes."""
    cache = ModelCache(Settings().models_dir)
    table = Table("name", "kind", "provisioned", "size", "source", "path")
    table.columns[0].no_wrap = True
    table.columns[5].overflow = "fold"
    for row in cache.list():
        size = f"{row.size_bytes / 1e6:,.0f} MB" if row.path else ""
        table.add_row(row.entry.name, row.entry.kind, "yes" if row.path else "no", size,
                      row.entry.requirement, str(row.path or ""))
    Console().print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    model: Annotated[str, typer.Option(
        help="Catalog name, HF folder, .gguf file or hub id.")] = catalog.DEFAULT_BASE_MODEL,
    quantize: Annotated[str, typer.Option(help="nf4, int8 or none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens.")] = 128,
) -> None:
    """Answer one chat message with the base model (greedy), streaming to stdout."""
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    from lorag.models import load_base

    hf_logging.disable_progress_bar()
    base, tokenizer = load_base(model, quantize=quantize, dtype=dtype)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    base.generate(**inputs.to(base.device), max_new_tokens=max_tokens, do_sample=False,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id)


bench_app = typer.Typer(help="Benchmarks that measure every peer in the same run; JSON out.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("serving")
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
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON here.")] =
        None,
) -> None:
    """The engine vs HF + PEFT (mixed batch, sequential) vs vLLM-CPU on one workload."""
    from lorag.benchmarks.serving import main  # lazy: the kernel does not import the daemon

    main(adapters, requests, max_new_tokens, dtype, quantize, registered, json_path)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="JSONL: messages, prompt/completion, or text.")],
    out: Annotated[Path, typer.Option(help="Folder for the adapter and training.json.")],
    base: Annotated[str, typer.Option(help="Catalog name, HF folder, .gguf or hub id.")] =
        catalog.DEFAULT_BASE_MODEL,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[str, typer.Option(
        help="Comma-separated projections, or all-linear.")] = "q_proj,k_proj,v_proj,o_proj",
    rslora: Annotated[bool, typer.Option(help="Scale by alpha/sqrt(r).")] = False,
    dora: Annotated[bool, typer.Option(help="DoRA (trains; the daemon does not serve it).")]
        = False,
    quantize: Annotated[str, typer.Option(help="none, or nf4 for QLoRA.")] = "none",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 3.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (> 0).")] = -1,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per device step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_seq_len: Annotated[int, typer.Option(help="Tokens per example (longer: cut).")] =
        1024,
    packing: Annotated[bool, typer.Option(help="Pack examples into full sequences.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")]
        = False,
    seed: Annotated[int, typer.Option(help="Seed for data order and init.")] = 0,
    eval_split: Annotated[float | None, typer.Option(help="Hold out this fraction.")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="A separate JSONL to evaluate on.")]
        = None,
    train_on_prompt: Annotated[bool, typer.Option(
        help="Loss on prompts too (default: completions / final assistant turn only).")] =
        False,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    serve: Annotated[str | None, typer.Option(
        help="A running daemon's URL: hot-load the adapter there when training ends.")] = None,
    serve_name: Annotated[str | None, typer.Option(
        help="Name to serve it under (default: the --out folder's name).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Admin API key for --serve.", envvar="LORAG_API_KEY")] = None,
) -> None:
    """Fine-tune a LoRA (or QLoRA) adapter with TRL; writes a PEFT adapter the daemon loads."""
    from lorag.trainer.train import TrainOptions
    from lorag.trainer.train import train as run

    options = TrainOptions(
        data=data, base=base, out=out, rank=rank, alpha=alpha, dropout=dropout,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
        rslora=rslora, dora=dora, quantize=quantize, dtype=dtype, epochs=epochs,
        max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        max_seq_len=max_seq_len, packing=packing, gradient_checkpointing=gradient_checkpointing,
        seed=seed, eval_split=eval_split, eval_data=eval_data, train_on_prompt=train_on_prompt,
        save_steps=save_steps, resume=resume)
    report = run(options, console)
    console.print(f"adapter: {out} | steps {report['global_step']} | final loss "
                  f"{report['final_loss']} | {report['tokens_per_s']} tok/s | peak "
                  f"{report['peak_memory_mb']} MB | {report['wall_s']} s")
    if serve:
        from lorag.trainer.publish import publish

        name = serve_name or out.resolve().name
        curl = publish(serve, name, out, api_key)
        console.print(f"loaded into {serve} as {name!r}; try:")
        print(curl)


@app.command()
def export(
    adapter: Annotated[Path, typer.Option(help="The PEFT adapter folder.")],
    out: Annotated[Path, typer.Option(help="Where to write the merged model (new folder).")],
    base: Annotated[str, typer.Option(help="The adapter's base model.")] =
        catalog.DEFAULT_BASE_MODEL,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 for the saved weights.")] =
        "float32",
) -> None:
    """Merge an adapter into its base: a standalone model transformers loads without PEFT."""
    from lorag.trainer.export import export as run

    console.print(f"merged model: {run(adapter, base, out, dtype)}")


DataDir = Annotated[Path | None, typer.Option(
    help="State folder (without --url); default $LORAG_HOME/data.")]
Url = Annotated[str | None, typer.Option(
    help="A running daemon's URL: work there instead of on the data dir.")]
ApiKey = Annotated[str | None, typer.Option(help="API key for --url.", envvar="LORAG_API_KEY")]
Tenant = Annotated[str, typer.Option(
    help="Whose namespaces, without --url (a daemon without API keys serves 'default').")]


def _namespaces(url: str | None, api_key: str | None, data_dir: Path | None, tenant: str):
    from lorag.retrieval.client import open_namespaces

    folder = (data_dir or Settings().resolved_data_dir).expanduser()
    return open_namespaces(url, api_key, folder, tenant)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to ingest.")],
    namespace: Annotated[str, typer.Option(help="Namespace to ingest into.")],
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None,
    tenant: Tenant = "default",
) -> None:
    """Chunk, embed and index documents (.txt .md .jsonl .html .pdf); unchanged ones are
    skipped. A file's document id is its path relative to the PATH it was found under."""
    from lorag.retrieval.ingest import files_under
    from lorag.retrieval.ingest import ingest as run

    files = list(files_under(paths))
    target = _namespaces(url, api_key, data_dir, tenant)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} files"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("ingesting", total=len(files))
        counts = run(target, namespace, paths,
                     lambda path, outcome: progress.update(task, advance=1,
                                                           description=path.name))
    console.print(f"{namespace}: {counts['added']} added, {counts['updated']} updated, "
                  f"{counts['unchanged']} unchanged, {len(counts['failed'])} failed")
    for failure in counts["failed"]:
        console.print(f"  [red]failed[/] {failure['file']}: {failure['reason']}")
    if counts["failed"]:
        raise SystemExit(1)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    namespace: Annotated[str, typer.Option(help="Namespace to search.")],
    k: Annotated[int, typer.Option(min=1, max=100, help="How many hits.")] = 5,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="key=value metadata filter (repeatable; same key twice = in).")] =
        None,
    mode: Annotated[str, typer.Option(help="vector, bm25 or hybrid (fused by RRF).")] =
        "hybrid",
    as_json: Annotated[bool, typer.Option("--json", help="Print hits as JSON.")] = False,
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None,
    tenant: Tenant = "default",
) -> None:
    """Search a namespace: BM25, vector, or both fused (the default)."""
    import json

    filters: dict[str, list[str]] = {}
    for item in filter_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--filter {item!r} must be key=value", field="filter")
        filters.setdefault(key, []).append(value)
    hits = _namespaces(url, api_key, data_dir, tenant).search(namespace, query, k, mode,
                                                              filters or None)
    if as_json:
        print(json.dumps(hits, indent=2))
        return
    for hit in hits:
        console.print(f"[bold]{hit['score']:.3f}[/] {hit['document_id']} "
                      f"#{hit['chunk_id']}: {hit['text'][:160]}")


namespaces_app = typer.Typer(help="Retrieval namespaces, in the data dir or on a daemon.",
                             no_args_is_help=True)
app.add_typer(namespaces_app, name="namespaces")


@namespaces_app.command("list")
def namespaces_list(url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None) -> None:
    """Namespaces with their owner and document and chunk counts."""
    rows = _namespaces(url, api_key, data_dir, "default").list()
    table = Table("namespace", "owner", "shared", "documents", "chunks")
    for row in rows:
        table.add_row(row["name"], row["owner"], "yes" if row["shared"] else "",
                      str(row["documents"]), str(row["chunks"]))
    Console().print(table)


@namespaces_app.command("delete")
def namespaces_delete(
    namespace: Annotated[str, typer.Argument(help="The namespace to delete.")],
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None,
    tenant: Tenant = "default",
) -> None:
    """Delete a namespace with all its documents and its index."""
    _namespaces(url, api_key, data_dir, tenant).drop(namespace)
    console.print(f"deleted namespace {namespace}")


eval_app = typer.Typer(help="Measure quality: retrieval and answers, on labelled sets.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
def eval_retrieval(
    namespace: Annotated[str, typer.Option(help="Namespace to evaluate.")],
    queries: Annotated[Path, typer.Option(
        help='JSONL: {"query": "...", "relevant": ["document id", ...]} per line.')],
    k: Annotated[int, typer.Option(min=1, max=100, help="Cut-off for recall@k.")] = 5,
    mode: Annotated[list[str] | None, typer.Option(
        help="vector, bm25, hybrid (repeatable; default: all three, side by side).")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the summary and per-query results here.")] = None,
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None,
    tenant: Tenant = "default",
) -> None:
    """Recall@k, MRR@10 and nDCG@10 of each search mode on a labelled query set."""
    import json

    from lorag.retrieval.evaluate import evaluate, read_queries
    from lorag.retrieval.store import MODES

    labelled = read_queries(queries)
    modes = mode or list(MODES)
    for name in modes:
        if name not in MODES:
            raise InvalidRequest(f"--mode {name!r} must be one of {', '.join(MODES)}",
                                 field="mode")
    target = _namespaces(url, api_key, data_dir, tenant)
    results = [evaluate(target, namespace, labelled, k, name) for name in modes]
    table = Table("mode", f"recall@{k}", "MRR@10", "nDCG@10",
                  title=f"{namespace}: {len(labelled)} queries")
    for result in results:
        table.add_row(result["mode"], f"{result[f'recall@{k}']:.3f}",
                      f"{result['mrr@10']:.3f}", f"{result['ndcg@10']:.3f}")
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps({"namespace": namespace, "k": k, "results": results},
                                        indent=2))
        console.print(f"wrote {json_path}")


@eval_app.command("generate")
def eval_generate(
    data: Annotated[Path, typer.Option(
        help='JSONL: {"question", "answer", optional "source", "system"} per line.')],
    model: Annotated[str, typer.Option(help="The base model's name or an adapter's.")],
    url: Annotated[str, typer.Option(help="The running daemon to evaluate.")] =
        "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    rag_namespace: Annotated[str | None, typer.Option(
        help="Ground each question in this namespace (the rag extension).")] = None,
    rag_top_k: Annotated[int, typer.Option(min=1, max=20, help="Passages for rag.")] = 4,
    rag_mode: Annotated[str, typer.Option(help="vector, bm25 or hybrid.")] = "hybrid",
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: exact_match, f1, rouge_l, bleu, chrf, accuracy, format, "
             "source, retrieved.")] = "exact_match,f1,rouge_l,bleu,chrf,accuracy",
    format_schema: Annotated[Path | None, typer.Option(
        help="JSON schema the whole answer must follow (the format metric).")] = None,
    format_regex: Annotated[str | None, typer.Option(
        help="Regex the whole answer must match (the format metric).")] = None,
    answer_field: Annotated[str | None, typer.Option(
        help="Score this JSON field of the answer when it has one.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 128,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Per-example results, JSONL.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="The summary, JSON.")] =
        None,
) -> None:
    """Score a running daemon's answers on a labelled question set."""
    import json
    import re

    from lorag.evaluation import EvalOptions, evaluate, read_examples

    total = len(read_examples(data))  # every line checked before the first request
    schema = None
    if format_schema is not None:
        try:
            schema = json.loads(format_schema.read_text())
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"--format-schema {format_schema}: {e}",
                                 field="format_schema") from e
    try:
        regex = re.compile(format_regex) if format_regex else None
    except re.error as e:
        raise InvalidRequest(f"--format-regex is not a valid regex: {e}",
                             field="format_regex") from e
    options = EvalOptions(
        url=url, data=data, model=model, api_key=api_key, rag_namespace=rag_namespace,
        rag_top_k=rag_top_k, rag_mode=rag_mode,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()], schema=schema,
        regex=regex, answer_field=answer_field, max_tokens=max_tokens,
        concurrency=concurrency, out=out)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task(f"asking {model}", total=total)
        summary = evaluate(options, lambda row: progress.advance(task))
    table = Table("metric", "value", title=f"{model}"
                  + (f" + rag:{rag_namespace}" if rag_namespace else "")
                  + f" on {summary['examples']} examples")
    for key, value in summary.items():
        if key not in ("name", "model", "rag", "examples"):
            table.add_row(key, "n/a" if value is None else f"{value:.3f}")
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {json_path}")


@bench_app.command("training")
def bench_training(
    examples: Annotated[int, typer.Option(min=1, help="Chat examples generated.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for each system.")] = 16,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate for both.")] = 2e-4,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank (alpha = 2 rank).")] = 16,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON here.")] =
        None,
) -> None:
    """Plain TRL SFTTrainer defaults vs `lorag train`: tokens/s, peak RSS, final loss."""
    from lorag.benchmarks.training import main

    main(examples, steps, batch_size, lr, rank, json_path)


@bench_app.command("retrieval")
def bench_retrieval(
    sizes: Annotated[str, typer.Option(help="Comma-separated index sizes (vectors).")] =
        "100000,1000000",
    documents: Annotated[int, typer.Option(min=1, help="Documents ingested for real.")] =
        600,
    queries: Annotated[int, typer.Option(min=1, help="Embedded questions searched.")] = 200,
    nprobe: Annotated[str, typer.Option(help="Comma-separated IVF nprobe values.")] =
        "4,16,64",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON here.")] =
        None,
) -> None:
    """Ingest chunks/s through the store; flat vs IVF search p50/p99 and recall@10."""
    from lorag.benchmarks.retrieval import main

    try:
        size_list = [int(s) for s in sizes.split(",")]
        nprobes = [int(p) for p in nprobe.split(",")]
    except ValueError as e:
        raise InvalidRequest(f"--sizes and --nprobe take comma-separated integers ({e})",
                             field="sizes") from e
    main(size_list, documents, queries, nprobes, json_path)


@bench_app.command("load")
def bench_load(
    requests: Annotated[int, typer.Option(min=1, help="Concurrent streaming clients.")] = 200,
    adapters: Annotated[int, typer.Option(min=1, help="Adapters the clients use.")] = 16,
    disconnect: Annotated[float, typer.Option(
        min=0, max=1, help="Fraction of clients that hang up mid-stream.")] = 0.2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens each.")] = 32,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON here.")] =
        None,
) -> None:
    """A real daemon under concurrent streams, disconnects and adapter churn."""
    from lorag.benchmarks.load import main

    main(requests, adapters, disconnect, max_tokens, json_path)


@app.command()
def serve(
    model: Annotated[str, typer.Option(
        help="Catalog name, HF folder, .gguf file or hub id.")] = catalog.DEFAULT_BASE_MODEL,
    quantize: Annotated[str, typer.Option(help="nf4, int8 or none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="gRPC port.")] = 50051,
    adapter_root: Annotated[list[Path] | None, typer.Option(
        help="Folder adapters may be loaded from (repeatable); default <data-dir>/adapters.")]
        = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="State (SQLite, FAISS files); default $LORAG_HOME/data.")] = None,
    api_keys: Annotated[Path | None, typer.Option(
        help='JSON {"<key>": {"tenant": "<name>", "admin": false}}; without it, open.')]
        = None,
    max_model_len: Annotated[int, typer.Option(min=1, help="Longest sequence.")] = 2048,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Sequences running at once.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="Tokens per step.")] =
        1024,
    max_waiting: Annotated[int, typer.Option(min=1, help="Queue bound (then 429).")] = 1024,
    max_lora_rank: Annotated[int, typer.Option(min=1, help="Highest adapter rank.")] = 64,
    max_active_adapters: Annotated[int, typer.Option(min=1, help="Compute slots.")] = 16,
    max_cpu_adapters_mb: Annotated[int, typer.Option(min=1, help="RAM tier budget.")] = 2048,
) -> None:
    """Start the daemon: OpenAI-compatible HTTP, gRPC, adapters, metrics, in one process."""
    from lorag.server.daemon import ServeOptions
    from lorag.server.daemon import serve as run

    engine = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting,
                  max_lora_rank=max_lora_rank, max_active_adapters=max_active_adapters,
                  max_cpu_adapter_bytes=max_cpu_adapters_mb << 20)
    settings = Settings()
    run(ServeOptions(model, quantize, dtype, host, port, grpc_port,
                     (data_dir or settings.resolved_data_dir).expanduser(),
                     [r.expanduser() for r in adapter_root or []], api_keys, engine), console)
