"""`lorag serve`: the daemon, with the engine's limits as flags."""

from pathlib import Path
from typing import Annotated

import typer

from lorag import catalog
from lorag.cli.common import DataDir, console, data_dir_or_default


def serve(
    model: Annotated[str, typer.Option(
        help="Catalog name, HF folder, .gguf file or hub id.")] = catalog.DEFAULT_BASE_MODEL,
    quantize: Annotated[str, typer.Option(help="nf4, int8 or none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="gRPC port.")] = 50051,
    adapter_root: Annotated[list[Path] | None, typer.Option(
        help="Folder adapters may be loaded from (repeatable); default <data-dir>/adapters.")]
        = None,
    data_dir: DataDir = None,
    api_keys: Annotated[Path | None, typer.Option(
        help='JSON {"<key>": {"tenant": "<name>", "admin": false}}; without it, open.')]
        = None,
    max_model_len: Annotated[int, typer.Option(min=1, help="Longest sequence.")] = 2048,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Sequences running at once.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="Tokens per step.")] =
        1024,
    max_waiting: Annotated[int, typer.Option(min=1, help="Queue bound (then 429).")] = 1024,
    max_lora_rank: Annotated[int, typer.Option(min=1, help="Highest adapter rank.")] = 64,
    max_active_adapters: Annotated[int, typer.Option(min=1, help="Compute slots.")] = 16,
    max_cpu_adapters_mb: Annotated[int, typer.Option(min=1, help="RAM tier budget.")] = 2048,
    auto_merge: Annotated[bool, typer.Option(
        help="Fold an adapter into the base weights while it is all the traffic "
             "(unquantized bases only).")] = True,
    chunk_tokens: Annotated[int, typer.Option(
        min=16, help="Retrieval chunk size for documents posted to the daemon, in tokens.")]
        = 200,
    chunk_overlap: Annotated[int, typer.Option(
        min=0, help="Tokens consecutive chunks share.")] = 40,
) -> None:
    """Start the daemon: OpenAI-compatible HTTP, gRPC, adapters, metrics, in one process."""
    from lorag.server.daemon import ServeOptions
    from lorag.server.daemon import serve as run
    from lorag.server.engine import EngineConfig

    engine = EngineConfig(
        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting,
        max_lora_rank=max_lora_rank, max_active_adapters=max_active_adapters,
        max_cpu_adapter_bytes=max_cpu_adapters_mb << 20, auto_merge=auto_merge,
        adapter_roots=[root.expanduser() for root in adapter_root or []])
    run(ServeOptions(model, quantize, dtype, host, port, grpc_port,
                     data_dir_or_default(data_dir), engine, api_keys, chunk_tokens,
                     chunk_overlap), console)
