"""`make demo`: fine-tuning teaches form, retrieval supplies facts, measured end to end.

1. Train the format adapter `house-style` on demo/train.jsonl (`lorag train`): it teaches the
   answer format of demo/answer.schema.json with facts from another, made-up company, so it
   can teach nothing about the one asked about.
2. Start the daemon (`lorag serve`, on the unquantized base the adapters are trained on)
   on a fresh data dir under demo-results/ and ingest two knowledge bases through it:
   demo/kb (30 pages of the fictional Kestrel Robotics, what the questions ask about) and
   demo/marlow/kb (the other company's pages).
3. Train two adapters from the other company's namespace through the daemon's own search:
   `raft-adapter` (RAFT, `lorag train --rag-namespace`: the daemon's RAG prompt, the gold
   passage in 90% of the answerable questions, an abstention to learn from the rest and
   from the unanswerable ones, asked with their own page in the prompt) and `relevance`
   (`--task rerank`: a relevance adapter for RAG's `rerank`, compared in one row with the
   embedder's late interaction, which the `+rerank` rows use). Hot-load all three.
4. Ask the held-out questions (demo/questions.jsonl: gold answers and gold source
   documents) and the unanswerable ones (demo/unanswerable.jsonl: what demo/kb never says)
   in each configuration of CONFIGS, through `lorag eval generate`'s code, so what is
   measured is what a user of the daemon gets.
5. Print the table and write demo-results/results.{json,md,png}.

Every adapter is reused on a re-run when its data and recipe are unchanged. Run as
`python -m demo.run` from the repository root (the Makefile does).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from lorag.benchmarks.daemon import DaemonProcess
from lorag.client import DaemonClient
from lorag.evaluation.generate import EvalOptions, evaluate
from lorag.retrieval.ingest import ingest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "demo-results"
BASE = "smollm2-135m-instruct"
NAMESPACE, OTHER = "kestrel", "marlow"  # asked about; what the RAFT adapters learn from
TOP_K = 3  # passages per RAG question, in training and in asking
RECIPE = ["--batch-size", "8", "--lr", "1e-3", "--rank", "16", "--alpha", "32",
          "--target-modules", "all-linear", "--save-steps", "1000"]
SCHEMA = json.loads((HERE / "answer.schema.json").read_text())


@dataclass(frozen=True)
class Adapter:
    """One adapter the demo trains: its name, `lorag train` flags, and the files its
    training reads (their bytes and the flags decide whether a re-run trains again)."""

    name: str
    flags: list[str]
    inputs: list[Path]
    on_daemon: bool = False  # searches the daemon's namespace (--url)


MARLOW = [HERE / "marlow" / "questions.jsonl", *sorted((HERE / "marlow" / "kb").iterdir())]
ADAPTERS = [
    Adapter("house-style", ["--data", str(HERE / "train.jsonl"), "--max-steps", "30",
                            *RECIPE], [HERE / "train.jsonl"]),
    Adapter("raft-adapter", ["--data", str(MARLOW[0]), "--rag-namespace", OTHER,
                             "--rag-top-k", str(TOP_K), "--answer-format", "json",
                             "--oracle-p", "0.9", "--rag-draws", "4", "--epochs", "1",
                             *RECIPE], MARLOW,
            on_daemon=True),
    Adapter("relevance", ["--task", "rerank", "--data", str(MARLOW[0]), "--rag-namespace",
                          OTHER, "--epochs", "1", *RECIPE], MARLOW, on_daemon=True)]
# rag.rerank's rerankers: late interaction on the daemon's embedder (named by the
# embedding model), and the relevance adapter trained above
RERANKER, RELEVANCE = "all-minilm-l6-v2", "relevance"


class Config(NamedTuple):
    """One way of asking: the model, with rag or not, with the schema as response_format
    (and `source` limited to the packed passages by rag.cite), reranked by `reranker`."""

    name: str
    model: str
    rag: bool = False
    schema: bool = False
    reranker: str | None = None
    cite: bool = False


CONFIGS = [
    Config("base", BASE), Config("base+rag", BASE, rag=True),
    Config("base+rag+rerank", BASE, rag=True, reranker=RERANKER),
    Config("adapter", "house-style"), Config("adapter+rag", "house-style", rag=True),
    Config("raft-adapter+rag", "raft-adapter", rag=True),
    Config("raft-adapter+rag+rerank", "raft-adapter", rag=True, reranker=RERANKER),
    Config("raft-adapter+rag+relevance", "raft-adapter", rag=True, reranker=RELEVANCE),
    Config("raft-adapter+rag+cite", "raft-adapter", rag=True, schema=True, cite=True),
    Config("raft-adapter+rag+rerank+cite", "raft-adapter", rag=True, schema=True,
           reranker=RERANKER, cite=True),
    Config("base+rag+schema", BASE, rag=True, schema=True),
    Config("adapter+rag+schema", "house-style", rag=True, schema=True)]
COLUMNS = [("accuracy", "factual accuracy"), ("format", "format adherence"),
           ("source", "cites gold source"), ("abstain", "abstains on unanswerable"),
           ("false_abstain", "declines answerable"), ("stopped", "stops by itself"),
           ("f1", "F1"), ("latency_p50_s", "latency p50 (s)")]
SHORT = ["accuracy", "format", "source", "abstain", "declines", "stops", "F1", "p50 s"]
PERCENT = {"accuracy", "format", "source", "abstain", "false_abstain", "stopped"}
console = Console(stderr=True)


def train(adapter: Adapter, folder: Path, url: str | None = None) -> dict:
    """Train `adapter` into `folder`, unless the same data and recipe already made it."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in adapter.inputs)
                            + " ".join(adapter.flags).encode()).hexdigest()
    stamp = folder / "demo-recipe.sha256"
    if stamp.exists() and stamp.read_text() == digest and \
            (folder / "adapter_model.safetensors").exists():
        console.print(f"[green]reusing[/] {adapter.name} in {folder} (same data and recipe)")
        return json.loads((folder / "training.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    console.rule(f"training {adapter.name}")
    on_daemon = ["--url", url, "--dump-examples", str(OUT / f"{adapter.name}-examples.jsonl")] \
        if adapter.on_daemon else []
    subprocess.run([sys.executable, "-m", "lorag", "train", "--out", str(folder),
                    *adapter.flags, *on_daemon], check=True, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stamp.write_text(digest)
    return json.loads((folder / "training.json").read_text())


def start_daemon(data_dir: Path, log: Path) -> DaemonProcess:
    """`lorag serve` on `data_dir`, loading adapters from the ones the demo trains, on the
    unquantized base they were trained on (`lorag train`'s default): on this 135M model
    (270 MB in bf16) NF4 cost every configuration 13-24 points of accuracy, measured with
    the same adapters (README)."""
    return DaemonProcess(data_dir, ["--adapter-root", str(OUT / "adapters"),
                                    "--max-model-len", "2048", "--quantize", "none"], log)


def main() -> dict:
    OUT.mkdir(exist_ok=True)
    adapters = OUT / "adapters"
    training = {ADAPTERS[0].name: train(ADAPTERS[0], adapters / ADAPTERS[0].name)}
    data_dir = OUT / "data"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh daemon state every run
    console.rule("the daemon and its knowledge bases")
    daemon = start_daemon(data_dir, OUT / "daemon.log")
    questions = OUT / "questions.jsonl"  # the answerable questions, then the unanswerable
    questions.write_text((HERE / "questions.jsonl").read_text()
                         + (HERE / "unanswerable.jsonl").read_text())
    try:
        client = DaemonClient(daemon.url)
        for namespace, kb in ((NAMESPACE, HERE / "kb"), (OTHER, HERE / "marlow" / "kb")):
            counts = ingest(client, namespace, [kb])
            console.print(f"ingested {kb.relative_to(ROOT)} into {namespace!r}: "
                          f"{counts['added']} documents")
        for adapter in ADAPTERS:
            if adapter.on_daemon:
                training[adapter.name] = train(adapter, adapters / adapter.name, daemon.url)
            client.load_adapter(adapter.name, str(adapters / adapter.name))
        console.rule(f"{len(CONFIGS)} configurations on the held-out questions")
        results = {}
        for config in CONFIGS:
            start = time.perf_counter()
            results[config.name] = evaluate(ask(config, daemon.url, questions))
            console.print(f"{config.name}: {results[config.name]['examples']} questions in "
                          f"{time.perf_counter() - start:.0f} s")
    finally:
        daemon.stop()
    report = {name: {key: results[name].get(key) for key, _ in COLUMNS + [("retrieved", "")]}
              for name in results}
    write(report, training)
    return report


def ask(config: Config, url: str, questions: Path) -> EvalOptions:
    """`lorag eval generate`'s options for one configuration."""
    return EvalOptions(
        url=url, data=questions, model=config.model, name=config.name,
        metrics=["accuracy", "format", "source", "f1", "abstain"] +
        (["retrieved"] if config.rag else []),
        rag_namespace=NAMESPACE if config.rag else None, rag_top_k=TOP_K,
        rag_rerank_model=config.reranker, rag_cite="source" if config.cite else None,
        schema=SCHEMA, answer_field="answer", max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": SCHEMA}} if config.schema else None,
        out=OUT / f"{config.name}.jsonl")


def write(report: dict, training: dict) -> None:
    table = Table("configuration", *SHORT,
                  title="Kestrel Robotics: 30 held-out questions (demo/questions.jsonl) and "
                        "10 unanswerable ones (demo/unanswerable.jsonl)")
    table.columns[0].no_wrap = True
    rows = []
    for name, metrics in report.items():
        cells = [_cell(metrics[key], key) for key, _ in COLUMNS]
        table.add_row(name, *cells)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    Console().print(table)
    (OUT / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    header = "| configuration | " + " | ".join(label for _, label in COLUMNS) + " |"
    (OUT / "results.md").write_text("\n".join([
        header, "|" + "---|" * (len(COLUMNS) + 1), *rows, "",
        *(f"{name}: {run['global_step']} steps, final loss {run['final_loss']}, "
          f"{run['wall_s']} s of training." for name, run in training.items()), ""]))
    plot(report, OUT / "results.png")
    console.print(f"wrote {OUT / 'results.md'}, results.json, results.png and per-question "
                  "JSONL files")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(key, label) for key, label in COLUMNS if key != "latency_p50_s"]
    figure, axis = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(report)
    for i, (name, values) in enumerate(report.items()):
        axis.bar([m + i * width for m in range(len(metrics))],
                 [values[key] or 0 for key, _ in metrics], width, label=name)
    axis.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))],
                    [label for _, label in metrics])
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of questions / score")
    axis.set_title("Fine-tuning teaches form, retrieval supplies facts")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if key == "latency_p50_s" else f"{value:.0%}" \
        if key in PERCENT else f"{value:.3f}"


if __name__ == "__main__":
    main()
