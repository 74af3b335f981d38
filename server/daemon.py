"""`lorag serve`: one process with the engine, the HTTP API and the gRPC API.

Start-up order: keys and the state database (SQLite under the data dir, or a fleet's
PostgreSQL: migrated, or refused with a clear error) are checked first, so a bad flag or
an unreachable database fails in seconds, not after the model has loaded; then the model,
the engine, gRPC, and HTTP (uvicorn, in the main thread: it owns the signals).

Shutdown drains first (SIGTERM or Ctrl-C): readiness fails and new requests get 503 /
UNAVAILABLE at once, while the requests in flight run to their end for up to
`--shutdown-timeout` seconds (the rest end with an error event); then HTTP, gRPC and the
engine stop, in reverse order, and the process exits 0. A second signal stops at once.
"""

import logging
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import torch
import uvicorn
from prometheus_client import start_http_server
from rich.console import Console
from transformers.utils import logging as hf_logging

from lorag.errors import InvalidRequest
from lorag.models import load_base, resolve_dtype
from lorag.names import check_name
from lorag.retrieval.embedder import Embedder
from lorag.retrieval.store import DocumentStore
from lorag.server.auth import ApiKeys
from lorag.server.backend import Backend
from lorag.server.batches import CONCURRENCY, LEASE_S, BatchRunner
from lorag.server.engine import Engine, EngineConfig
from lorag.server.grpc_service import start_grpc
from lorag.server.http import MAX_BODY_BYTES, create_app
from lorag.server.limits import RequestLimits
from lorag.server.quotas import KeyQuotas
from lorag.server.service import Service
from lorag.server.sources import CACHE_MB, AdapterCache
from lorag.server.state import StateStore
from lorag.server.vllm_config import VllmOptions
from lorag.state import Database, state_url
from lorag.threads import use_threads

log = logging.getLogger("lorag.daemon")


@dataclass
class ServeOptions:
    """Everything `lorag serve` takes. An engine config without adapter roots gets
    `<data_dir>/adapters`."""

    model: str
    quantize: str
    dtype: str
    host: str
    port: int
    grpc_port: int
    data_dir: Path
    engine: EngineConfig
    api_keys: Path | None = None
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    served_model_name: str | None = None  # default: the model folder's name
    state: str | None = None  # the state database's URL; default SQLite in data_dir
    state_poll_s: float = 2.0  # how often other replicas' writes are polled for
    backend: str = "native"  # or "vllm", with `vllm`'s options
    vllm: VllmOptions | None = None
    shutdown_timeout_s: float = 30.0  # how long requests in flight may finish on SIGTERM
    metrics_port: int | None = None  # the full /metrics, for Prometheus and routers
    max_body_bytes: int = MAX_BODY_BYTES  # a larger JSON request body gets a 413
    # each API key's fair share (server/quotas.py); keys may carry their own
    max_streams_per_key: int | None = None  # requests in flight; default max_num_seqs
    tokens_per_s_per_key: float = 0.0  # 0: no rate limit
    limits: RequestLimits = field(default_factory=RequestLimits)  # per request
    batch_concurrency: int = CONCURRENCY  # a batch's lines this replica runs at once
    batch_lease_s: float = LEASE_S  # a dead replica's lines are taken over after this
    adapter_cache_mb: int = CACHE_MB  # adapters fetched from remote sources, at most
    adapter_source: str | None = None  # where unregistered adapters are looked for
    threads: int | None = None  # every pool's threads (lorag/threads.py); None: torch's own


def batch_runner(service: Service, options: ServeOptions) -> BatchRunner:
    """This replica's runner of batch lines, as `options` say."""
    return BatchRunner(service, options.batch_concurrency, options.batch_lease_s)


def build_service(options: ServeOptions) -> Service:
    """Keys, state, model and engine, ready to serve (the engine's loop started)."""
    hf_logging.disable_progress_bar()  # a daemon's log is not a terminal
    name = check_name(options.served_model_name or Path(options.model).name,
                      "served_model_name", "served model name")
    keys = ApiKeys.from_file(options.api_keys) if options.api_keys else ApiKeys()
    # from here on torch.get_num_threads() is the thread count: the banner and vLLM-CPU's
    # workers read it there
    if options.threads is not None:
        use_threads(options.threads)
    db = Database(state_url(options.state, options.data_dir))
    try:
        config = options.engine
        if not config.adapter_roots:
            config = replace(config, adapter_roots=[options.data_dir / "adapters"])
        # adapters from remote sources are fetched here: a root the engine reads from
        cache = AdapterCache(options.data_dir / "adapter-cache", options.adapter_cache_mb << 20)
        config = replace(config, adapter_roots=[*config.adapter_roots, cache.folder])
        for root in config.adapter_roots:
            root.mkdir(parents=True, exist_ok=True)
        documents = DocumentStore(db, options.data_dir / "retrieval", Embedder(),  # lazy
                                  options.chunk_tokens, options.chunk_overlap)
        engine = start_backend(options, config)
    except BaseException:
        db.close()
        raise
    try:
        quotas = KeyQuotas(options.max_streams_per_key or config.max_num_seqs,
                           options.tokens_per_s_per_key)
        service = Service(engine, StateStore(db), keys, model_name=name, documents=documents,
                          quotas=quotas, limits=options.limits, adapter_cache=cache,
                          adapter_source=options.adapter_source)
        service.follow_state(options.state_poll_s)
    except BaseException:  # the engine's loop is running: it must not outlive this
        engine.shutdown()
        db.close()
        raise
    return service


def start_backend(options: ServeOptions, config: EngineConfig) -> Backend:
    """The engine `options.backend` names, loaded and serving."""
    if options.backend == "vllm":
        from lorag.server.vllm_backend import VllmBackend

        dtype = str(resolve_dtype(options.dtype)).removeprefix("torch.")
        return VllmBackend(options.model, dtype, options.quantize, config,
                           options.vllm or VllmOptions(), options.data_dir / "vllm-adapters")
    if options.backend != "native":
        raise InvalidRequest(f"backend must be native or vllm, got {options.backend!r}",
                             field="backend")
    model, tokenizer = load_base(options.model, quantize=options.quantize, dtype=options.dtype)
    return Engine(model, tokenizer, config).start()


def serve(options: ServeOptions, console: Console) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    service = build_service(options)
    grpc_server = metrics_server = None
    try:  # however serving ends (a port in use included), the engine stops with it
        grpc_server = start_grpc(service, options.host, options.grpc_port,
                                 options.engine.max_num_seqs + options.engine.max_waiting)
        if options.metrics_port is not None:
            metrics_server = start_metrics(service, options.host, options.metrics_port)
        _serve(service, options, console)
    finally:
        if metrics_server is not None:
            stop_metrics(metrics_server)
        if grpc_server is not None:
            grpc_server.stop(grace=2)
        service.close()


def start_metrics(service: Service, host: str, port: int) -> WSGIServer:
    """The full Prometheus exposition (every tenant's adapters named) on its own port, in
    a thread: for Prometheus and routers, on a network tenants do not reach."""
    server, _ = start_http_server(port, host, service.metrics.registry)
    return server


def stop_metrics(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()


def _serve(service: Service, options: ServeOptions, console: Console) -> None:
    """The banner, then HTTP until a signal ends it."""
    roots = ", ".join(str(r) for r in service.engine.limits.adapter_roots)
    parts = [f"[bold]lorag[/] serving {service.model_name} "
             f"({options.quantize}; {service.engine.describe()}; "
             f"{torch.get_num_threads()} threads)",
             f"HTTP http://{options.host}:{options.port}/v1",
             f"gRPC {options.host}:{options.grpc_port}"]
    if options.metrics_port is not None:
        parts.append(f"metrics http://{options.host}:{options.metrics_port}/metrics")
    parts += [f"adapter roots {roots}", f"state {service.store.db.name}",
              f"{len(service.adapters.records)} adapters known"]
    console.print(" | ".join(parts))
    if service.keys.open:
        where = "loopback only" if options.host in ("127.0.0.1", "localhost", "::1") else \
            f"{options.host}: ANYONE WHO CAN REACH IT"
        console.print(f"[yellow]No API keys configured (--api-keys): the daemon is OPEN to "
                      f"{where}; every caller is the admin of tenant 'default'.[/]")
    signal.signal(signal.SIGHUP, lambda *_: service.keys.reload())  # `kill -HUP`: new keys
    app = create_app(service, options.max_body_bytes, batch_runner(service, options))
    config = uvicorn.Config(app, host=options.host,
                            port=options.port, log_level="warning", timeout_graceful_shutdown=5,
                            # h11, not httptools: it bounds a request head while it arrives
                            # (httptools took an 8 MB header); BodyLimit answers the 431
                            http="h11",
                            h11_max_incomplete_event_size=options.limits.header_kb << 10)
    DrainingServer(config, service, options.shutdown_timeout_s, console).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM / SIGINT drains the service (`Service.drain`, in a
    thread: the event loop keeps answering, with 503s) before the server exits; a second
    signal exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, service: Service, timeout: float,
                 console: Console):
        super().__init__(config)
        self.service, self.timeout, self.console = service, timeout, console
        self.drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drainer is not None:
            super().handle_exit(sig, frame)
            return
        # not uvicorn's: it would re-raise the signal at the end, and the exit status
        # of a drained daemon is 0
        self.drainer = threading.Thread(target=self._drain, name="lorag-drain", daemon=True)
        self.drainer.start()

    def _drain(self) -> None:
        running = len(self.service.in_flight)
        self.console.print(f"draining: no new requests; {running} in flight may finish "
                           f"within {self.timeout:g} s")
        cut = self.service.drain(self.timeout)
        if cut:
            self.console.print(f"[yellow]{cut} requests still running after "
                               f"{self.timeout:g} s were ended with an error[/]")
        self.should_exit = True
