"""Adapter validation: every refusal names the problem; a good adapter loads."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorag.adapters import BaseShape, compose, content_version, load_lora, save_lora
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.errors import InvalidRequest
from tests.tiny import tiny_model

BASE = BaseShape.from_config(tiny_model().config)


@pytest.fixture
def root(tmp_path):
    make_adapters(tiny_model(), tmp_path, {"good": AdapterSpec(rank=4, alpha=8)}, seed=0)
    return tmp_path


def variant(root, name, edit_config=None, edit_weights=None):
    """A copy of the good adapter with its config or weights changed."""
    folder = root / name
    shutil.copytree(root / "good", folder)
    if edit_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit_config(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if edit_weights:
        weights = load_file(folder / "adapter_model.safetensors")
        edit_weights(weights)
        save_file(weights, folder / "adapter_model.safetensors")
    return folder


def load(path, root, max_rank=16):
    return load_lora("x", path, BASE, [root], max_rank)


def test_good_adapter_loads_with_scaling_folded_into_b(root):
    lora = load(root / "good", root)
    assert lora.rank == 4 and lora.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    raw = load_file(root / "good" / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert torch.equal(lora.b[(1, "v_proj")], b * 2.0)  # alpha 8 / r 4


def test_rslora_scaling(root):
    folder = variant(root, "rs", edit_config=lambda c: c.update(use_rslora=True))
    lora = load(folder, root)
    raw = load_file(folder / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.allclose(lora.b[(0, "q_proj")], b * 4.0)  # alpha 8 / sqrt(4)


@pytest.mark.parametrize("path, message", [
    ("{root}/../outside", "is outside the configured adapter roots"),
    ("/etc", "is outside the configured adapter roots"),
])
def test_paths_outside_the_roots_are_refused(root, path, message):
    with pytest.raises(InvalidRequest, match=message) as err:
        load(path.format(root=root), root)
    assert err.value.field == "path"


def test_symlink_escaping_the_root_is_refused(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(root / "good", elsewhere / "adapter")
    os.symlink(elsewhere / "adapter", root / "link")
    with pytest.raises(InvalidRequest, match="outside the configured adapter roots"):
        load(root / "link", root)


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_linked_file_escaping_the_root_is_refused(root, tmp_path_factory, linked):
    """The folder is inside the root, one of its files a link to a file elsewhere."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    folder = variant(root, "inside")
    shutil.move(folder / linked, elsewhere / linked)
    os.symlink(elsewhere / linked, folder / linked)
    with pytest.raises(InvalidRequest, match=f"{linked} is outside the configured adapter"):
        load(folder, root)
    with pytest.raises(InvalidRequest, match="outside the configured adapter roots"):
        content_version(folder, [root])


def header_only(folder, header: dict) -> None:
    """A safetensors file of `header` whose data is a few bytes, whatever it declares."""
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw + b"\0" * 16)


def test_a_file_that_declares_a_huge_tensor_costs_no_memory(root):
    folder = variant(root, "huge")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header_only(folder, {key: {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                               "data_offsets": [0, 1 << 42]}})
    with pytest.raises(InvalidRequest, match="is not a readable safetensors file"):
        load(folder, root)


@pytest.mark.parametrize("dtype, shape, message", [
    ("F32", [4096, 64], r"has shape \[4096, 64\], this base model needs \[4, 64\]"),
    ("I64", [4, 64], "is I64; adapter weights are one of F32, F16, BF16"),
])
def test_shapes_and_dtypes_are_checked_from_the_header_first(root, monkeypatch, dtype, shape,
                                                             message):
    folder = variant(root, "wrong")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    size = {"F32": 4, "I64": 8}[dtype] * shape[0] * shape[1]
    raw = json.dumps({key: {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}})
    (folder / "adapter_model.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw.encode() + b"\0" * size)
    read = []
    monkeypatch.setattr("safetensors._safetensors_rust.safe_open.get_tensor",
                        lambda *args: read.append(args), raising=False)
    with pytest.raises(InvalidRequest, match=message):
        load(folder, root)
    assert read == []  # refused before any tensor was read


def test_pickled_weights_are_refused_without_being_read(root):
    folder = root / "pickled"
    folder.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    with pytest.raises(InvalidRequest, match="adapter_model.bin is a pickled weight file"):
        load(folder, root)


def config_only(root, name: str):
    folder = root / name
    folder.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", folder)
    return folder


def corrupt_weights(root):
    folder = config_only(root, "corrupt")
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return folder


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: config_only(root, "no-weights"), "has no adapter_model.safetensors"),
    (corrupt_weights, "is not a readable safetensors file"),
    (lambda root: root, "has no adapter_config.json"),
], ids=["no-weights", "corrupt-weights", "no-config"])
def test_a_folder_without_readable_weights_or_config_is_refused(root, make, message):
    with pytest.raises(InvalidRequest, match=message):
        load(make(root), root)


def test_rank_above_the_limit(root):
    with pytest.raises(InvalidRequest, match=r"rank r=4 is outside 1..2 .the engine's max_lora"):
        load(root / "good", root, max_rank=2)


def test_adapter_for_another_base_is_refused(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    make_adapters(tiny_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
                  other, {"foreign": AdapterSpec(rank=4)})
    shutil.copytree(other / "foreign", root / "foreign")
    with pytest.raises(InvalidRequest, match="the adapter was trained for a different base"):
        load(root / "foreign", root)
    deep = variant(root, "deep", edit_weights=lambda w: w.update({
        k.replace("layers.1.", "layers.7."): v.clone() for k, v in w.items()}))
    with pytest.raises(InvalidRequest, match="is for layer 7, the base model has 2 layers"):
        load(deep, root)


def poison(weights):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = weights[key].clone()
    weights[key][0, 0] = float("nan")


def add_magnitude(weights, width: int = 64):
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = \
        torch.ones(width)


def rename_q_to_qkv(weights):
    for key in [k for k in weights if "q_proj" in k]:
        weights[key.replace("q_proj", "qkv_proj")] = weights.pop(key)


@pytest.mark.parametrize(("edit", "message"), [
    ({"edit_weights": poison}, "q_proj.lora_A.weight has non-finite values"),
    ({"edit_weights": rename_q_to_qkv}, "target module 'qkv_proj' is not one of"),
    ({"edit_config": lambda config: config.update(use_dora=True)},
     "a DoRA adapter .use_dora=true. needs a lora_magnitude_vector beside every LoRA pair"),
    ({"edit_weights": add_magnitude}, "lora_magnitude_vector tensors need use_dora=true"),
    ({"edit_weights": lambda w: add_magnitude(w, 65),
      "edit_config": lambda config: config.update(use_dora=True)},
     r"q_proj.lora_magnitude_vector has shape \[65\], this base model needs \[64\]"),
], ids=["nan", "unknown-module", "dora-without-magnitude", "magnitude-without-dora",
        "magnitude-too-wide"])
def test_weights_the_engine_cannot_serve_are_refused(root, edit, message):
    with pytest.raises(InvalidRequest, match=message):
        load(variant(root, "bad", **edit), root)


def test_compose_concatenates_ranks_and_weights_b(root):
    good = load(root / "good", root)
    mixed = compose("mix", [(good, 0.5), (good, 2.0)], max_rank=16)
    assert mixed.rank == 8
    x = torch.randn(3, 64)
    key = (0, "q_proj")
    expected = 2.5 * (x @ good.a[key].T @ good.b[key].T)
    assert torch.allclose(x @ mixed.a[key].T @ mixed.b[key].T, expected, atol=1e-5)
    with pytest.raises(InvalidRequest, match="composed rank 8 exceeds max_lora_rank 6"):
        compose("mix", [(good, 0.5), (good, 2.0)], max_rank=6)


def test_save_lora_writes_what_load_lora_reads_back(root):
    """The vLLM backend serves lorag's own copy of a validated adapter: written by
    save_lora (scaling already in B, so alpha = r), a PEFT folder load_lora reads back
    unchanged; a composition of attention and MLP adapters too."""
    make_adapters(tiny_model(), root, {"mlp": AdapterSpec(
        rank=2, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))}, seed=1)
    good, mlp = load(root / "good", root), load(root / "mlp", root)
    for lora in (good, compose("mix", [(good, 0.5), (mlp, 2.0)], max_rank=16)):
        again = load(save_lora(lora, root / f"copy-{lora.rank}"), root)
        assert again.rank == lora.rank and again.target_modules == lora.target_modules
        assert again.a.keys() == lora.a.keys()
        for key in lora.a:
            assert torch.equal(again.a[key], lora.a[key])
            assert torch.equal(again.b[key], lora.b[key])
