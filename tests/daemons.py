"""The daemons the tests talk to, both on 127.0.0.1 with API keys and small limits:

- `LocalDaemon`: `build_service` in this process, its HTTP app under uvicorn in a thread
  and its gRPC server, on either backend (the native one on the tiny Llama is the fast
  lane). Every part is what `lorag serve` runs, so the official `openai` client, a gRPC
  stub and `lorag --url` commands reach it over real sockets. Both backends serve their
  base model as BASE.
- `Daemon` (the e2e lane): `lorag serve` in a subprocess on the real default model.
"""

import functools
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import uvicorn

from lorag.benchmarks.daemon import DaemonProcess, free_port
from lorag.server.daemon import (
    ServeOptions,
    batch_runner,
    build_service,
    start_metrics,
    stop_metrics,
)
from lorag.server.engine import EngineConfig
from lorag.server.grpc_service import start_grpc
from lorag.server.http import create_app
from lorag.server.vllm_config import VllmOptions

KEYS = {"alice-admin-key-0001": {"tenant": "alice", "admin": True},
        "alice-user-key-00001": {"tenant": "alice", "admin": False},
        "bob-admin-key-000001": {"tenant": "bob", "admin": True},
        # fair shares of their own (server/quotas.py)
        "carol-two-streams-01": {"tenant": "carol", "max_streams": 2},
        "dave-one-token-a-sec": {"tenant": "dave", "tokens_per_s": 1}}
ALICE, ALICE_USER, BOB, CAROL, DAVE = (f"Bearer {key}" for key in KEYS)
BASE = "test-base"  # the base model's name in the API, on every test daemon
MAX_MODEL_LEN = 512
MAX_LORA_RANK = 32
MAX_NUM_SEQS, MAX_WAITING = 16, 8
LIMITS = {"max_model_len": MAX_MODEL_LEN, "max_lora_rank": MAX_LORA_RANK,
          "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": 256,
          "max_active_adapters": 4, "max_waiting": MAX_WAITING}


def embedding_model(daemon) -> str:
    """The name of the embedder a test daemon serves (its /v1/server says)."""
    return httpx.get(f"{daemon.url}/v1/server",
                     headers={"Authorization": ALICE}).json()["embedding_model"]


class _Health:
    """GET /health of the daemon at `self.url`: 200, and its JSON."""

    url: str

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


class LocalDaemon(_Health):
    """The daemon's parts in this process, serving `model` (a model folder)."""

    def __init__(self, model: Path, data_dir: Path, root: Path, keys: Path,
                 backend: str = "native", state: str | None = None):
        # ports 0: chosen at the first start (`_choose_ports`)
        options = ServeOptions(model=str(model), quantize="none", dtype="float32",
                               host="127.0.0.1", port=0, grpc_port=0, metrics_port=0,
                               data_dir=data_dir, api_keys=keys, state=state,
                               state_poll_s=0.5,
                               engine=EngineConfig(adapter_roots=[root], **LIMITS),
                               served_model_name=BASE, backend=backend,
                               # past the queue's capacity: test_http's flood fills the
                               # queue before any key reaches its share
                               max_streams_per_key=2 * (MAX_NUM_SEQS + MAX_WAITING),
                               vllm=VllmOptions(max_loras=8) if backend == "vllm" else None)
        self.options, self.backend, self.adapters = options, backend, root
        self.start()

    def _choose_ports(self) -> None:
        """Free ports for HTTP, gRPC and metrics, chosen once the engine runs: vLLM's
        engine binds ports of its own while it starts, and could take one chosen before."""
        options = self.options = replace(self.options, port=free_port(),
                                         grpc_port=free_port(), metrics_port=free_port())
        self.url = f"http://{options.host}:{options.port}"
        self.grpc_target = f"{options.host}:{options.grpc_port}"
        self.metrics_url = f"http://{options.host}:{options.metrics_port}/metrics"

    def start(self) -> None:
        """Build the service and serve it (HTTP, gRPC, metrics) on this daemon's ports."""
        self.service = build_service(self.options)
        if not self.options.port:
            self._choose_ports()
        options = self.options
        try:
            self.metrics = start_metrics(self.service, options.host, options.metrics_port)
        except BaseException:
            self.service.close()
            raise
        try:
            self.grpc = start_grpc(self.service, options.host, options.grpc_port,
                                   MAX_NUM_SEQS + MAX_WAITING)
        except BaseException:
            stop_metrics(self.metrics)
            self.service.close()
            raise
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.service, batch_runner=batch_runner(self.service, options)),
            host=options.host, port=options.port,
            log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn failed"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.grpc.stop(grace=None)
        stop_metrics(self.metrics)
        self.service.close()

    def restart(self) -> None:
        """Stop, then start again on the same data dir and ports (a redeploy)."""
        self.stop()
        self.start()


class Daemon(DaemonProcess, _Health):
    """`lorag serve` on the real default model (NF4, the daemon's default)."""

    def __init__(self, data_dir: Path, root: Path, keys: Path, log: Path):
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items()]
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        super().__init__(data_dir, ["--adapter-root", str(root), "--api-keys", str(keys),
                                    "--metrics-port", str(metrics_port), *flags], log)


def client(daemon, key: str = ALICE) -> openai.OpenAI:
    """The official OpenAI client for `daemon` as `key` (a bearer header), one per both:
    making one takes ~40 ms, and a test sending hundreds of requests spent half its time
    there."""
    return _client(daemon.url, key)


@functools.cache
def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key.split()[1], max_retries=0)
