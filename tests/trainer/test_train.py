"""`lorag train` and `lorag export` on the tiny Llama (fast lane): what the trainer checks
and records, the CLI's refusals, and an exact merge. That training teaches the real model
a format is test_train_e2e.py's."""

import hashlib
import io
import json

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorag.cli import app
from lorag.errors import InvalidRequest
from lorag.models import load_base
from lorag.trainer.export import export
from lorag.trainer.train import TrainOptions, _last_checkpoint, train
from tests.trainer.examples import EXAMPLES, write


def tiny_train(tiny_base, data, out, **options) -> tuple[dict, str]:
    """Train on the tiny base in this process; the report and what the console said."""
    said = io.StringIO()
    report = train(TrainOptions(data=data, base=str(tiny_base), out=out, lr=2e-3,
                                batch_size=4, **{"max_steps": 2, **options}),
                   Console(file=said, width=300))
    return report, said.getvalue()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data") / "train.jsonl", EXAMPLES)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-adapter")
    tiny_train(tiny_base, data_file, out)
    return out


@pytest.mark.slow
def test_a_run_writes_the_adapter_and_its_record(tiny_adapter, data_file):
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json",
                 "loss.png"):
        assert (tiny_adapter / name).is_file(), name
    report = json.loads((tiny_adapter / "training.json").read_text())
    assert report["global_step"] == 2 and [s["step"] for s in report["steps"]] == [1, 2]
    assert report["data"] == {"path": str(data_file), "format": "chat",
                              "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
                              "train_examples": len(EXAMPLES), "eval_examples": 0,
                              "truncated": 0, "skipped": 0}
    assert report["tokens_per_s"] > 0
    assert report["config"]["lr"] == 2e-3 and report["peak_memory_mb"] > 0


@pytest.mark.slow
def test_long_examples_are_truncated_with_a_warning(tiny_base, data_file, tmp_path):
    # chat-templated examples here are 50-55 tokens, their prompts 35-39
    report, said = tiny_train(tiny_base, data_file, tmp_path / "short", max_steps=1,
                              max_seq_len=52)
    assert report["data"]["truncated"] == 9 and report["data"]["skipped"] == 0
    assert f"9 of {len(EXAMPLES)} examples are longer than --max-seq-len 52" in \
        " ".join(said.split())
    with pytest.raises(InvalidRequest, match="leaving nothing to train on; raise "
                                             "--max-seq-len") as error:
        tiny_train(tiny_base, data_file, tmp_path / "none", max_steps=1, max_seq_len=30)
    assert error.value.field == "max_seq_len"


def test_a_bad_line_stops_the_cli_before_the_model_loads(tmp_path):
    data = write(tmp_path / "bad.jsonl", EXAMPLES[:1])
    data.write_text(data.read_text() + '{"messages": oops}\n')
    # a base that cannot load: were it loaded first, that would be the error
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out",
                                      str(tmp_path / "never"), "--base", str(tmp_path / "no")])
    assert isinstance(result.exception, InvalidRequest)
    assert result.exception.message.startswith(f"{data}:2: not valid JSON")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("flags, problem", [
    (["--rank", "0"], "rank must be a positive integer"),
    (["--eval-split", "0.1", "--eval-data", "x.jsonl"], "not both"),
    (["--quantize", "fp8"], "--method lora trains on --quantize none or int8, not fp8"),
])
def test_the_cli_refuses_bad_options_naming_the_flag(tmp_path, data_file, flags, problem):
    result = CliRunner().invoke(app, ["train", "--data", str(data_file), "--out",
                                      str(tmp_path / "out"), *flags])
    assert isinstance(result.exception, InvalidRequest), result.output
    assert problem in result.exception.message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_merges_into_a_standalone_model(tiny_adapter, tiny_base, tokenizer, tmp_path):
    merged_dir = export(tiny_adapter, str(tiny_base), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    model, _ = load_base(str(tiny_base), quantize="none", dtype="float32")
    peft = PeftModel.from_pretrained(model, tiny_adapter).eval()
    ids = torch.tensor([tokenizer.apply_chat_template(EXAMPLES[0]["messages"][:1],
                                                      add_generation_prompt=True)["input_ids"]])
    with torch.inference_mode():
        want, got = peft(ids).logits, merged(ids).logits
        with peft.disable_adapter():
            base = peft(ids).logits
    # the merge is W + BA in fp32: the same function, to rounding; the adapter's own effect
    # is orders of magnitude larger
    assert torch.allclose(got, want, atol=1e-5)
    assert (want - base).abs().max() > 1000 * (got - want).abs().max()
    with pytest.raises(InvalidRequest, match="not empty"):
        export(tiny_adapter, str(tiny_base), merged_dir)


@pytest.mark.slow
def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
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
