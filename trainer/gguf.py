"""`lorag export --gguf`: an adapter as a llama.cpp LoRA file (GGUF).

What llama.cpp's own `convert_lora_to_gguf.py` writes, from lorag's validated weights:
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and one pair of
tensors per targeted projection, `blk.{layer}.{attn_q|...}.weight.lora_a` ([rank, in])
and `.lora_b` ([out, rank]), in the base's architecture. That script is not on PyPI (it
lives beside llama.cpp's sources and imports its model classes), so the format is written
here with `gguf`, llama.cpp's own Python writer.

Two things make it right, not just loadable:
- LoRA's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into B, as
  lorag keeps it, and the file says alpha = r, so llama.cpp's scale (alpha / r) is 1.
- llama.cpp stores q and k with their rows permuted for its RoPE layout (the
  `permute` of its Llama converter); q's and k's deltas B @ A must be permuted alike,
  which permuting B's rows does.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFType, GGUFWriter, Keys
from gguf.quants import quantize
from transformers import AutoConfig

from lorag.adapters import BaseShape, load_lora
from lorag.errors import InvalidRequest

# transformers model_type -> llama.cpp architecture, for bases whose projections keep
# Llama's names and whose q / k llama.cpp permutes as Llama's
ARCHITECTURES = {"llama": "llama"}
TENSORS = {"q_proj": MODEL_TENSOR.ATTN_Q, "k_proj": MODEL_TENSOR.ATTN_K,
           "v_proj": MODEL_TENSOR.ATTN_V, "o_proj": MODEL_TENSOR.ATTN_OUT,
           "gate_proj": MODEL_TENSOR.FFN_GATE, "up_proj": MODEL_TENSOR.FFN_UP,
           "down_proj": MODEL_TENSOR.FFN_DOWN}
TYPES = {"float32": GGMLQuantizationType.F32, "float16": GGMLQuantizationType.F16,
         "bfloat16": GGMLQuantizationType.BF16}
MAX_RANK = 1 << 16  # the file format's own limit is far away; the daemon checks its own


def export_gguf(adapter: str | Path, base_folder: str | Path, out: str | Path,
                dtype: str = "float32") -> Path:
    """Write the PEFT adapter at `adapter`, trained on the HF model at `base_folder`, as
    the llama.cpp LoRA file `out` with tensors in `dtype` (float32, float16, bfloat16)."""
    adapter, out = Path(adapter).expanduser(), Path(out).expanduser()
    if dtype not in TYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(TYPES)} for a GGUF adapter, "
                             f"got {dtype!r}", field="dtype")
    if out.exists():
        raise InvalidRequest(f"{out} exists; choose a new file", field="out")
    config = AutoConfig.from_pretrained(base_folder)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InvalidRequest(
            f"a GGUF adapter is written for Llama-architecture bases ({', '.join(ARCHITECTURES)})"
            f"; this base is {config.model_type!r}", field="base")
    lora = load_lora(adapter.name, adapter, BaseShape.from_config(config), [adapter],
                     MAX_RANK)
    writer = GGUFWriter(out, arch)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(lora.rank))
    writer.add_name(adapter.name)
    for layer, module in sorted(lora.a):
        a, b = lora.a[(layer, module)], lora.b[(layer, module)]
        if module == "q_proj":
            b = rope_permute(b, config.num_attention_heads)
        elif module == "k_proj":
            b = rope_permute(b, config.num_key_value_heads)
        name = TENSOR_NAMES[TENSORS[module]].format(bid=layer) + ".weight"
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            data = quantize(tensor.float().numpy().astype(np.float32), TYPES[dtype])
            writer.add_tensor(name + suffix, data, raw_dtype=TYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp gives q / k (its Llama converter's `permute`): within each
    head, the two rotary halves interleaved."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))
