"""Loading the base model: resolve a model reference, then load it (quantized) for serving.

A reference is tried against an ordered list of sources, first match wins: a catalog
name (provisioned on first use), a local HF folder, a local `.gguf` file (converted once
into the model cache), then a hub id passed through to transformers.
"""

import functools
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorag import catalog
from lorag.errors import InvalidRequest
from lorag.provision import ModelCache
from lorag.settings import Settings

Quantize = Literal["nf4", "int8", "w8a8", "none"]
DType = Literal["auto", "bfloat16", "float32"]


@cache
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX), read from cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> torch.dtype:
    """The compute dtype for `dtype`; `auto` is bf16 where the hardware runs it natively."""
    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in get_args(DType):
        raise InvalidRequest(
            f"dtype must be one of {', '.join(get_args(DType))}, got {dtype!r}", field="dtype")
    return getattr(torch, dtype)


def quantization_config(quantize: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for `quantize`; None for an unquantized model."""
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantize == "int8":  # LLM.int8: activations past 6.0 multiply in float16
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "w8a8":  # the same weights; every activation in int8 (per token)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if quantize == "none":
        return None
    raise InvalidRequest(
        f"quantize must be one of {', '.join(get_args(Quantize))}, got {quantize!r}",
        field="quantize")


# --- model sources: each returns a path / hub id for transformers, or None to pass ---

def _from_catalog(ref: str, models: ModelCache) -> str | None:
    entry = catalog.find(ref)
    if entry is None:
        return None
    if entry.kind != "llm":
        raise InvalidRequest(f"{ref!r} is an {entry.kind}, not a generative model", field="model")
    return str(models.pull(entry))


def _from_folder(ref: str, models: ModelCache) -> str | None:
    path = Path(ref).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise InvalidRequest(f"{path} is not a model folder (it has no config.json)",
                             field="model")
    return str(path)


def _from_gguf(ref: str, models: ModelCache) -> str | None:
    path = Path(ref).expanduser()
    if not path.is_file():
        return None
    if path.suffix != ".gguf":
        raise InvalidRequest(
            f"{path} is not a model: give a .gguf file, a Hugging Face model folder, "
            "a catalog name or a hub id", field="model")
    return str(models.gguf_folder(path))


def _from_hub(ref: str, models: ModelCache) -> str | None:
    # "org/name" that is not a local path; anything else is treated as a catalog name.
    parts = ref.split("/")
    return ref if len(parts) == 2 and all(parts) and not ref.startswith(".") else None


MODEL_SOURCES: tuple[Callable[[str, ModelCache], str | None], ...] = (
    _from_catalog, _from_folder, _from_gguf, _from_hub)


def resolve_model(ref: str, models: ModelCache) -> str:
    """Turn a model reference into something `from_pretrained` takes, provisioning if needed."""
    for source in MODEL_SOURCES:
        resolved = source(ref, models)
        if resolved is not None:
            return resolved
    catalog.lookup(ref)  # raises the "unknown model; the catalog has ..." error
    raise AssertionError("unreachable: lookup succeeds only for catalog names")


@functools.cache  # once per process: loggers keep their filters
def _quiet_bitsandbytes() -> None:
    """Drop two bitsandbytes log lines that are noise here, not news.

    The int8 matmul logs on EVERY forward that it casts activations to fp16; the CPU
    backend logs at import that it cannot fetch an optional kernel from the hub (there is
    no hub here; bitsandbytes' built-in CPU kernel is used instead).
    """
    for name, text in (("bitsandbytes.autograd._functions", "inputs will be cast"),
                       ("bitsandbytes.backends.cpu.ops", "kernels-community")):
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.msg)


def load_base(
    ref: str = catalog.DEFAULT_BASE_MODEL,
    quantize: Quantize = "nf4",
    dtype: DType = "auto",
    models: ModelCache | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model `ref` and its tokenizer, ready for inference.

    quantize: `nf4`, `int8` or `w8a8` quantize the linear layers with bitsandbytes,
        `none` keeps them in `dtype`. `w8a8` is `int8` without its outlier threshold, so
        that every product is an int8 one (the engine's fastest prefill on CPUs with
        AVX512-VNNI; server/engine/w8a8.py).
    dtype: compute dtype; `auto` picks bf16 where the hardware runs it natively, else fp32.
    models: the model cache to provision into; defaults to the one under `$LORAG_HOME`.
    """
    compute_dtype = resolve_dtype(dtype)
    bnb = quantization_config(quantize, compute_dtype)
    source = resolve_model(ref, models or ModelCache(Settings().models_dir))
    _quiet_bitsandbytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=compute_dtype, quantization_config=bnb, device_map=device)
    except OSError as e:  # missing files, or a hub id that cannot be fetched
        raise InvalidRequest(f"could not load model {ref!r}: {e}", field="model") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
