"""PEFT's own model over the tiny Llama, holding the same adapters an engine serves: the
reference the engine's outputs are compared with."""

from pathlib import Path

from peft import PeftModel

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from tests.tiny import tiny_model


def peft_beside(root: Path, specs: dict[str, AdapterSpec], seed: int) -> tuple[PeftModel, dict]:
    """Adapters for the tiny model made under `root` from `specs`, and a PeftModel over
    its own copy of the tiny model with every one of them loaded under its name (the
    first active); returns the model and name -> path."""
    reference = tiny_model()
    paths = make_adapters(reference, root, specs, seed=seed)
    first, *others = specs
    peft = PeftModel.from_pretrained(reference, paths[first], adapter_name=first)
    for name in others:
        peft.load_adapter(paths[name], adapter_name=name)
    return peft.eval(), paths
