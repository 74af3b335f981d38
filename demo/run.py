"""`make demo`: fine-tuning teaches form, retrieval supplies facts, measured end to end.

1. Train a LoRA adapter on demo/train.jsonl (`lorag train`): it teaches the answer format
   of demo/answer.schema.json with facts from another, made-up company, so it can teach
   nothing about the one asked about. Reused on a re-run when the data is unchanged.
2. Start the daemon (`lorag serve`) on a fresh data dir under demo-results/, ingest the
   knowledge base demo/kb (30 pages of the fictional Kestrel Robotics) into a namespace
   through the daemon, and hot-load the adapter.
3. Ask the held-out questions (demo/questions.jsonl: gold answers and gold source
   documents) in six configurations: base; base + RAG; adapter; adapter + RAG; and both
   RAG ones again with the answer schema as `response_format` (constrained decoding),
   through `lorag eval generate`'s code, so what is measured is what a user of the daemon
   gets: the grammar guarantees syntax, the adapter brings content, citing and stopping.
4. Print the table and write demo-results/results.{json,md,png}.

Run as `python -m demo.run` from the repository root (the Makefile does).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
ADAPTER = "house-style"
NAMESPACE = "kestrel"
TRAIN = ["--max-steps", "30", "--batch-size", "8", "--lr", "1e-3", "--rank", "16",
         "--alpha", "32", "--target-modules", "all-linear", "--save-steps", "1000"]
SCHEMA = json.loads((HERE / "answer.schema.json").read_text())
CONFIGS = [  # (name, model, with rag, with the schema as response_format)
    ("base", BASE, False, False), ("base+rag", BASE, True, False),
    ("adapter", ADAPTER, False, False), ("adapter+rag", ADAPTER, True, False),
    ("base+rag+schema", BASE, True, True), ("adapter+rag+schema", ADAPTER, True, True)]
COLUMNS = [("accuracy", "factual accuracy"), ("format", "format adherence"),
           ("source", "cites gold source"), ("stopped", "stops by itself"), ("f1", "F1"),
           ("rouge_l", "ROUGE-L"), ("latency_p50_s", "latency p50 (s)")]
SHORT = ["accuracy", "format", "source", "stops", "F1", "ROUGE-L", "p50 s"]  # 80 columns
console = Console(stderr=True)


def train_adapter(folder: Path) -> dict:
    """The format adapter; trained again only when the data or the recipe changed."""
    data = HERE / "train.jsonl"
    digest = hashlib.sha256(data.read_bytes() + " ".join(TRAIN).encode()).hexdigest()
    stamp = folder / "demo-recipe.sha256"
    if stamp.exists() and stamp.read_text() == digest and \
            (folder / "adapter_model.safetensors").exists():
        console.print(f"[green]reusing[/] the adapter in {folder} (same data and recipe)")
        return json.loads((folder / "training.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    console.rule("1/3 training the format adapter")
    subprocess.run([sys.executable, "-m", "lorag", "train", "--data", str(data),
                    "--out", str(folder), *TRAIN], check=True, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stamp.write_text(digest)
    return json.loads((folder / "training.json").read_text())


def main() -> dict:
    OUT.mkdir(exist_ok=True)
    adapters = OUT / "adapters"
    training = train_adapter(adapters / ADAPTER)
    data_dir = OUT / "data"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh daemon state every run
    console.rule("2/3 daemon, knowledge base, adapter")
    daemon = DaemonProcess(data_dir, ["--adapter-root", str(adapters),
                                      "--max-model-len", "2048"], OUT / "daemon.log")
    try:
        client = DaemonClient(daemon.url)
        counts = ingest(client, NAMESPACE, [HERE / "kb"])
        console.print(f"ingested demo/kb into {NAMESPACE!r}: {counts['added']} documents")
        client.load_adapter(ADAPTER, str(adapters / ADAPTER))
        console.rule("3/3 six configurations on the held-out questions")
        results = {}
        for name, model, rag, constrained in CONFIGS:
            start = time.perf_counter()
            options = EvalOptions(
                url=daemon.url, data=HERE / "questions.jsonl", model=model, name=name,
                metrics=["accuracy", "format", "source", "f1", "rouge_l"] +
                (["retrieved"] if rag else []),
                rag_namespace=NAMESPACE if rag else None, rag_top_k=3,
                schema=SCHEMA, answer_field="answer", max_tokens=64,
                response_format={"type": "json_schema", "json_schema": {
                    "name": "answer", "schema": SCHEMA}} if constrained else None,
                out=OUT / f"{name}.jsonl")
            results[name] = evaluate(options)
            console.print(f"{name}: {results[name]['examples']} questions in "
                          f"{time.perf_counter() - start:.0f} s")
    finally:
        daemon.stop()
    report = {name: {key: results[name].get(key) for key, _ in COLUMNS + [("retrieved", "")]}
              for name in results}
    write(report, training)
    return report


def write(report: dict, training: dict) -> None:
    table = Table("configuration", *SHORT,
                  title="30 held-out questions about Kestrel Robotics (demo/questions.jsonl)")
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
        f"Adapter: {training['global_step']} steps on demo/train.jsonl, final loss "
        f"{training['final_loss']}, {training['wall_s']} s of training.", ""]))
    plot(report, OUT / "results.png")
    console.print(f"wrote {OUT / 'results.md'}, results.json, results.png and per-question "
                  "JSONL files")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(key, label) for key, label in COLUMNS if key != "latency_p50_s"]
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(report)
    for i, (name, values) in enumerate(report.items()):
        axis.bar([m + i * width for m in range(len(metrics))],
                 [values[key] or 0 for key, _ in metrics], width, label=name)
    axis.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))],
                    [label for _, label in metrics])
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of questions / score")
    axis.set_title("Fine-tuning teaches form, retrieval supplies facts")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(report))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if key == "latency_p50_s" else f"{value:.0%}" \
        if key in ("accuracy", "format", "source", "stopped") else f"{value:.3f}"


if __name__ == "__main__":
    main()
