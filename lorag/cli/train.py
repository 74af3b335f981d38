"""`lorag train` and `lorag export`: LoRA fine-tuning with TRL, and merging into the base."""

from pathlib import Path
from typing import Annotated

import typer

from lorag import catalog
from lorag.cli.common import ApiKey, console
from lorag.client import DaemonClient


def train(
    data: Annotated[Path, typer.Option(help="JSONL: messages, prompt/completion, or text.")],
    out: Annotated[Path, typer.Option(help="Folder for the adapter and training.json.")],
    base: Annotated[str, typer.Option(help="Catalog name, HF folder, .gguf or hub id.")] =
        catalog.DEFAULT_BASE_MODEL,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[str, typer.Option(
        help="Comma-separated projections, or all-linear.")] = "q_proj,k_proj,v_proj,o_proj",
    rslora: Annotated[bool, typer.Option(help="Scale by alpha/sqrt(r).")] = False,
    dora: Annotated[bool, typer.Option(help="DoRA (trains; the daemon does not serve it).")]
        = False,
    quantize: Annotated[str, typer.Option(help="none, or nf4 for QLoRA.")] = "none",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 3.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (> 0).")] = -1,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per device step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_seq_len: Annotated[int, typer.Option(help="Tokens per example (longer: cut).")] =
        1024,
    packing: Annotated[bool, typer.Option(help="Pack examples into full sequences.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")]
        = False,
    seed: Annotated[int, typer.Option(help="Seed for data order and init.")] = 0,
    eval_split: Annotated[float | None, typer.Option(help="Hold out this fraction.")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="A separate JSONL to evaluate on.")]
        = None,
    train_on_prompt: Annotated[bool, typer.Option(
        help="Loss on prompts too (default: completions / final assistant turn only).")] =
        False,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    serve: Annotated[str | None, typer.Option(
        help="A running daemon's URL: hot-load the adapter there when training ends.")] = None,
    serve_name: Annotated[str | None, typer.Option(
        help="Name to serve it under (default: the --out folder's name).")] = None,
    api_key: ApiKey = None,
) -> None:
    """Fine-tune a LoRA (or QLoRA) adapter with TRL; writes a PEFT adapter the daemon loads."""
    from lorag.trainer.train import TrainOptions
    from lorag.trainer.train import train as run

    options = TrainOptions(
        data=data, base=base, out=out, rank=rank, alpha=alpha, dropout=dropout,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
        rslora=rslora, dora=dora, quantize=quantize, dtype=dtype, epochs=epochs,
        max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        max_seq_len=max_seq_len, packing=packing, gradient_checkpointing=gradient_checkpointing,
        seed=seed, eval_split=eval_split, eval_data=eval_data, train_on_prompt=train_on_prompt,
        save_steps=save_steps, resume=resume)
    report = run(options, console)
    console.print(f"adapter: {out} | steps {report['global_step']} | final loss "
                  f"{report['final_loss']} | {report['tokens_per_s']} tok/s | peak "
                  f"{report['peak_memory_mb']} MB | {report['wall_s']} s")
    if serve:
        name = serve_name or out.resolve().name
        DaemonClient(serve, api_key).load_adapter(name, str(out.resolve()))
        auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
        console.print(f"loaded into {serve} as {name!r}; try:")
        print(f"curl -s {serve.rstrip('/')}/v1/chat/completions -H 'Content-Type: "
              f"application/json'{auth} -d '{{\"model\": \"{name}\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"Hello\"}]}'")


def export(
    adapter: Annotated[Path, typer.Option(help="The PEFT adapter folder.")],
    out: Annotated[Path, typer.Option(
        help="Where to write: the merged model (new folder), or with --gguf the .gguf file.")],
    base: Annotated[str, typer.Option(help="The adapter's base model.")] =
        catalog.DEFAULT_BASE_MODEL,
    gguf: Annotated[bool, typer.Option(
        "--gguf", help="Write the adapter as a llama.cpp LoRA file (llama-server --lora) "
                       "instead of merging it.")] = False,
    dtype: Annotated[str, typer.Option(
        help="float32 or bfloat16 for the saved weights (--gguf: float16 too).")] = "float32",
) -> None:
    """Merge an adapter into its base (a model transformers loads without PEFT), or with
    --gguf write it as a LoRA for llama.cpp."""
    if gguf:
        from lorag.models import resolve_model
        from lorag.provision import ModelCache
        from lorag.settings import Settings
        from lorag.trainer.gguf import export_gguf

        folder = resolve_model(base, ModelCache(Settings().models_dir))
        console.print(f"llama.cpp LoRA: {export_gguf(adapter, folder, out, dtype)}")
        return
    from lorag.trainer.export import export as run

    console.print(f"merged model: {run(adapter, base, out, dtype)}")
