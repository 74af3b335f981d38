"""`lorag export --gguf`: the file says what llama.cpp reads, and its deltas, read back as
transformers reads a GGUF (un-permuting q / k), are PEFT's own. llama-server itself runs
the file in tests/llamacpp (`make test-llamacpp`)."""

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from peft import PeftModel
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.errors import InvalidRequest
from lorag.trainer.gguf import export_gguf
from tests.tiny import TINY, tiny_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-adapters")
    spec = AdapterSpec(rank=4, alpha=12, targets=ALL, rslora=True)
    return make_adapters(tiny_model(), root, {"all": spec}, seed=3)["all"]


def fields(reader: GGUFReader) -> dict:
    def value(field):
        part = field.parts[field.data[0]]
        return part.tobytes().decode() if field.types[0].name == "STRING" else part[0]

    return {name: value(field) for name, field in reader.fields.items()
            if name.startswith(("general.", "adapter."))}


def file_deltas(path) -> dict[str, np.ndarray]:
    """HF module name -> alpha / r * B @ A as llama.cpp computes it, with q / k rows
    un-permuted by transformers' own GGUF reader."""
    reader = GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": TINY["num_attention_heads"],
                                             "num_key_value_heads": TINY["num_key_value_heads"]})
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            weight = name.removesuffix(".lora_a")
            a, b = tensors[name], tensors[f"{weight}.lora_b"]
            delta = processor.process(alpha / a.shape[0] * b @ a, weight).weights
            _, layer, kind, _ = weight.split(".")
            out[f"model.layers.{layer}.{HF_NAMES[kind]}"] = delta
    return out


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("float16", 2e-3)])
def test_the_file_holds_pefts_deltas_as_llamacpp_reads_them(tiny_base, adapter, tmp_path,
                                                             dtype, tolerance):
    out = export_gguf(adapter, tiny_base, tmp_path / "all.gguf", dtype)
    reader = GGUFReader(out)
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    assert fields(reader) == {"general.architecture": "llama", "general.type": "adapter",
                              "general.name": "all", "adapter.type": "lora",
                              "adapter.lora.alpha": pytest.approx(float(rank))}
    assert len(reader.tensors) == 2 * len(ALL) * TINY["num_hidden_layers"]
    assert {t.tensor_type.name for t in reader.tensors} == {"F32" if dtype == "float32"
                                                            else "F16"}

    peft = PeftModel.from_pretrained(tiny_model(), adapter)
    expected = {name.removeprefix("base_model.model."): module.get_delta_weight("default")
                for name, module in peft.named_modules() if hasattr(module, "lora_A")}
    deltas = file_deltas(out)
    assert deltas.keys() == expected.keys()
    for name, delta in deltas.items():
        want = expected[name].detach().numpy()
        assert np.abs(delta - want).max() <= tolerance * np.abs(want).max(), name


def test_q_and_k_rows_follow_llamacpps_rope_layout(tiny_base, adapter, tmp_path):
    """Without the permutation q / k would load and run, and be wrong: the deltas read
    back with transformers' un-permute must differ from the raw rows."""
    out = export_gguf(adapter, tiny_base, tmp_path / "all.gguf")
    reader = GGUFReader(out)
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    peft = PeftModel.from_pretrained(tiny_model(), adapter)
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    unpermuted_b = q.lora_B["default"].weight.detach().numpy() * q.scaling["default"]
    assert not np.allclose(raw["blk.0.attn_q.weight.lora_b"], unpermuted_b)
    assert np.allclose(raw["blk.0.attn_v.weight.lora_a"],
                       peft.base_model.model.model.layers[0].self_attn.v_proj
                       .lora_A["default"].weight.detach().numpy())


def test_bad_requests_say_what_is_wrong(tiny_base, adapter, tmp_path):
    with pytest.raises(InvalidRequest, match="dtype must be one of float32, float16, "
                                             "bfloat16 .* got 'int4'"):
        export_gguf(adapter, tiny_base, tmp_path / "a.gguf", "int4")
    (tmp_path / "taken.gguf").write_bytes(b"")
    with pytest.raises(InvalidRequest, match="taken.gguf exists"):
        export_gguf(adapter, tiny_base, tmp_path / "taken.gguf")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(InvalidRequest, match="pickled weight file"):
        export_gguf(pickled, tiny_base, tmp_path / "b.gguf")
    other = tmp_path / "qwen"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(InvalidRequest, match="Llama-architecture bases .* 'qwen2'"):
        export_gguf(adapter, other, tmp_path / "c.gguf")
    assert not any(tmp_path.glob("[abc].gguf"))


def test_the_cli_writes_the_file(tiny_base, adapter, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorag.cli import app

    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(app, ["export", "--gguf", "--adapter", str(adapter),
                                      "--out", str(out), "--base", str(tiny_base),
                                      "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert {t.tensor_type.name for t in GGUFReader(out).tensors} == {"F16"}
    assert torch.isfinite(torch.tensor(np.array(GGUFReader(out).tensors[0].data,
                                                dtype=np.float32))).all()
