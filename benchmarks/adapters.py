"""Random, nonzero PEFT adapters for tests and benchmarks, saved exactly as PEFT saves."""

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model


@dataclass(frozen=True)
class AdapterSpec:
    """What to generate: rank, alpha, targets, rsLoRA, and the size of its effect."""

    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    rslora: bool = False
    scale: float = 0.05  # std of A and B entries: big enough to change greedy outputs


def make_adapters(model, folder: Path, specs: dict[str, AdapterSpec], seed: int = 0) -> dict:
    """Save one PEFT adapter per spec under `folder/<name>`; returns name -> path.

    Names must not be "default" (PEFT saves that one into `folder` itself).

    PEFT initialises B to zero (a no-op adapter); here A and B are both drawn from a
    seeded normal so every adapter changes the model's outputs, differently.
    """
    paths = {}
    generator = torch.Generator().manual_seed(seed)
    for name, spec in specs.items():
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                            use_rslora=spec.rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config, adapter_name=name)
        for module_name, param in peft_model.named_parameters():
            if "lora_" in module_name:
                noise = torch.randn(param.shape, generator=generator) * spec.scale
                param.data.copy_(noise.to(param.dtype))
        # a non-default adapter name is saved into folder/<name>
        peft_model.save_pretrained(folder, selected_adapters=[name])
        paths[name] = folder / name
        model = peft_model.unload()  # the plain base again, unchanged
    return paths
