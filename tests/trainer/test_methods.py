"""`lorag train --method` on the tiny Llama: every method trains and writes what its
training.json says it wrote; what each trains is what it claims (PEFT's own adapter kinds,
the base untouched; freeze's last blocks only; full's every weight); a complete model from
full fine-tuning serves through `lorag serve --model`; nonsense combinations are refused
before anything loads, naming the flag."""

import io

import httpx
import pytest
import torch
from peft import PeftConfig
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lorag.adapters import read_config
from lorag.benchmarks.daemon import DaemonProcess
from lorag.cli import app
from lorag.errors import InvalidRequest
from lorag.trainer.methods import METHODS
from lorag.trainer.train import TrainOptions, train
from tests.trainer.examples import EXAMPLES, write

PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "ia3": "IA3",
              "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data") / "train.jsonl", EXAMPLES)


def run(tiny_base, data_file, out, **options) -> dict:
    return train(TrainOptions(data=data_file, base=str(tiny_base), out=out, max_steps=2,
                              batch_size=4, **options), Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def trained(tiny_base, data_file, tmp_path_factory) -> dict:
    """Each method, two steps (freeze: the last of the tiny model's two blocks)."""
    extra = {"freeze": {"train_last_layers": 1}, "prompt": {"num_virtual_tokens": 4},
             "prefix": {"num_virtual_tokens": 4}}
    return {name: (out, run(tiny_base, data_file, out, method=name, **extra.get(name, {})))
            for name in METHODS
            for out in [tmp_path_factory.mktemp(f"method-{name}")]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_writes_what_its_record_says(trained, name):
    out, report = trained[name]
    assert report["method"] == name and report["global_step"] == 2
    assert all(step["loss"] > 0 for step in report["steps"])
    assert report["config"]["lr"] == METHODS[name].lr  # its own default
    assert report["config"]["quantize"] == METHODS[name].quantize[0]
    written = report["wrote"]["files"]
    assert written == {p.name: p.stat().st_size for p in out.iterdir()
                       if p.name not in ("training.json", "loss.png", "checkpoints")}
    params = report["parameters"]
    assert 0 < params["trainable"] <= params["total"]
    assert params["trainable_percent"] == round(100 * params["trainable"] / params["total"], 4)
    if METHODS[name].adapter:
        assert report["wrote"]["kind"] == "adapter"
        assert PeftConfig.from_pretrained(out).peft_type == PEFT_TYPES[name]
        assert "adapter_model.safetensors" in written
        assert params["trainable"] == sum(t.numel() for t in load_file(
            out / "adapter_model.safetensors").values()), "every trained tensor saved"
    else:
        assert report["wrote"]["kind"] == "model"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(written)


@pytest.mark.slow
def test_the_methods_train_what_they_say(trained, tiny_base):
    """The adapter kinds train the fewest parameters, LoRA's kinds more, freeze the last
    block and the (tied) head, full all of it."""
    count = {name: report["parameters"]["trainable"] for name, (_, report) in trained.items()}
    assert count["ia3"] < count["lora"] and count["prompt"] < count["lora"]
    assert count["dora"] > count["lora"] == count["qlora"]
    assert count["full"] == trained["full"][1]["parameters"]["total"]
    base = load_file(tiny_base / "model.safetensors")
    for name in ("full", "freeze"):
        saved = load_file(trained[name][0] / "model.safetensors")
        changed = {key for key in base if not torch.equal(base[key], saved[key])}
        if name == "full":
            assert changed == set(base)
        else:  # layer 1 of 0..1, the final norm, and the head tied to the embedding
            assert changed == {key for key in base if key.startswith("model.layers.1.")} | \
                {"model.norm.weight", "model.embed_tokens.weight"}


@pytest.mark.slow
def test_a_fully_fine_tuned_model_serves(trained, tmp_path):
    """`lorag serve --model OUT`: the daemon answers with the trained weights, greedy tokens
    equal to transformers' on the same folder."""
    out = trained["full"][0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    daemon = DaemonProcess(tmp_path / "data", ["--model", str(out), "--quantize", "none",
                                               "--dtype", "float32", "--max-model-len", "256"],
                           tmp_path / "daemon.log")
    prompt = "Is a violin alive?"
    try:
        reply = httpx.post(f"{daemon.url}/v1/completions", timeout=60, json={
            "model": out.name, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}).json()
    finally:
        daemon.stop()
    ids = AutoTokenizer.from_pretrained(out)(prompt).input_ids
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8)[0, len(ids):]
    assert reply["choices"][0]["text"] == AutoTokenizer.from_pretrained(out).decode(want)


@pytest.mark.slow
def test_registering_a_complete_model_as_an_adapter_says_how_to_serve_it(trained):
    out = trained["freeze"][0]
    with pytest.raises(InvalidRequest, match="holds a complete model.*lorag serve --model"):
        read_config(out, 16, [out.parent])


@pytest.mark.parametrize("options, field, message", [
    ({"method": "full", "quantize": "nf4"}, "quantize",
     "--method full --quantize nf4: full fine-tuning updates the base's own weights"),
    ({"method": "freeze", "quantize": "int8"}, "quantize", "train --method qlora"),
    ({"method": "qlora", "quantize": "none"}, "quantize",
     "QLoRA is LoRA on a base frozen in NF4; for LoRA on a none base use --method lora"),
    ({"method": "lora", "quantize": "nf4"}, "quantize", "is QLoRA: use --method qlora"),
    ({"method": "ia3", "quantize": "fp8"}, "quantize",
     "trains on --quantize none or nf4 or int8, not fp8"),
    ({"method": "dora", "quantize": "int8"}, "quantize", "trains on --quantize none or nf4"),
    ({"method": "ia3", "rank": 8}, "rank", "--rank applies to --method lora / qlora / dora"),
    ({"method": "full", "target_modules": ["q_proj"]}, "target_modules",
     "--target-modules applies to --method lora / qlora / dora / ia3, not to full"),
    ({"method": "lora", "num_virtual_tokens": 8}, "num_virtual_tokens",
     "--num-virtual-tokens applies to --method prompt / prefix"),
    ({"method": "prefix", "prompt_init": "Answer briefly"}, "prompt_init",
     "--prompt-init applies to --method prompt"),
    ({"method": "lora", "train_last_layers": 2}, "train_last_layers",
     "--train-last-layers applies to --method freeze"),
    ({"method": "prefix", "gradient_checkpointing": True}, "gradient_checkpointing",
     "drops the learned key/value prefix"),
    ({"method": "prompt", "packing": True}, "packing", "examples packed together"),
    ({"method": "ia3", "target_modules": ["all-linear"]}, "target_modules",
     "allowed: q_proj"),
    ({"method": "sgd"}, "method", "--method must be one of full, freeze, lora"),
    ({"method": "prompt", "task": "rerank"}, "method", "--task rerank trains a relevance"),
], ids=lambda value: None)
def test_a_combination_that_makes_no_sense_is_refused(tmp_path, options, field, message):
    with pytest.raises(InvalidRequest) as error:
        TrainOptions(data=tmp_path / "x.jsonl", base="b", out=tmp_path / "out", **options)
    assert message in error.value.message and error.value.field == field


def test_the_method_defaults_fill_in():
    options = TrainOptions(data="x", base="b", out="o", quantize="nf4")  # the old QLoRA
    assert (options.method, options.rank, options.lr) == ("qlora", 16, 2e-4)
    prompt = TrainOptions(data="x", base="b", out="o", method="prompt")
    assert (prompt.quantize, prompt.num_virtual_tokens, prompt.rank, prompt.lr) == \
        ("none", 20, None, 3e-2)
    freeze = TrainOptions(data="x", base="b", out="o", method="freeze", lr=5e-5)
    assert (freeze.train_last_layers, freeze.lr, freeze.target_modules) == (2, 5e-5, None)


def test_the_cli_refuses_to_hot_load_a_complete_model(tmp_path, data_file):
    result = CliRunner().invoke(app, ["train", "--data", str(data_file), "--out",
                                      str(tmp_path / "out"), "--method", "full", "--serve",
                                      "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "serve it with lorag serve --model" in \
        " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["train", "--data", str(data_file), "--out",
                                      str(tmp_path / "out"), "--gradient-accumulation-steps",
                                      "0"])
    assert isinstance(result.exception, InvalidRequest)
    assert "--grad-accum must be a positive integer" in result.exception.message
