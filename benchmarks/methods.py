"""`lorag bench methods`: every `lorag train --method`, on the same data and steps, measured
side by side: the fine-tuning literature's comparison table, on this machine.

The data: the demo's house-style task (`demo/train.jsonl`: a question with passages, the
answer as `{"answer", "source"}`), its last HELD_OUT examples kept out of training, and a
facts-in-the-weights task: the 30 pages of `demo/kb` (a made-up company) as chats ("tell
me about ...", the page), with `demo/questions.jsonl` asked afterwards with no passages.
Each method trains on both together, in its own process (its memory its own), forked from
a server that imported the trainer once, through `lorag train`'s own `train()`.

What each row reports: trainable parameters (count and % of the model), the training
process's peak resident memory, seconds per step and tokens per second (training.json),
size on disk, and on held-out data: format adherence and accuracy on the house-style task,
accuracy on the facts task, and forgetting. Forgetting is measured on a fixed neutral set
(`benchmarks/data/neutral.jsonl`, general questions none of the data touches): the base
model's own greedy answers are fed to the tuned model (teacher forcing), and the row gives
the share of those tokens the tuned model would also pick first (agreement; 100% = no
drift) and the mean KL divergence KL(base || tuned) of its next-token distributions there.

Evaluation runs in this process after all training, in float32 (QLoRA on its NF4 base),
greedy, batched with left padding. Prints JSON; `--chart` draws the table.
"""

import json
import multiprocessing
import random
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorag import catalog
from lorag.benchmarks.stats import print_json
from lorag.errors import InvalidRequest
from lorag.evaluation.generate import read_examples
from lorag.evaluation.scoring import contains, follows_schema
from lorag.trainer.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
NEUTRAL = Path(__file__).resolve().parent / "data" / "neutral.jsonl"
HELD_OUT = 24  # house-style examples kept out of training


@dataclass
class Workload:
    model: str = catalog.DEFAULT_BASE_MODEL
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 60
    batch_size: int = 8
    dtype: str = "auto"  # training's; evaluation is float32
    held_out: int = HELD_OUT  # house-style examples evaluated
    facts: int = 30  # facts questions asked
    neutral: int = 24  # neutral prompts for forgetting
    neutral_tokens: int = 32  # of the base's greedy answer, per neutral prompt
    max_new_tokens: int = 48
    seed: int = 0


def build_data(folder: Path, workload: Workload) -> tuple[Path, list[dict], list[dict]]:
    """The training file (house style + facts pages, shuffled), the held-out house-style
    chats, and the facts questions."""
    style = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    held_out = style[-HELD_OUT:][:workload.held_out]
    pages = [_page_chat(path) for path in sorted((DEMO / "kb").glob("*.md"))]
    rows = style[:-HELD_OUT] + pages
    random.Random(workload.seed).shuffle(rows)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions = read_examples(DEMO / "questions.jsonl")[:workload.facts]
    return data, held_out, questions


def _page_chat(path: Path) -> dict:
    title, _, body = path.read_text().partition("\n")
    return {"messages": [
        {"role": "user", "content": f"What do you know about Kestrel Robotics' "
                                    f"{title.lstrip('# ').strip().lower()}?"},
        {"role": "assistant", "content": body.strip()}]}


def train_all(data: Path, folder: Path, workload: Workload) -> dict[str, dict]:
    """Each method in its own forked process; training.json of each, or its error."""
    # forked from a fork server that imported the trainer once and never ran OpenMP (a
    # fork of a process that has, a test runner say, can hang in the child's first matmul)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lorag.trainer.train", "matplotlib.pyplot"])
    reports = {}
    for name in workload.methods:
        out = folder / name
        if (out / "training.json").is_file():  # trained there before, same workload
            reports[name] = json.loads((out / "training.json").read_text())
            continue
        process = context.Process(target=_train_one, args=(name, data, out, workload))
        process.start()
        process.join()
        record = out / "training.json"
        reports[name] = json.loads(record.read_text()) if process.exitcode == 0 and \
            record.is_file() else {"error": (folder / f"{name}.error").read_text()
                                   if (folder / f"{name}.error").is_file()
                                   else f"exit code {process.exitcode}"}
    return reports


def _train_one(name: str, data: Path, out: Path, workload: Workload) -> None:
    import io

    from rich.console import Console

    from lorag.trainer.train import TrainOptions, train

    try:  # each method's defaults (freeze: the last 2 blocks)
        train(TrainOptions(data=data, base=workload.model, out=out, method=name,
                           max_steps=workload.steps, batch_size=workload.batch_size,
                           dtype=workload.dtype, seed=workload.seed, save_steps=10**9),
              Console(file=io.StringIO()))
    except BaseException:
        (out.parent / f"{name}.error").write_text(traceback.format_exc())
        sys.exit(1)


class Evaluator:
    """The base's reference answers on the neutral set, computed once, and each tuned
    model's scores."""

    def __init__(self, workload: Workload, held_out: list[dict], questions: list[dict]):
        import torch

        from lorag.models import load_base

        self.workload, self.held_out, self.questions = workload, held_out, questions
        self.schema = json.loads((DEMO / "answer.schema.json").read_text())
        base, self.tokenizer = load_base(workload.model, quantize="none", dtype="float32")
        self.tokenizer.padding_side = "left"
        prompts = [json.loads(line)["prompt"] for line in
                   NEUTRAL.read_text().splitlines()][:workload.neutral]
        chats = [[{"role": "user", "content": p}] for p in prompts]
        self.neutral = []  # (prompt + the base's greedy answer, the prompt's length)
        for chat, answer in zip(chats, self.greedy(base, chats, workload.neutral_tokens),
                                strict=True):
            ids = self.prompt_ids(chat)
            self.neutral.append((torch.tensor([ids + answer]), len(ids)))
        self.reference = [self.next_token_logprobs(base, ids, start)
                          for ids, start in self.neutral]
        self.base_scores = self.scores(base)

    def prompt_ids(self, chat: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]

    def greedy(self, model, chats: list[list[dict]], max_new: int) -> list[list[int]]:
        """Greedy continuations, eight at a time (left-padded)."""
        import torch

        answers = []
        for start in range(0, len(chats), 8):
            batch = self.tokenizer.pad({"input_ids": [self.prompt_ids(c) for c in
                                                      chats[start:start + 8]]},
                                       return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new, min_new_tokens=1,
                                     do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                answers.append([t for t in row if t != self.tokenizer.pad_token_id])
        return answers

    def texts(self, model, chats: list[list[dict]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in self.greedy(model, chats, self.workload.max_new_tokens)]

    @staticmethod
    def next_token_logprobs(model, ids, start: int):
        """Log-probabilities of the next token at each answer position of `ids`."""
        import torch

        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -ids.shape[1]:]  # after virtual tokens
        return torch.log_softmax(logits[start - 1:-1].float(), dim=-1)

    def scores(self, model) -> dict:
        """Task scores and drift from the base for `model`."""
        import torch

        style = self.texts(model, [row["messages"][:-1] for row in self.held_out])
        golds = [json.loads(row["messages"][-1]["content"]) for row in self.held_out]
        facts = self.texts(model, [[{"role": "user", "content": q["question"]}]
                                   for q in self.questions])
        agree, kl, tokens = 0.0, 0.0, 0
        for (ids, start), reference in zip(self.neutral, self.reference, strict=True):
            tuned = self.next_token_logprobs(model, ids, start)
            agree += (tuned.argmax(-1) == ids[0, start:]).sum().item()
            kl += torch.nn.functional.kl_div(tuned, reference, log_target=True,
                                             reduction="sum").item()
            tokens += tuned.shape[0]
        return {
            "format": _share(follows_schema(a, self.schema) for a in style),
            "task_accuracy": _share(self.right(a, g) for a, g in zip(style, golds,
                                                                     strict=True)),
            "facts_accuracy": _share(contains(a, q["answer"]) for a, q in
                                     zip(facts, self.questions, strict=True)),
            "agreement_with_base": round(agree / tokens, 4),
            "kl_from_base": round(kl / tokens, 4),
        }

    def right(self, answer: str, gold: dict) -> bool:
        """In the house style, with the gold answer in it and the gold page cited."""
        if not follows_schema(answer, self.schema):
            return False
        value = json.loads(answer.strip())
        return bool(contains(value["answer"], gold["answer"])) and \
            value["source"] == gold["source"]

    def tuned(self, name: str, out: Path):
        """The model `name` trained, as it is served: a complete model, or the base (NF4
        for QLoRA) with the PEFT adapter."""
        from peft import PeftModel

        from lorag.models import load_base

        if not METHODS[name].adapter:
            return load_base(str(out), quantize="none", dtype="float32")[0]
        base, _ = load_base(self.workload.model, quantize="nf4" if name == "qlora" else
                            "none", dtype="float32")
        return PeftModel.from_pretrained(base, out).eval()


def _share(values) -> float:
    values = [bool(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0


def row(report: dict, scores: dict) -> dict:
    """One method's row: training.json's figures and the held-out scores."""
    params = report["parameters"]
    return {"trainable_parameters": params["trainable"],
            "trainable_percent": params["trainable_percent"],
            "peak_memory_mb": report["peak_memory_mb"],
            "seconds_per_step": report["seconds_per_step"],
            "tokens_per_s": report["tokens_per_s"],
            "size_on_disk_mb": round(sum(report["wrote"]["files"].values()) / 2**20, 3),
            "final_loss": report["final_loss"], "lr": report["config"]["lr"],
            "quantize": report["config"]["quantize"], **scores}


# what makes two runs' trained methods comparable: a folder keeps its own
TRAINING = ("model", "steps", "batch_size", "dtype", "seed")


def use_folder(folder: Path | None, workload: Workload) -> Path:
    """Where the methods train: a new temporary folder, or `folder`, whose methods
    already trained with the same workload are reused (a long run can be resumed, or
    widened by more methods)."""
    if folder is None:
        return Path(tempfile.mkdtemp(prefix="lorag-bench-methods-"))
    folder.mkdir(parents=True, exist_ok=True)
    record, wanted = folder / "workload.json", {k: asdict(workload)[k] for k in TRAINING}
    if record.is_file() and json.loads(record.read_text()) != wanted:
        raise InvalidRequest(f"--folder {folder} holds methods trained with "
                             f"{record.read_text().strip()}, not {json.dumps(wanted)}: "
                             "give another folder", field="folder")
    record.write_text(json.dumps(wanted) + "\n")
    return folder


def main(workload: Workload, json_path: Path | None = None, chart: Path | None = None,
         folder: Path | None = None) -> dict:
    from lorag.models import cpu_has_bf16, resolve_dtype

    folder = use_folder(folder, workload)
    data, held_out, questions = build_data(folder, workload)
    reports = train_all(data, folder, workload)
    evaluator = Evaluator(workload, held_out, questions)
    rows = {"base": evaluator.base_scores}
    for name, report in reports.items():
        if "error" in report:
            rows[name] = report
            continue
        rows[name] = row(report, evaluator.scores(evaluator.tuned(name, folder / name)))
    result = {"workload": asdict(workload),
              "machine": {"cpu_bf16": cpu_has_bf16(),
                          "train_dtype": str(resolve_dtype(workload.dtype)).removeprefix(
                              "torch."), "eval_dtype": "float32"},
              "data": {"train_examples": len(data.read_text().splitlines()),
                       "held_out": len(held_out), "facts_questions": len(questions),
                       "neutral_prompts": len(evaluator.neutral)},
              "methods": rows, "folder": str(folder)}
    print_json(result, json_path)
    if chart:
        draw(result, Path(chart))
    return result


PANELS = [("trainable_percent", "trainable parameters (% of model, log)", True),
          ("peak_memory_mb", "training peak memory (MB)", False),
          ("seconds_per_step", "seconds per step", False),
          ("task_accuracy", "house-style task accuracy (held out)", False),
          ("facts_accuracy", "facts-in-the-weights accuracy", False),
          ("agreement_with_base", "agreement with the base on neutral prompts", False)]


SHARES = ("task_accuracy", "facts_accuracy", "agreement_with_base")


def draw(result: dict, path: Path) -> None:
    """Six panels, one bar per method (the base's own scores where it has them)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = {name: r for name, r in result["methods"].items() if "error" not in r}
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for axis, (key, title, log) in zip(axes.flat, PANELS, strict=True):
        names = [name for name, r in rows.items() if key in r]
        axis.barh(names, [rows[name][key] for name in names],
                  color=["tab:gray" if n == "base" else "tab:blue" for n in names])
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        if log:
            axis.set_xscale("log")
        elif key in SHARES:
            axis.set_xlim(0, 1)
    machine = result["machine"]
    figure.suptitle(f"lorag bench methods: {result['workload']['model']}, "
                    f"{result['workload']['steps']} steps each, trained in "
                    f"{machine['train_dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
