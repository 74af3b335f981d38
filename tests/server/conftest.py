"""The fast lane's daemon: one `LocalDaemon` (tests/daemons.py) on the tiny Llama, shared
by the server tests, with adapters for it under its adapter root."""

import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from tests.daemons import LocalDaemon
from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def daemon_adapters(tmp_path_factory):
    """Adapters for the tiny model, strong enough to change its greedy answers; "too-wide"
    is above the daemon's rank limit."""
    root = tmp_path_factory.mktemp("adapter-root")
    make_adapters(tiny_model(), root, {"style": AdapterSpec(rank=16, alpha=32, scale=0.3),
                                       "other": AdapterSpec(rank=8, alpha=16, scale=0.3)},
                  seed=5)
    make_adapters(tiny_model(), root, {"too-wide": AdapterSpec(rank=48, alpha=32)}, seed=6)
    return root


@pytest.fixture(scope="session")
def daemon(tiny_base, daemon_adapters, keys_file, tmp_path_factory):
    """One daemon shared by the server tests."""
    local = LocalDaemon(tiny_base, tmp_path_factory.mktemp("data"), daemon_adapters, keys_file)
    yield local
    local.stop()
