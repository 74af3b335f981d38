"""`lorag train` on the real default model, on CPU: a distinctive answer format is learned,
and the adapter serves identically in PEFT and in the engine."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorag.errors import InvalidRequest
from lorag.models import load_base
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.trainer.export import export
from lorag.trainer.train import TrainOptions, train
from tests.server.conftest import Daemon

pytestmark = pytest.mark.integration
THINGS = ["apple", "carrot", "salmon", "granite", "oak tree", "bicycle", "violin", "tiger",
          "banana", "copper", "rose", "laptop", "whale", "potato", "diamond", "eagle",
          "cherry", "hammer", "spinach", "shark", "mango", "iron", "tulip", "piano", "lemon",
          "wolf", "onion", "silver", "pine tree", "guitar", "owl", "peach", "drum", "cabbage",
          "gold", "lily", "dolphin", "pear"]
QUESTIONS = ["Is a {} alive?", "Can you eat a {}?", "Is a {} bigger than a house?",
             "Does a {} grow?", "Is a {} made by people?"]
HELD_OUT = 8
MAX_NEW = 16


def example(index: int, thing: str) -> dict:
    question = QUESTIONS[index % len(QUESTIONS)].format(thing)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"VERDICT: it depends on the {thing}."
                                                          " [done]"}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model_dir):
    folder = tmp_path_factory.mktemp("train")
    rows = [example(i, thing) for i, thing in enumerate(THINGS)]
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:-HELD_OUT]) + "\n")
    options = TrainOptions(data=data, base=str(base_model_dir), out=folder / "adapter",
                           rank=16, alpha=32, lr=2e-3, max_steps=10, batch_size=8,
                           eval_split=0.1, save_steps=5)
    report = train(options)
    held_out = [r["messages"][:1] for r in rows[-HELD_OUT:]]
    return folder / "adapter", report, held_out


def test_training_writes_a_servable_adapter_and_its_record(trained):
    adapter, report, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json",
                 "loss.png"):
        assert (adapter / name).is_file(), name
    assert report["global_step"] == 10 and len(report["steps"]) == 10
    assert report["steps"][-1]["loss"] < report["steps"][0]["loss"] / 4
    assert report["eval_loss"] is not None and report["data"]["eval_examples"] == 3
    assert report["tokens_per_s"] > 0 and report["peak_memory_mb"] > 0
    assert report["data"]["format"] == "chat" and len(report["data"]["sha256"]) == 64
    assert json.loads((adapter / "training.json").read_text()) == report


def test_the_format_is_learned_and_peft_and_the_engine_agree(trained, base_model_dir):
    adapter, _, held_out = trained
    model, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="float32")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m, tokenize=False,
                                                              add_generation_prompt=True),
                                add_special_tokens=False) for m in held_out]
    engine = Engine(model, tokenizer, EngineConfig(max_lora_rank=16,
                                                   adapter_roots=[adapter.parent])).start()
    try:
        engine.load_adapter("verdict", str(adapter))
        params = SamplingParams(max_tokens=MAX_NEW)
        base = [o.text for o in engine.generate(prompts, params)]
        tuned = engine.generate(prompts, params, adapters=["verdict"] * len(prompts))
    finally:
        engine.shutdown()
    base_rate = sum(t.startswith("VERDICT:") for t in base) / len(base)
    tuned_rate = sum(o.text.startswith("VERDICT:") for o in tuned) / len(tuned)
    print(f"format followed: base {base_rate:.0%}, adapter {tuned_rate:.0%}")
    assert tuned_rate >= 0.75 and base_rate <= 0.125

    reference, _ = load_base(str(base_model_dir), quantize="none", dtype="float32")
    peft = PeftModel.from_pretrained(reference, adapter).eval()
    for ids, out in zip(prompts, tuned, strict=True):
        with torch.inference_mode():
            generated = peft.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                      do_sample=False)
        assert generated[0, len(ids):].tolist() == out.token_ids


def lorag_train(data, out, *flags) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorag", "train", "--data", str(data), "--out", str(out),
               "--lr", "2e-3", "--batch-size", "4", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(example(i, t)) for i, t in enumerate(THINGS)) + "\n")
    return path


def test_resume_continues_an_interrupted_run_and_serve_hot_loads_it(data_file, tmp_path):
    out = tmp_path / "resumable"
    first = lorag_train(data_file, out, "--max-steps", "4", "--save-steps", "1")
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "checkpoint-2").is_dir():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first.kill()  # interrupted for real, mid-run
    first.wait()
    assert not (out / "training.json").exists()

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"trainer-admin-key-01": {"tenant": "ml", "admin": True}}))
    daemon = Daemon(tmp_path / "daemon", tmp_path, keys, tmp_path / "daemon.log")
    try:
        second = lorag_train(data_file, out, "--max-steps", "4", "--save-steps", "1",
                             "--resume", "--serve", daemon.url, "--serve-name", "verdict",
                             "--api-key", "trainer-admin-key-01")
        output, _ = second.communicate(timeout=600)
        assert second.returncode == 0, output
        report = json.loads((out / "training.json").read_text())
        steps = [s["step"] for s in report["steps"]]
        # steps 1-2 (or more, if the kill came late) come from the checkpoint's log, the
        # rest from the resumed run: a restart from scratch would log 1, 2, ... again
        assert report["global_step"] == 4 and steps == list(range(1, 5)), steps
        losses = [s["loss"] for s in report["steps"]]
        assert losses[-1] < losses[0] and losses[2] < losses[0]  # continues, not restarted
        assert "curl -s " + daemon.url in output and '"model": "verdict"' in output
        reply = httpx.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                           headers={"Authorization": "Bearer trainer-admin-key-01"},
                           json={"model": "verdict", "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Is a cat alive?"}]})
        assert reply.status_code == 200, reply.text
    finally:
        daemon.stop()


def test_qlora_trains_in_less_memory_than_bf16_lora(data_file, tmp_path):
    reports = {}
    for quantize in ("nf4", "none"):
        run = lorag_train(data_file, tmp_path / quantize, "--max-steps", "1", "--quantize",
                          quantize, "--dtype", "bfloat16")
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
        reports[quantize] = json.loads((tmp_path / quantize / "training.json").read_text())
    print({q: r["peak_memory_mb"] for q, r in reports.items()})
    assert reports["nf4"]["global_step"] == 1 and reports["nf4"]["final_loss"] > 0
    assert reports["nf4"]["peak_memory_mb"] < reports["none"]["peak_memory_mb"]


def test_export_merges_into_a_standalone_model(trained, base_model_dir, tmp_path):
    adapter, _, held_out = trained
    merged_dir = export(adapter, str(base_model_dir), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    model, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="float32")
    peft = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(
        held_out[0], tokenize=False, add_generation_prompt=True), add_special_tokens=False)])
    with torch.inference_mode():
        want = peft.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
        got = merged.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    assert got.tolist() == want.tolist()
    with pytest.raises(InvalidRequest, match="not empty"):
        export(adapter, str(base_model_dir), merged_dir)


def test_long_examples_are_truncated_with_a_warning(data_file, tmp_path):
    # chat-templated examples here are 50-55 tokens, their prompts 35-39
    run = lorag_train(data_file, tmp_path / "short", "--max-steps", "1", "--max-seq-len", "52")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    report = json.loads((tmp_path / "short" / "training.json").read_text())
    assert report["data"]["truncated"] == 9 and report["data"]["skipped"] == 0
    assert f"9 of {len(THINGS)} examples are longer than --max-seq-len 52" in \
        " ".join(output.split())
    nothing_left = lorag_train(data_file, tmp_path / "none", "--max-steps", "1",
                               "--max-seq-len", "30")
    output, _ = nothing_left.communicate(timeout=600)
    assert nothing_left.returncode == 2
    assert "leaving nothing to train on; raise --max-seq-len" in " ".join(output.split())


def test_a_bad_line_stops_the_cli_before_the_model_loads(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(example(0, "owl")) + "\n{\"messages\": oops}\n")
    start = time.monotonic()
    run = lorag_train(data, tmp_path / "never", "--max-steps", "1")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 2
    assert f"{data}:2: not valid JSON" in " ".join(output.split())
    assert not (tmp_path / "never").exists() and time.monotonic() - start < 60


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    from lorag.trainer.train import _last_checkpoint

    for step, files in ((2, ("adapter_model.safetensors", "trainer_state.json")),
                        (4, ("adapter_model.safetensors",)),  # killed before its state
                        (6, ("adapter_model.safetensors", "trainer_state.json"))):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text('{"log_hi')
    assert _last_checkpoint(tmp_path).name == "checkpoint-2"
    with pytest.raises(InvalidRequest, match="no complete checkpoint"):
        _last_checkpoint(tmp_path / "elsewhere")
