"""`lorag export`: fold an adapter into its base and save a standalone HF model.

The result loads with plain transformers (no PEFT), for tools that cannot apply adapters.
Weights are merged in float32 (W + B A, exact to fp32 rounding) and saved as safetensors.
"""

from pathlib import Path

from peft import PeftModel

from lorag.adapters import read_weights
from lorag.errors import InvalidRequest
from lorag.models import load_base


def export(adapter: str | Path, base: str, out: str | Path, dtype: str = "float32") -> Path:
    """Merge the PEFT adapter at `adapter` into `base`; write model + tokenizer to `out`."""
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise InvalidRequest(f"{adapter} has no adapter_config.json", field="adapter")
    read_weights(adapter)  # refuses pickled weights before PEFT could unpickle them
    if out.exists() and any(out.iterdir()):
        raise InvalidRequest(f"{out} exists and is not empty", field="out")
    model, tokenizer = load_base(base, quantize="none", dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
