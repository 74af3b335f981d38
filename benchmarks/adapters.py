"""Random, nonzero PEFT adapters for tests and benchmarks, saved exactly as PEFT saves."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class AdapterSpec:
    """What to generate: rank, alpha, targets, rsLoRA, and the size of its effect."""

    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    rslora: bool = False
    scale: float = 0.05  # std of A and B entries: big enough to change greedy outputs
    dora: bool = False  # DoRA: each magnitude PEFT's (the base's column norms) times 1 +- scale


def make_adapters(model, folder: Path, specs: dict[str, AdapterSpec], seed: int = 0) -> dict:
    """Save one PEFT adapter per spec under `folder/<name>`; returns name -> path.

    PEFT itself saves one template per distinct spec (its config and tensor names and
    shapes); every adapter is then that template with its own tensors, drawn from a seeded
    normal (PEFT initialises B to zero, a no-op adapter), so each one changes the model's
    outputs, differently. Tensors are in the model's dtype, as PEFT would save them.
    """
    paths, templates = {}, {}
    generator = torch.Generator().manual_seed(seed)
    for name, spec in specs.items():
        shape = (spec.rank, spec.alpha, spec.targets, spec.rslora, spec.dora)
        if shape not in templates:
            templates[shape] = _template(model, folder / f".template-{len(templates)}", spec)
        template = templates[shape]
        paths[name] = folder / name
        paths[name].mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", paths[name])
        tensors = {key: _drawn(key, t, spec.scale, generator)
                   for key, t in load_file(template / "adapter_model.safetensors").items()}
        save_file(tensors, paths[name] / "adapter_model.safetensors", metadata={"format": "pt"})
    return paths


def _drawn(key: str, template: torch.Tensor, scale: float,
           generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(template.shape, generator=generator) * scale
    if key.endswith("lora_magnitude_vector"):  # near the base's norms, as DoRA starts
        return (template.float() * (1 + noise)).to(template.dtype)
    return noise.to(template.dtype)


def _template(model, folder: Path, spec: AdapterSpec) -> Path:
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        use_rslora=spec.rslora, use_dora=spec.dora, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # the plain base again, unchanged
    return folder
