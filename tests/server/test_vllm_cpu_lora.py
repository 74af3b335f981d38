"""The backported fix to vLLM-CPU's LoRA ops (server/vllm_cpu_lora.py), on tensors: rows
with slot index -1 are left as they were, the others get their slot's LoRA. The daemon's
greedy-agreement test (tests/server/test_vllm_backend.py) checks it inside vLLM."""

import torch

from lorag.server.vllm_cpu_lora import register

INDICES = torch.tensor([0, -1, 1, -1])  # rows 1 and 3: no adapter


def test_the_installed_plugin_is_what_vllm_loads():
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins["lorag_cpu_lora"] == "lorag.server.vllm_cpu_lora:register"
    assert plugins["lorag_cpu_seeds"] == "lorag.server.vllm_cpu_seeds:register"


def test_rows_without_an_adapter_are_left_alone():
    register()
    register()  # vLLM may load a plugin twice: still one wrapper
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_expand is lora_ops.bgmv_expand
    assert not hasattr(lora_ops.bgmv_expand.__wrapped__, "__wrapped__")
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    a = torch.randn(2, 1, 3, 8)  # [slots, 1, rank, in]
    b = torch.randn(2, 1, 6, 3)  # [slots, 1, out, rank]
    shrunk = torch.zeros(4, 3)
    lora_ops.bgmv_shrink(x, a, shrunk, INDICES, 0.5)
    for row, slot in ((0, 0), (2, 1)):
        assert torch.allclose(shrunk[row], 0.5 * a[slot, 0] @ x[row])
    assert not shrunk[1].any() and not shrunk[3].any()

    y = torch.ones(4, 6)
    lora_ops.bgmv_expand(shrunk, b, y, INDICES, add_inputs=True)
    assert torch.allclose(y[2], 1 + b[1, 0] @ shrunk[2])
    assert torch.equal(y[1], torch.ones(6)) and torch.equal(y[3], torch.ones(6))

    wide = torch.ones(4, 10)
    lora_ops.sgmv_expand_slice(shrunk, b, wide, torch.tensor([0, 1, 2, 3]),
                               torch.ones(4, dtype=torch.long), INDICES, 4, 1, 4, 2, 6,
                               add_inputs=True)
    assert torch.allclose(wide[0, 2:8], 1 + b[0, 0] @ shrunk[0])
    assert torch.equal(wide[3], torch.ones(10))  # -1: untouched, slice and all
