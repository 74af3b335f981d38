"""The fine-tuning methods `lorag train --method` offers, on one data pipeline.

Each method is what the fine-tuning literature compares: `full` (every weight), `freeze`
(transfer learning: the last N decoder blocks and the LM head, the rest frozen), and PEFT's
`lora`, `qlora` (LoRA on a base frozen in NF4), `dora` (LoRA with a learned magnitude),
`ia3` (learned scaling vectors on k, v and the MLP's input to down_proj), `prompt` (prompt
tuning: learned virtual-token embeddings before the prompt) and `prefix` (prefix tuning:
a learned key/value prefix in every layer). PEFT builds the adapters; TRL trains them all.

A method says what it writes (a PEFT adapter, or a complete model folder), which
`--quantize` values it can train on, its default learning rate (a full fine-tune at LoRA's
2e-4 would wreck a small model; prompt tuning needs far more), and which options mean
something to it: any other is refused by name, before anything loads.
"""

from dataclasses import dataclass

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from lorag.adapters import TARGET_MODULES
from lorag.errors import InvalidRequest

LORA_OPTIONS = ("rank", "alpha", "dropout", "target_modules", "rslora")
VIRTUAL_OPTIONS = ("num_virtual_tokens",)
# every method-specific option: each method takes some of them and refuses the others
METHOD_OPTIONS = (*LORA_OPTIONS, *VIRTUAL_OPTIONS, "prompt_init", "train_last_layers")


@dataclass(frozen=True)
class Method:
    name: str
    adapter: bool  # writes a PEFT adapter; else a complete model folder
    quantize: tuple[str, ...]  # what it trains on; the first is its default
    lr: float  # its default learning rate
    options: tuple[str, ...] = ()  # the method-specific options it takes
    summary: str = ""


METHODS = {m.name: m for m in (
    Method("full", False, ("none",), 2e-5, (), "every weight"),
    Method("freeze", False, ("none",), 1e-4, ("train_last_layers",),
           "the last N blocks and the LM head"),
    Method("lora", True, ("none", "int8"), 2e-4, LORA_OPTIONS, "low-rank deltas"),
    Method("qlora", True, ("nf4",), 2e-4, LORA_OPTIONS, "LoRA on a 4-bit base"),
    # (PEFT's DoRA on an int8 base fails on CPU: its bitsandbytes layer has no weight
    # statistics to dequantize from there)
    Method("dora", True, ("none", "nf4"), 2e-4, LORA_OPTIONS,
           "LoRA with a learned magnitude"),
    Method("ia3", True, ("none", "nf4", "int8"), 3e-3, ("target_modules",),
           "scaling vectors on k, v and down_proj's input"),
    Method("prompt", True, ("none", "nf4", "int8"), 3e-2, (*VIRTUAL_OPTIONS, "prompt_init"),
           "virtual-token embeddings before the prompt"),
    Method("prefix", True, ("none", "nf4", "int8"), 1e-2, VIRTUAL_OPTIONS,
           "a key/value prefix in every layer"),
)}
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]  # PEFT's own choice for Llama
IA3_FEEDFORWARD = ["down_proj"]  # scaled on its input; k and v on their output
DEFAULTS = {"rank": 16, "alpha": 32, "dropout": 0.05, "rslora": False,
            "num_virtual_tokens": 20, "train_last_layers": 2}


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise InvalidRequest(f"--method must be one of {', '.join(METHODS)}, got {name!r}",
                             field="method")
    return METHODS[name]


def check_method(method: Method, quantize: str | None, given: dict[str, object],
                 gradient_checkpointing: bool, packing: bool) -> str:
    """Refuse what makes no sense for `method` (the options `given`, a precision it cannot
    train on, checkpointing or packing where they break it); returns the quantization."""
    for option, value in given.items():
        if value is not None and option not in method.options:
            takers = [m.name for m in METHODS.values() if option in m.options]
            raise InvalidRequest(
                f"--{option.replace('_', '-')} applies to --method {' / '.join(takers)}, "
                f"not to {method.name} ({method.summary})", field=option)
    quantize = quantize or method.quantize[0]
    if quantize not in method.quantize:
        raise InvalidRequest(_precision_refusal(method, quantize), field="quantize")
    if method.name == "prefix" and gradient_checkpointing:
        raise InvalidRequest(
            "--gradient-checkpointing cannot train --method prefix: recomputing a layer "
            "drops the learned key/value prefix (transformers turns the cache off), so the "
            "recomputed attention no longer matches; prefix tuning's activations are small "
            "anyway", field="gradient_checkpointing")
    if method.name in ("prompt", "prefix") and packing:
        raise InvalidRequest(
            f"--packing cannot train --method {method.name}: the virtual tokens come once "
            "per sequence, so examples packed together would share one, and all but the "
            "first would be trained without it", field="packing")
    return quantize


def check_targets(method: Method, targets: list[str]) -> None:
    """--target-modules: projections the engine knows (or all-linear, for LoRA)."""
    if method.name != "ia3" and targets == ["all-linear"]:
        return
    unknown = set(targets) - set(TARGET_MODULES)
    if unknown or not targets:
        also = "" if method.name == "ia3" else " or all-linear"
        raise InvalidRequest(f"--target-modules has {sorted(unknown)}; allowed: "
                             f"{', '.join(TARGET_MODULES)}{also}", field="target_modules")


def _precision_refusal(method: Method, quantize: str) -> str:
    allowed = " or ".join(method.quantize)
    if method.name in ("full", "freeze") and quantize != "none":
        return (f"--method {method.name} --quantize {quantize}: {method.name} fine-tuning "
                f"updates the base's own weights, and {quantize} weights cannot be trained "
                "(bitsandbytes stores them frozen); train --method qlora for LoRA on a "
                "4-bit base, or --quantize none")
    if method.name == "qlora":
        return (f"--method qlora --quantize {quantize}: QLoRA is LoRA on a base frozen in "
                f"NF4; for LoRA on a {quantize} base use --method lora")
    if method.name == "lora" and quantize == "nf4":
        return "--method lora --quantize nf4 is QLoRA: use --method qlora"
    return f"--method {method.name} trains on --quantize {allowed}, not {quantize}"


def peft_config(method: Method, settings: dict, tokenizer) -> PeftConfig:
    """PEFT's config for an adapter method; `settings` holds its options, defaults filled."""
    name = method.name
    if name in ("lora", "qlora", "dora"):
        targets = settings["target_modules"] or list(TARGET_MODULES[:4])
        return LoraConfig(
            r=settings["rank"], lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            use_rslora=settings["rslora"], use_dora=name == "dora", task_type="CAUSAL_LM")
    if name == "ia3":
        targets = settings["target_modules"] or IA3_TARGETS
        return IA3Config(target_modules=targets,
                         feedforward_modules=[t for t in targets if t in IA3_FEEDFORWARD],
                         task_type="CAUSAL_LM")
    if name == "prompt":
        text = settings.get("prompt_init")
        return PromptTuningConfig(
            num_virtual_tokens=settings["num_virtual_tokens"], task_type="CAUSAL_LM",
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=tokenizer.name_or_path if text else None)
    if name == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=settings["num_virtual_tokens"],
                                  task_type="CAUSAL_LM")
    raise ValueError(f"{name} is not an adapter method")


def freeze_all_but_last(model, layers: int) -> None:
    """Transfer learning: only the last `layers` decoder blocks, the final norm and the LM
    head train. Where the head is tied to the input embeddings (SmolLM2's is), training it
    trains them too: one matrix."""
    blocks = model.get_decoder().layers
    if layers > len(blocks):
        raise InvalidRequest(f"--train-last-layers {layers}: the model has {len(blocks)} "
                             "decoder blocks", field="train_last_layers")
    model.requires_grad_(False)
    trained = [*blocks[len(blocks) - layers:], model.get_output_embeddings()]
    norm = getattr(model.get_decoder(), "norm", None)
    for module in [*trained, *([norm] if norm is not None else [])]:
        module.requires_grad_(True)
