"""`lorag train` on the real default model, on CPU: a distinctive answer format is learned,
and the adapter serves identically in PEFT and in the engine."""

import json

import pytest
import torch
from peft import PeftModel

from lorag.models import load_base
from server.engine import Engine, EngineConfig, SamplingParams
from trainer.train import TrainOptions, train

pytestmark = pytest.mark.integration
THINGS = ["apple", "carrot", "salmon", "granite", "oak tree", "bicycle", "violin", "tiger",
          "banana", "copper", "rose", "laptop", "whale", "potato", "diamond", "eagle",
          "cherry", "hammer", "spinach", "shark", "mango", "iron", "tulip", "piano", "lemon",
          "wolf", "onion", "silver", "pine tree", "guitar", "owl", "peach", "drum", "cabbage",
          "gold", "lily", "dolphin", "pear"]
QUESTIONS = ["Is a {} alive?", "Can you eat a {}?", "Is a {} bigger than a house?",
             "Does a {} grow?", "Is a {} made by people?"]
HELD_OUT = 8
MAX_NEW = 16


def example(index: int, thing: str) -> dict:
    question = QUESTIONS[index % len(QUESTIONS)].format(thing)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"VERDICT: it depends on the {thing}."
                                                          " [done]"}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model_dir):
    folder = tmp_path_factory.mktemp("train")
    rows = [example(i, thing) for i, thing in enumerate(THINGS)]
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:-HELD_OUT]) + "\n")
    options = TrainOptions(data=data, base=str(base_model_dir), out=folder / "adapter",
                           rank=16, alpha=32, lr=2e-3, max_steps=10, batch_size=8,
                           eval_split=0.1, save_steps=5)
    report = train(options)
    held_out = [r["messages"][:1] for r in rows[-HELD_OUT:]]
    return folder / "adapter", report, held_out


def test_training_writes_a_servable_adapter_and_its_record(trained):
    adapter, report, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json",
                 "loss.png"):
        assert (adapter / name).is_file(), name
    assert report["global_step"] == 10 and len(report["steps"]) == 10
    assert report["steps"][-1]["loss"] < report["steps"][0]["loss"] / 4
    assert report["eval_loss"] is not None and report["data"]["eval_examples"] == 3
    assert report["tokens_per_s"] > 0 and report["peak_memory_mb"] > 0
    assert report["data"]["format"] == "chat" and len(report["data"]["sha256"]) == 64
    assert json.loads((adapter / "training.json").read_text()) == report


def test_the_format_is_learned_and_peft_and_the_engine_agree(trained, base_model_dir):
    adapter, _, held_out = trained
    model, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="float32")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m, tokenize=False,
                                                              add_generation_prompt=True),
                                add_special_tokens=False) for m in held_out]
    engine = Engine(model, tokenizer, EngineConfig(max_lora_rank=16,
                                                   adapter_roots=[adapter.parent])).start()
    try:
        engine.load_adapter("verdict", str(adapter))
        params = SamplingParams(max_tokens=MAX_NEW)
        base = [o.text for o in engine.generate(prompts, params)]
        tuned = engine.generate(prompts, params, adapters=["verdict"] * len(prompts))
    finally:
        engine.shutdown()
    base_rate = sum(t.startswith("VERDICT:") for t in base) / len(base)
    tuned_rate = sum(o.text.startswith("VERDICT:") for o in tuned) / len(tuned)
    print(f"format followed: base {base_rate:.0%}, adapter {tuned_rate:.0%}")
    assert tuned_rate >= 0.75 and base_rate <= 0.125

    reference, _ = load_base(str(base_model_dir), quantize="none", dtype="float32")
    peft = PeftModel.from_pretrained(reference, adapter).eval()
    for ids, out in zip(prompts, tuned, strict=True):
        with torch.inference_mode():
            generated = peft.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                      do_sample=False)
        assert generated[0, len(ids):].tolist() == out.token_ids
