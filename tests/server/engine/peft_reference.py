"""PEFT's own model over the tiny Llama, holding the same adapters an engine serves: the
reference the engine's outputs are compared with."""

from pathlib import Path

import torch
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


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn of the chat template, ready to answer, as ids."""
    return [tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"] for q in questions]


def greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """`model.generate`'s greedy continuation of `prompt` (its new tokens only)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()
