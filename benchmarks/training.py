"""`lorag bench training`: the same data and LoRA config through plain TRL and `lorag train`.

Each system runs in its own process, so peak RSS is its own. "Plain TRL" is what a user
writes from TRL's docs: the model from `from_pretrained` (its saved dtype), a PEFT
LoraConfig, `SFTConfig` defaults apart from the shared settings (steps, batch, learning
rate) and `use_cpu` where there is no GPU. Tokens/s counts real (non-padding) tokens,
from TRL's own `num_tokens`. The losses differ in definition: plain TRL on chat data
trains on every token, `lorag train` on the final assistant turn. Prints JSON.

Run as a module (`python -m lorag.benchmarks.training plain-trl JOB.json`) it is the plain-TRL
side of the comparison.
"""

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorag import catalog
from lorag.benchmarks.stats import print_json
from lorag.provision import ModelCache
from lorag.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["river", "lamp", "orbit", "cedar", "piano", "harbor", "maple", "comet", "violet",
         "granite", "falcon", "meadow", "copper", "lantern", "glacier", "saffron"]


def make_data(path: Path, examples: int, seed: int = 0) -> None:
    """Chat examples of mixed lengths in one distinctive answer format."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(examples):
            topic = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
            answer = "VERDICT: " + " ".join(rng.choices(WORDS, k=rng.randint(4, 40))) + " [done]"
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": answer}]}) + "\n")


def run_lorag(data: Path, out: Path, steps: int, batch: int, lr: float, rank: int) -> dict:
    command = [sys.executable, "-m", "lorag", "train", "--data", str(data), "--out", str(out),
               "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
               "--rank", str(rank), "--alpha", str(2 * rank)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": done.stdout[-2000:] + done.stderr[-2000:]}
    report = json.loads((out / "training.json").read_text())
    return {"tokens_per_s": report["tokens_per_s"], "peak_rss_mb": report["process_peak_rss_mb"],
            "final_loss": report["final_loss"], "wall_s": report["wall_s"]}


def run_plain(job: dict) -> dict:
    """The plain-TRL side, in this process."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(job["model"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    # use_cpu: without it TRL's defaults refuse to start on a machine without a GPU
    config = SFTConfig(output_dir=job["out"], max_steps=job["steps"], report_to=[], use_cpu=True,
                       per_device_train_batch_size=job["batch"], learning_rate=job["lr"],
                       logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config,
                         train_dataset=Dataset.from_list(rows),
                         peft_config=LoraConfig(r=job["rank"], lora_alpha=2 * job["rank"],
                                                lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"tokens_per_s": round(logs[-1]["num_tokens"] / wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "final_loss": round(logs[-1]["loss"], 4), "wall_s": round(wall, 1)}


def main(examples: int = 64, steps: int = 16, batch: int = 8, lr: float = 2e-4,
         rank: int = 16, json_path: Path | None = None) -> dict:
    """Both systems on the same data; print (and optionally save) JSON."""
    folder = Path(tempfile.mkdtemp(prefix="lorag-bench-train-"))
    data = folder / "train.jsonl"
    make_data(data, examples)
    model = ModelCache(Settings().models_dir).pull(catalog.lookup(catalog.DEFAULT_BASE_MODEL))
    job = {"model": str(model), "data": str(data), "out": str(folder / "plain"),
           "steps": steps, "batch": batch, "lr": lr, "rank": rank}
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "lorag.benchmarks.training", "plain-trl",
                           str(job_file)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    plain = json.loads(lines[-1]) if lines else {"error": done.stderr[-2000:]}
    ours = run_lorag(data, folder / "lorag", steps, batch, lr, rank)
    result = {"workload": {"model": catalog.DEFAULT_BASE_MODEL, "examples": examples,
                           "steps": steps, "batch_size": batch, "lr": lr, "rank": rank,
                           "targets": "q,k,v,o"},
              "systems": {"trl_defaults": {**plain, "loss_on": "every token"},
                          "lorag_train": {**ours, "loss_on": "final assistant turn"}}}
    if "tokens_per_s" in plain and "tokens_per_s" in ours:
        result["speedup"] = round(ours["tokens_per_s"] / plain["tokens_per_s"], 2)
    print_json(result, json_path)
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["plain-trl"]:
    print(json.dumps(run_plain(json.loads(Path(sys.argv[2]).read_text()))))
