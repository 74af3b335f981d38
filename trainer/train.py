"""`lorag train`: fine-tuning with TRL's SFTTrainer, by any method of trainer/methods.py
(LoRA by default), saved as a PEFT adapter or, for full and freeze, a complete model.

TRL does the training loop, chat templating, completion-only loss and packing; PEFT the
adapters. What is added here: options checked before anything loads, the data validated
line by line (trainer/data.py), a progress bar with loss, tokens/s and ETA, and a
`training.json` + `loss.png` beside the output recording what was trained on and how it
went (method, trainable parameters, per-step loss, eval loss, real tokens/s, peak memory,
wall time, the files written).
"""

import ctypes
import hashlib
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from lorag.errors import InvalidRequest
from lorag.models import load_base, resolve_dtype
from lorag.trainer.data import TrainingData, load_jsonl
from lorag.trainer.methods import (
    DEFAULTS,
    METHOD_OPTIONS,
    METHODS,
    check_method,
    check_targets,
    freeze_all_but_last,
    method_named,
    peft_config,
)

log = logging.getLogger("lorag.train")
TASKS = ("chat", "rerank")


@dataclass
class TrainOptions:
    """What `lorag train` takes; checked on construction, each error naming its flag.

    Options left None take the method's defaults (trainer/methods.py); one the method has
    no use for is refused, not ignored."""

    data: Path
    base: str
    out: Path
    method: str | None = None  # default: lora, or qlora with --quantize nf4
    rank: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    rslora: bool | None = None
    num_virtual_tokens: int | None = None  # prompt / prefix tuning
    prompt_init: str | None = None  # prompt tuning: start from this text's embeddings
    train_last_layers: int | None = None  # freeze: the blocks that train
    quantize: str | None = None  # none, nf4 (QLoRA: the base frozen in 4-bit) or int8
    dtype: str = "auto"
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float | None = None  # default: the method's
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024
    packing: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_split: float | None = None
    eval_data: Path | None = None
    train_on_prompt: bool = False
    save_steps: int = 50
    resume: bool = False
    task: str = "chat"  # or "rerank": a relevance adapter (trainer/relevance.py)
    rag: dict | None = None  # how RAFT built the data (trainer/raft.py), recorded
    rerank: dict | None = None  # how the relevance pairs were built, recorded

    def __post_init__(self):
        positive = ("rank", "alpha", "batch_size", "grad_accum", "max_seq_len", "save_steps",
                    "num_virtual_tokens", "train_last_layers")
        for name in positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"--{name.replace('_', '-')} must be a positive integer, "
                                     f"got {value!r}", field=name)
        checks = [
            ("dropout", self.dropout is None or 0 <= self.dropout < 1, "in [0, 1)"),
            ("lr", self.lr is None or 0 < self.lr < 1, "in (0, 1)"),
            ("epochs", self.epochs > 0, "> 0"),
            ("task", self.task in TASKS, " or ".join(TASKS)),
            ("eval_split", self.eval_split is None or 0 < self.eval_split < 1, "in (0, 1)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequest(f"--{name.replace('_', '-')} must be {allowed}, got "
                                     f"{getattr(self, name)!r}", field=name)
        if self.eval_split is not None and self.eval_data is not None:
            raise InvalidRequest("give --eval-split or --eval-data, not both", field="eval_split")
        self._resolve_method()

    def _resolve_method(self) -> None:
        """The method checked against the options given, then its defaults filled in."""
        if self.method is None:
            self.method = "qlora" if self.quantize == "nf4" else "lora"
        method = method_named(self.method)
        given = {name: getattr(self, name) for name in METHOD_OPTIONS}
        self.quantize = check_method(method, self.quantize, given,
                                     self.gradient_checkpointing, self.packing)
        if self.task == "rerank" and self.method not in ("lora", "qlora", "dora"):
            raise InvalidRequest(f"--task rerank trains a relevance adapter the daemon scores "
                                 f"with in its LoRA batch: --method lora, qlora or dora, not "
                                 f"{self.method}", field="method")
        if self.target_modules is not None:
            check_targets(method, self.target_modules)
        for name in method.options:
            if getattr(self, name) is None and name in DEFAULTS:
                setattr(self, name, DEFAULTS[name])
        if self.lr is None:
            self.lr = method.lr


def train(options: TrainOptions, console: Console | None = None) -> dict:
    """Train, save the adapter and its records under `options.out`; returns training.json."""
    console = console or Console(stderr=True)
    datasets.disable_progress_bars()  # TRL's dataset preparation; ours is the training bar
    data = load_jsonl(options.data)  # a bad line fails here, before the model loads
    train_data, eval_data = data, None
    if options.eval_data is not None:
        eval_data = load_jsonl(options.eval_data)
    elif options.eval_split is not None:
        train_data, eval_data = data.split(options.eval_split, options.seed)
    method = METHODS[options.method]
    # Mixed precision: weights the optimizer updates stay float32 (master weights) and the
    # forward pass runs in the compute dtype under autocast. A full or freeze fine-tune on
    # weights loaded in bf16 would round away every update smaller than bf16's step at
    # the weight's size (1.0 + 1e-4 is 1.0 in bf16): the norms would never move. PEFT
    # keeps an adapter's own weights in float32 over a bf16 base by itself.
    weights = options.dtype if method.adapter else "float32"
    model, tokenizer = load_base(options.base, quantize=options.quantize, dtype=weights)
    truncated, skipped = _over_length(train_data, tokenizer, options)
    if skipped == len(train_data.rows):
        raise InvalidRequest(f"every example's prompt is at least --max-seq-len "
                             f"{options.max_seq_len} tokens long, leaving nothing to train on; "
                             "raise --max-seq-len", field="max_seq_len")
    if truncated:
        console.print(f"[yellow]warning:[/] {truncated} of {len(train_data.rows)} examples "
                      f"are longer than --max-seq-len {options.max_seq_len} and will be "
                      f"truncated; {skipped} of them keep no completion token and are skipped")
    if options.quantize == "nf4" and options.gradient_checkpointing:
        # QLoRA: the 4-bit base stays frozen. PEFT's prepare_model_for_kbit_training would
        # also upcast every non-quantized weight to fp32; with a 49k-token vocabulary the
        # embedding alone then costs more than 4-bit saves, and bf16 autocast is stable
        # for these sizes, so only the part checkpointing needs is done.
        model.enable_input_require_grads()
    _release_freed_memory()  # loading's transient buffers, back to the OS
    if options.method == "freeze":
        freeze_all_but_last(model, options.train_last_layers)
    out = Path(options.out)
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, args=_sft_config(options, out),
        train_dataset=train_data.dataset(),
        eval_dataset=eval_data.dataset() if eval_data else None,
        peft_config=peft_config(method, asdict(options), tokenizer) if method.adapter
        else None)
    recorder = _Recorder(console)
    checkpoint = _last_checkpoint(out) if options.resume else None
    if checkpoint is not None:  # the steps before the interruption stay in the record
        recorder.steps = _logged_steps(checkpoint)
    trainer.remove_callback(PrinterCallback)  # our progress bar shows the logs instead
    trainer.add_callback(recorder)
    start = time.perf_counter()
    with recorder.progress:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"] if eval_data else None
    trainer.model.save_pretrained(out)
    if not method.adapter:  # a complete model folder: `lorag serve --model OUT` loads it
        tokenizer.save_pretrained(out)
    trainable, total = _parameter_counts(trainer.model)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()
                   if k not in ("rag", "rerank")},
        "data": {"path": str(options.data), "sha256": data.sha256, "format": data.format,
                 "train_examples": len(train_data.rows),
                 "eval_examples": len(eval_data.rows) if eval_data else 0,
                 "truncated": truncated, "skipped": skipped},
        "method": options.method,
        "parameters": {"trainable": trainable, "total": total,
                       "trainable_percent": round(100 * trainable / total, 4)},
        "wrote": {"kind": "adapter" if method.adapter else "model", "files": _written(out)},
        "task": options.task,
        "rag": options.rag,
        "rerank": options.rerank,
        "chat_template_sha256": hashlib.sha256(
            (tokenizer.chat_template or "").encode()).hexdigest(),
        "steps": recorder.steps,
        "final_loss": recorder.steps[-1]["loss"] if recorder.steps else None,
        "eval_loss": eval_loss,
        "global_step": trainer.state.global_step,
        "tokens_per_s": round(recorder.tokens / wall, 1) if recorder.tokens else None,
        "peak_memory_mb": recorder.peak_mb,
        "process_peak_rss_mb": _process_peak_mb(),
        "wall_s": round(wall, 1),
        "seconds_per_step": round(wall / max(trainer.state.global_step, 1), 3),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(recorder.steps, eval_loss, out / "loss.png")
    return report


def _parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters; PEFT's count where it applies (it counts a 4-bit
    weight's packed storage as the weights it holds, and a prompt encoder's own)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())  # a tied head and embedding are one parameter
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _written(out: Path) -> dict[str, int]:
    """What saving wrote to `out`, name: bytes (the records and checkpoints aside)."""
    records = {"training.json", "loss.png", "checkpoints"}
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name not in records}


def _sft_config(options: TrainOptions, out: Path) -> SFTConfig:
    # autocast to the dtype `auto` resolves to (bf16 where the CPU has it), whatever the
    # weights are stored in: a 4-bit base, float32 master weights, or a bf16 frozen base
    bf16 = resolve_dtype(options.dtype) == torch.bfloat16
    return SFTConfig(
        output_dir=str(out / "checkpoints"), num_train_epochs=options.epochs,
        max_steps=options.max_steps, learning_rate=options.lr,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, max_length=options.max_seq_len,
        packing=options.packing, gradient_checkpointing=options.gradient_checkpointing,
        completion_only_loss=not options.train_on_prompt, seed=options.seed, bf16=bf16,
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_steps=options.save_steps,
        save_total_limit=2, eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0)


def _over_length(data: TrainingData, tokenizer, options: TrainOptions) -> tuple[int, int]:
    """(examples longer than max_seq_len, examples whose completion would be cut away
    entirely: with completion-only loss TRL drops those)."""
    def lengths(row: dict) -> tuple[int, int]:
        if data.format == "text":
            return len(tokenizer.encode(row["text"])), 0
        if data.format == "pair":
            prompt = len(tokenizer.encode(row["prompt"]))
            return len(tokenizer.encode(row["prompt"] + row["completion"])), prompt
        encode = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                               add_generation_prompt=True)
        return encode(whole), encode(prompt)

    limit, truncated, skipped = options.max_seq_len, 0, 0
    for row in data.rows:
        total, prompt = lengths(row)
        truncated += total > limit
        skipped += not options.train_on_prompt and data.format != "text" and prompt >= limit
    return truncated, skipped


def _last_checkpoint(out: Path) -> Path:
    # the newest COMPLETE one: a run killed while saving leaves a checkpoint folder
    # without its trainer_state.json (the Trainer writes that file last)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"),
                         key=lambda p: int(p.name.split("-")[1]))
    complete = [c for c in checkpoints if _readable_state(c)]
    if not complete:
        raise InvalidRequest(f"--resume: no complete checkpoint under {out / 'checkpoints'}",
                             field="resume")
    return complete[-1]


def _readable_state(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((checkpoint / name).is_file()
               for name in ("adapter_model.safetensors", "model.safetensors"))


def _logged_steps(checkpoint: Path) -> list[dict]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [{"step": e["step"], "loss": round(e["loss"], 4),
             "learning_rate": e.get("learning_rate"), "tokens": int(e.get("num_tokens", 0))}
            for e in state["log_history"] if "loss" in e]


def _release_freed_memory() -> None:
    # glibc keeps freed heap pages mapped; without this, the transient of converting and
    # quantizing weights at load time would show up as training memory
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _process_peak_mb() -> float:
    # the whole process's high-water mark, model loading included (KiB on Linux)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _plot(steps: list[dict], eval_loss: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss")
    if eval_loss is not None and steps:
        axes.axhline(eval_loss, color="tab:orange", linestyle="--", label="eval loss (end)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class _Recorder(TrainerCallback):
    """Per-step loss and real (non-padding) token counts, and the progress bar."""

    def __init__(self, console: Console):
        self.steps: list[dict] = []
        self.tokens = 0
        self.peak_mb = 0.0
        self.started = time.perf_counter()
        self.progress = Progress(TextColumn("training"), BarColumn(),
                                 TextColumn("step {task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
                                 console=console)
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self._sample_memory()
        self.task = self.progress.add_task("train", total=state.max_steps,
                                           completed=state.global_step, loss="-", rate="-")

    def on_step_end(self, args, state, control, **kwargs):
        self._sample_memory()

    def _sample_memory(self) -> None:
        # training's peak: GPU tensors where there is a GPU, else the process's resident
        # memory sampled at every step (the transient of loading the model excluded)
        if torch.cuda.is_available():
            used = torch.cuda.max_memory_allocated()
        else:
            used = psutil.Process().memory_info().rss
        self.peak_mb = max(self.peak_mb, round(used / 2**20, 1))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        # TRL counts the tokens it trained on (padding excluded) as num_tokens, cumulative
        self.tokens = int(logs.get("num_tokens", self.tokens))
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.steps.append({"step": state.global_step, "loss": round(logs["loss"], 4),
                           "learning_rate": logs.get("learning_rate"), "tokens": self.tokens})
        self.progress.update(self.task, completed=state.global_step,
                             loss=f"{logs['loss']:.3f}", rate=f"{rate:,.0f}")
