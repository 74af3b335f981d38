"""`lorag train` on the real default model, on CPU (e2e lane): one run, killed mid-way and
resumed into the e2e daemon, learns a distinctive answer format, and the adapter serves
identically in PEFT and in the engine; QLoRA trains in less memory than bf16 LoRA."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel

from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from tests.daemons import ALICE
from tests.trainer.examples import EXAMPLES, HELD_OUT, write

pytestmark = pytest.mark.e2e
MAX_NEW = 16
PEFT_CHECKED = 3  # of the held-out answers, token for token (the tiny lane checks more)
STEPS, SAVE_EVERY = 10, 5


def lorag_train(data: Path, out: Path, *flags: str, **env: str) -> subprocess.Popen:
    """The installed `lorag train`, as a user runs it."""
    command = [str(Path(sys.executable).parent / "lorag"), "train", "--data", str(data),
               "--out", str(out), "--lr", "2e-3", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def complete_checkpoint(out: Path, step: int) -> bool:
    state = out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"  # saved last
    try:
        return json.loads(state.read_text())["global_step"] == step
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def trained(real_daemon, real_adapters, tmp_path_factory):
    """The e2e lane's one training run: killed (SIGKILL) once its step-5 checkpoint is
    written, then resumed with --serve into the e2e daemon (its adapter root holds it)."""
    data = write(tmp_path_factory.mktemp("data") / "train.jsonl", EXAMPLES[:-HELD_OUT])
    out = real_adapters / "verdict"
    flags = ["--max-steps", str(STEPS), "--save-steps", str(SAVE_EVERY), "--batch-size", "4",
             "--rank", "16", "--alpha", "32", "--eval-split", "0.1"]
    first = lorag_train(data, out, *flags)
    deadline = time.monotonic() + 600
    while not complete_checkpoint(out, SAVE_EVERY):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.kill()  # interrupted for real, mid-run
    first.wait()
    assert not (out / "training.json").exists()
    second = lorag_train(data, out, *flags, "--resume", "--serve", real_daemon.url,
                         "--api-key", ALICE.split()[1])
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    held_out = [row["messages"][:1] for row in EXAMPLES[-HELD_OUT:]]
    return out, json.loads((out / "training.json").read_text()), output, held_out


def test_a_resumed_run_records_every_step_and_serves(trained, real_daemon):
    adapter, report, output, held_out = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png"):
        assert (adapter / name).is_file(), name
    # steps 1-5 come from the checkpoint's log, 6-10 from the resumed run: a restart from
    # scratch would log 1, 2, ... again, a lost log would miss some
    assert report["global_step"] == STEPS
    assert [s["step"] for s in report["steps"]] == list(range(1, STEPS + 1))
    assert report["steps"][-1]["loss"] < report["steps"][0]["loss"] / 4
    assert report["eval_loss"] is not None and report["data"]["eval_examples"] == 3
    assert report["config"]["resume"] is True and report["peak_memory_mb"] > 0
    assert f"curl -s {real_daemon.url}" in output and '"model": "verdict"' in output
    reply = httpx.post(f"{real_daemon.url}/v1/chat/completions", timeout=60,
                       headers={"Authorization": ALICE},
                       json={"model": "verdict", "max_tokens": 8, "temperature": 0,
                             "messages": held_out[0]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].startswith("VERDICT")


def test_the_format_is_learned_and_peft_and_the_engine_agree(trained, base_model_dir):
    adapter, _, _, held_out = trained
    model, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="float32")
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True)["input_ids"]
               for m in held_out]
    with Engine(model, tokenizer, EngineConfig(max_lora_rank=16,
                                               adapter_roots=[adapter.parent])) as engine:
        engine.load_adapter("verdict", str(adapter))
        params = SamplingParams(max_tokens=MAX_NEW)
        base = [o.text for o in engine.generate(prompts, params)]
        tuned = engine.generate(prompts, params, adapters=["verdict"] * len(prompts))
    base_rate = sum(t.startswith("VERDICT:") for t in base) / len(base)
    tuned_rate = sum(o.text.startswith("VERDICT:") for o in tuned) / len(tuned)
    print(f"format followed: base {base_rate:.0%}, adapter {tuned_rate:.0%}")
    assert tuned_rate >= 0.75 and base_rate <= 0.125

    reference, _ = load_base(str(base_model_dir), quantize="none", dtype="float32")
    peft = PeftModel.from_pretrained(reference, adapter).eval()
    for ids, out in list(zip(prompts, tuned, strict=True))[:PEFT_CHECKED]:
        with torch.inference_mode():
            generated = peft.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                      do_sample=False)
        assert generated[0, len(ids):].tolist() == out.token_ids


def test_qlora_trains_in_less_memory_than_bf16_lora(tmp_path):
    """One step each, both at once: the two processes' resident memory is measured
    separately (one thread each, so they share the two cores without thrashing)."""
    data = write(tmp_path / "train.jsonl", EXAMPLES)
    runs = {quantize: lorag_train(data, tmp_path / quantize, "--max-steps", "1",
                                  "--batch-size", "2", "--quantize", quantize,
                                  "--dtype", "bfloat16", OMP_NUM_THREADS="1")
            for quantize in ("nf4", "none")}
    reports = {}
    for quantize, run in runs.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
        reports[quantize] = json.loads((tmp_path / quantize / "training.json").read_text())
    print({q: r["peak_memory_mb"] for q, r in reports.items()})
    assert reports["nf4"]["global_step"] == 1 and reports["nf4"]["final_loss"] > 0
    assert reports["nf4"]["peak_memory_mb"] < reports["none"]["peak_memory_mb"]
