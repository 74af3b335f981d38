"""How the `lorag` command reports a mistake: one line naming the option and what is
allowed, exit code 2 (1 when something it needs failed), before anything slow runs. In
this process through the app's own error handling, and once as the installed command."""

import subprocess
import sys
from pathlib import Path

import pytest

from lorag.cli import app


@pytest.mark.parametrize("args, code, message", [
    (["generate", "--prompt", "hi", "--quantize", "gptq"], 2,
     "error: quantize must be one of nf4, int8, w8a8, none, got 'gptq'"),
    (["serve", "--api-keys", "/nonexistent/keys.json"], 2,
     "error: cannot read API keys from /nonexistent/keys.json"),
    (["models", "pull", "no-such-model"], 2, "error: unknown model 'no-such-model'"),
    (["eval", "generate", "--data", "/nonexistent/qa.jsonl", "--model", "m"], 2,
     "/nonexistent/qa.jsonl"),
    (["adapters", "list", "--url", "http://127.0.0.1:9"], 1,
     "failed: cannot reach the daemon at http://127.0.0.1:9"),
    (["serve", "--max-loras", "4"], 2, "error: --max-loras applies to the vLLM backend "
     "only; it means nothing with --backend native"),
    (["serve", "--backend", "vllm", "--no-auto-merge"], 2, "error: --auto-merge applies to "
     "the native backend only; it means nothing with --backend vllm"),
    (["serve", "--backend", "vllm", "--max-lora-rank", "20"], 2, "error: --max-lora-rank 20: "
     "vLLM's LoRA kernels take one of 1, 8, 16, 32, 64, 128, 256, 320, 512"),
    (["serve", "--backend", "vllm", "--quantize", "nf4"], 2, "error: --quantize nf4: vLLM "
     "has no bitsandbytes kernels on cpu"),
    (["serve", "--backend", "vllm", "--quantize", "w8a8"], 2, "error: --quantize w8a8: vLLM "
     "quantizes in flight to bitsandbytes 4-bit only; use --quantize nf4 (CUDA) or none, or "
     "int8 / w8a8 on --backend native"),
    (["serve", "--backend", "vllm", "--gpu-memory-utilization", "0.5"], 2,
     "error: --gpu-memory-utilization applies to GPUs; on the CPU build size the KV cache "
     "with --kv-cache-memory"),
    (["serve", "--backend", "vllm", "--distributed-executor-backend", "ray"], 2,
     "error: --distributed-executor-backend ray: vLLM's CPU build runs no Ray workers (vLLM: "
     "\"current platform cpu does not support ray.\")"),
    (["serve", "--backend", "vllm", "--pipeline-parallel-size", "2"], 2,
     "error: --pipeline-parallel-size above 1: vLLM's CPU build runs a model with LoRA "
     "eagerly and skips its warm-up step"),
    (["serve", "--kv-cache-memory", "2"], 2, "error: --kv-cache-memory takes a size above 0 "
     "with its unit, like 512MiB or 2GiB"),
    (["bench", "compile", "--sizes", "8,0"], 2, "error: --sizes takes positive token "
     "counts like 8,64,128; got '8,0'"),
    (["bench", "compile", "--sizes", "eight"], 2, "error: --sizes takes positive token "
     "counts like 8,64,128; got 'eight'"),
    (["bench", "kernels", "--rows", "128,-1"], 2, "error: --rows takes positive token "
     "counts like 8,64,128; got '128,-1'"),
], ids=["bad-choice", "missing-keys-file", "unknown-model", "missing-data", "no-daemon",
        "vllm-flag-on-native", "native-flag-on-vllm", "vllm-rank", "vllm-cpu-nf4", "vllm-w8a8",
        "vllm-cpu-memory-utilization", "vllm-cpu-ray", "vllm-cpu-pipeline",
        "kv-cache-memory-no-unit",
        "compile-size-zero", "compile-size-word", "kernels-rows-negative"])
def test_a_mistake_is_one_line_and_an_exit_code(args, code, message, capsys, tmp_path):
    if args[0] == "serve":
        args = [*args, "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        app(args, prog_name="lorag")
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_installed_command_reports_a_mistake(tmp_path):
    command = [str(Path(sys.executable).parent / "lorag"), "search", "--namespace", "kb", "x",
               "--filter", "nokey", "--data-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --filter 'nokey' must be key=value"
