"""`lorag models pull|list` and `lorag generate`: the model cache and the base model alone."""

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorag import catalog
from lorag.cli.common import console, group
from lorag.provision import PULL_STAGES, ModelCache
from lorag.settings import Settings

app = group("Provision and list models in the model cache.")


@app.command("pull")
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(
        help="Catalog names; the default base model and embedder when left out.")] = None,
) -> None:
    """Provision catalog models into the model cache (idempotent)."""
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own tqdm bar; ours is the display
    entries = [catalog.lookup(n) for n in names or
               (catalog.DEFAULT_BASE_MODEL, catalog.DEFAULT_EMBEDDER)]
    cache = ModelCache(Settings().models_dir)
    columns = (SpinnerColumn(), TextColumn("{task.fields[model]:<24}"), BarColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for entry in entries:
            if cache.is_provisioned(entry):
                progress.add_task("already provisioned", model=entry.name, total=1, completed=1)
                continue
            task = progress.add_task("starting", model=entry.name, total=PULL_STAGES)

            def on_stage(stage: str, task=task) -> None:
                progress.update(task, description=stage)
                progress.advance(task)

            cache.pull(entry, on_stage)
            progress.update(task, description="done", completed=PULL_STAGES)
    for entry in entries:
        console.print(f"{entry.name}: {cache.path(entry.name)}")


@app.command("list")
def models_list() -> None:
    """Show the catalog and what is provisioned, with sizes."""
    cache = ModelCache(Settings().models_dir)
    table = Table("name", "kind", "provisioned", "size", "source", "path")
    table.columns[0].no_wrap = True
    table.columns[5].overflow = "fold"
    for row in cache.list():
        size = f"{row.size_bytes / 1e6:,.0f} MB" if row.path else ""
        table.add_row(row.entry.name, row.entry.kind, "yes" if row.path else "no", size,
                      row.entry.requirement, str(row.path or ""))
    Console().print(table)


def generate(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    model: Annotated[str, typer.Option(
        help="Catalog name, HF folder, .gguf file or hub id.")] = catalog.DEFAULT_BASE_MODEL,
    quantize: Annotated[str, typer.Option(help="nf4, int8, w8a8 or none.")] = "nf4",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens.")] = 128,
) -> None:
    """Answer one chat message with the base model (greedy), streaming to stdout."""
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    from lorag.models import load_base

    hf_logging.disable_progress_bar()
    base, tokenizer = load_base(model, quantize=quantize, dtype=dtype)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    base.generate(**inputs.to(base.device), max_new_tokens=max_tokens, do_sample=False,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id)
