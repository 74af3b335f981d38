"""`lorag eval retrieval|generate`: quality on labelled sets, side by side."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorag.cli.common import (
    DEFAULT_URL,
    ApiKey,
    DaemonUrl,
    DataDir,
    State,
    Tenant,
    Url,
    console,
    group,
)
from lorag.cli.retrieval import namespaces_at
from lorag.errors import InvalidRequest
from lorag.retrieval import RAG_MAX_TOP_K, RAG_TOP_K, SEARCH_MODE

app = group("Measure quality: retrieval and answers, on labelled sets.")


@app.command("corpus")
def eval_corpus(
    out: Annotated[Path, typer.Option(help="Folder to write the corpus and questions to.")],
) -> None:
    """Write real documentation to measure on: the Python Language Reference's sections
    (documents.jsonl, for `lorag ingest`), a made-up question per section to train a
    relevance adapter on (train-questions.jsonl), and 60 held-out questions labelled with
    their section (questions.jsonl)."""
    from lorag.evaluation.corpora import write_python_reference

    for name, path in write_python_reference(out).items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        console.print(f"{name}: {path} ({lines} lines)")


@app.command("retrieval")
def eval_retrieval(
    namespace: Annotated[str, typer.Option(help="Namespace to evaluate.")],
    queries: Annotated[Path, typer.Option(
        help='JSONL: {"query": "...", "relevant": ["document id", ...]} per line.')],
    k: Annotated[int, typer.Option(min=1, max=100, help="Cut-off for recall@k.")] = 5,
    mode: Annotated[list[str] | None, typer.Option(
        help="vector, bm25, hybrid (repeatable; default: all three, side by side).")] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the summary and per-query results here.")] = None,
    rerank_model: Annotated[str | None, typer.Option(
        help="A reranker on the daemon at --url (a relevance adapter, or the embedding "
             "model's name for late interaction): adds a row of hybrid search reranked by "
             "it, as rag.rerank does.")] = None,
    url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None, state: State = None,
    tenant: Tenant = "default",
) -> None:
    """Recall@1/k/10 and MRR@10 of each search mode on a labelled query set (a query file,
    or a question file's sources), and each stage's time per query; --json adds nDCG@10
    and every query's ranking."""
    import json

    from lorag.evaluation.retrieval import evaluate, read_queries
    from lorag.retrieval.rerank import fused
    from lorag.retrieval.store import MODES

    labelled = read_queries(queries)
    modes = mode or list(MODES)
    for name in modes:
        if name not in MODES:
            raise InvalidRequest(f"--mode {name!r} must be one of {', '.join(MODES)}",
                                 field="mode")
    if rerank_model is not None and not url:
        raise typer.BadParameter("reranking runs on a daemon: give --url", param_hint="--url")
    target = namespaces_at(url, api_key, data_dir, state, tenant)
    results = [evaluate(target, namespace, labelled, k, name) for name in modes]
    if rerank_model is not None:
        def rerank(query: str, texts: list[str]) -> list[int]:  # as rag.rerank orders
            scores = [0.0] * len(texts)
            for result in target.rerank(rerank_model, query, texts):
                scores[result["index"]] = result["relevance_score"]
            return fused(scores)

        results.append(evaluate(target, namespace, labelled, k, "hybrid", rerank))
    cutoffs = sorted({1, k, 10})
    stages = ["search_ms"] + (["rerank_ms"] if rerank_model is not None else [])
    table = Table("mode", *(f"R@{c}" for c in cutoffs), "MRR@10",
                  *(f"{stage.removesuffix('_ms')} ms" for stage in stages),
                  title=f"{namespace}: {len(labelled)} queries; per stage, ms p50/p99")
    for result in results:
        times = [result.get(stage) for stage in stages]
        table.add_row(result["mode"], *(f"{result[f'recall@{c}']:.3f}" for c in cutoffs),
                      f"{result['mrr@10']:.3f}",
                      *(f"{t['p50']:.0f}/{t['p99']:.0f}" if t else "-" for t in times))
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps({"namespace": namespace, "k": k, "results": results},
                                        indent=2))
        console.print(f"wrote {json_path}")


@app.command("generate")
def eval_generate(
    data: Annotated[Path, typer.Option(
        help='JSONL: {"question", "answer", optional "source", "system"} per line.')],
    model: Annotated[str, typer.Option(help="The base model's name or an adapter's.")],
    url: DaemonUrl = DEFAULT_URL,
    api_key: ApiKey = None,
    rag_namespace: Annotated[str | None, typer.Option(
        help="Ground each question in this namespace (the rag extension).")] = None,
    rag_top_k: Annotated[int, typer.Option(
        min=1, max=RAG_MAX_TOP_K, help="Passages for rag.")] = RAG_TOP_K,
    rag_mode: Annotated[str, typer.Option(help="vector, bm25 or hybrid.")] = SEARCH_MODE,
    rag_rerank_model: Annotated[str | None, typer.Option(
        help="Rerank rag's candidates with this relevance adapter (rag.rerank).")] = None,
    rag_cite: Annotated[str | None, typer.Option(
        help="The --response-format schema's property that may only name a passage rag "
             "packed, or none (rag.cite).")] = None,
    metrics: Annotated[str, typer.Option(
        help="Comma-separated: exact_match, f1, rouge_l, bleu, chrf, accuracy, format, "
             "source, retrieved, abstain (unanswerable questions declined), supported (the "
             "answer's words in its passage).")] = "exact_match,f1,rouge_l,bleu,chrf,accuracy",
    abstain_answer: Annotated[str | None, typer.Option(
        help="The abstention the model was trained to give (RAFT's --abstain-answer); "
             "common 'not in the sources' phrases count too.")] = None,
    format_schema: Annotated[Path | None, typer.Option(
        help="JSON schema the whole answer must follow (the format metric).")] = None,
    format_regex: Annotated[str | None, typer.Option(
        help="Regex the whole answer must match (the format metric).")] = None,
    answer_field: Annotated[str | None, typer.Option(
        help="Score this JSON field of the answer when it has one.")] = None,
    response_format: Annotated[Path | None, typer.Option(
        help='JSON file with an OpenAI response_format, sent with every question: '
             '{"type": "json_schema", "json_schema": {"name", "schema"}} or '
             '{"type": "json_object"} (constrained decoding).')] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 128,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Per-example results, JSONL.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="The summary, JSON.")] =
        None,
) -> None:
    """Score a running daemon's answers on a labelled question set."""
    import json
    import re

    from lorag.evaluation.generate import EvalOptions, evaluate, read_examples

    total = len(read_examples(data))  # every line checked before the first request
    schema = _json_file(format_schema, "format_schema")
    constrained = _json_file(response_format, "response_format")
    if constrained is not None and not isinstance(constrained, dict):
        raise InvalidRequest(f"--response-format {response_format}: must hold a JSON object "
                             '({"type": ...}), got ' + type(constrained).__name__,
                             field="response_format")
    try:
        regex = re.compile(format_regex) if format_regex else None
    except re.error as e:
        raise InvalidRequest(f"--format-regex is not a valid regex: {e}",
                             field="format_regex") from e
    options = EvalOptions(
        url=url, data=data, model=model, api_key=api_key, rag_namespace=rag_namespace,
        rag_top_k=rag_top_k, rag_mode=rag_mode, rag_rerank_model=rag_rerank_model,
        rag_cite=rag_cite, metrics=[m.strip() for m in metrics.split(",") if m.strip()],
        schema=schema, regex=regex, answer_field=answer_field, response_format=constrained,
        max_tokens=max_tokens, abstain_answer=abstain_answer,
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
        if key not in ("name", "model", "rag", "reranker", "examples"):
            table.add_row(key, "n/a" if value is None else f"{value:.3f}")
    Console().print(table)
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {json_path}")


def _json_file(path: Path | None, option: str):
    """The JSON in the file an option names; None when not given."""
    import json

    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"--{option.replace('_', '-')} {path}: {e}", field=option) from e
