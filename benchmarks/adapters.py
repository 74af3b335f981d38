"""Random, nonzero PEFT adapters (LoRA, DoRA, IA3, prompt and prefix tuning) for tests and
benchmarks, saved exactly as PEFT saves."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
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
    # IA3 instead of LoRA (rank, alpha and rslora unused): a vector per target, 1 +- scale,
    # scaling the input of the `feedforward` targets and the output of the others
    ia3: bool = False
    feedforward: tuple[str, ...] = ()
    # prompt or prefix tuning instead (no targets): `virtual_tokens` learnt tokens, each
    # entry (an embedding's; a prefix key's or value's) drawn with std `scale`
    virtual: str = ""
    virtual_tokens: int = 8


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
        shape = (spec.rank, spec.alpha, spec.targets, spec.rslora, spec.dora, spec.ia3,
                 spec.feedforward, spec.virtual, spec.virtual_tokens)
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
    if key.endswith("lora_magnitude_vector") or key.endswith("ia3_l"):
        # near the base's norms, as DoRA starts; near 1, as IA3 starts
        return (template.float() * (1 + noise)).to(template.dtype)
    return noise.to(template.dtype)


def _template(model, folder: Path, spec: AdapterSpec) -> Path:
    if spec.virtual:
        kind = {"prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[spec.virtual]
        config = kind(num_virtual_tokens=spec.virtual_tokens, task_type="CAUSAL_LM")
        get_peft_model(model, config).save_pretrained(folder)  # the base is left as it is
        return folder
    config = IA3Config(target_modules=list(spec.targets),
                       feedforward_modules=list(spec.feedforward), task_type="CAUSAL_LM") \
        if spec.ia3 else \
        LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                   use_rslora=spec.rslora, use_dora=spec.dora, lora_dropout=0.0,
                   task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # the plain base again, unchanged
    return folder
