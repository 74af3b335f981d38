"""A real daemon (`lorag serve` in a subprocess) on 127.0.0.1, with real adapters."""

import json
from pathlib import Path

import httpx
import pytest

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import DaemonProcess
from lorag.models import load_base

KEYS = {"alice-admin-key-0001": {"tenant": "alice", "admin": True},
        "alice-user-key-00001": {"tenant": "alice", "admin": False},
        "bob-admin-key-000001": {"tenant": "bob", "admin": True}}
ALICE, ALICE_USER, BOB = (f"Bearer {key}" for key in KEYS)
MAX_MODEL_LEN = 512
MAX_LORA_RANK = 32


class Daemon(DaemonProcess):
    """The daemon these tests run: API keys on, small limits so limits can be hit."""

    def __init__(self, data_dir: Path, root: Path, keys: Path, log: Path):
        super().__init__(data_dir, [
            "--adapter-root", str(root), "--api-keys", str(keys),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-lora-rank", str(MAX_LORA_RANK),
            "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
            "--max-active-adapters", "4"], log)

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="session")
def daemon_adapters(base_model_dir, tmp_path_factory) -> Path:
    """Adapters for the real base model, strong enough to change greedy answers."""
    root = tmp_path_factory.mktemp("adapter-root")
    model, _ = load_base(str(base_model_dir), quantize="none", dtype="float32")
    make_adapters(model, root, {"style": AdapterSpec(rank=16, alpha=32, scale=0.1),
                                "other": AdapterSpec(rank=8, alpha=16, scale=0.1)}, seed=5)
    make_adapters(model, root, {"too-wide": AdapterSpec(rank=48, alpha=32)}, seed=6)
    return root


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


@pytest.fixture(scope="session")
def start_daemon(daemon_adapters, keys_file, tmp_path_factory):
    """Start daemons (on a given data dir); every one is stopped at the end."""
    started = []

    def start(data_dir: Path | None = None) -> Daemon:
        data_dir = data_dir or tmp_path_factory.mktemp("data")
        daemon = Daemon(data_dir, daemon_adapters, keys_file, data_dir / "daemon.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.stop()


@pytest.fixture(scope="session")
def daemon(start_daemon) -> Daemon:
    """One daemon shared by the tests that do not restart it."""
    return start_daemon()
