"""`lorag train` and `lorag export`: LoRA fine-tuning with TRL, and merging into the base."""

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from lorag import catalog
from lorag.cli.common import ApiKey, DataDir, State, Tenant, Url, console, given_only
from lorag.cli.retrieval import namespaces_at
from lorag.client import DaemonClient


def train(
    data: Annotated[Path, typer.Option(help="JSONL: messages, prompt/completion, or text.")],
    out: Annotated[Path, typer.Option(help="Folder for the adapter and training.json.")],
    base: Annotated[str, typer.Option(help="Catalog name, HF folder, .gguf or hub id.")] =
        catalog.DEFAULT_BASE_MODEL,
    method: Annotated[str | None, typer.Option(
        help="full, freeze (the last --train-last-layers blocks and the LM head), lora, "
             "qlora, dora, ia3, prompt or prefix (docs/training.md). Default: lora, or "
             "qlora with --quantize nf4.")] = None,
    rank: Annotated[int | None, typer.Option(help="[lora/qlora/dora] Rank r (16).")] = None,
    alpha: Annotated[int | None, typer.Option(help="[lora/qlora/dora] Alpha (32).")] = None,
    dropout: Annotated[float | None, typer.Option(
        help="[lora/qlora/dora] Dropout (0.05).")] = None,
    target_modules: Annotated[str | None, typer.Option(
        help="[lora/qlora/dora/ia3] Comma-separated projections, or all-linear (default "
             "q,k,v,o_proj; ia3: k_proj,v_proj,down_proj).")] = None,
    rslora: Annotated[bool | None, typer.Option(
        help="[lora/qlora/dora] Scale by alpha/sqrt(r).")] = None,
    num_virtual_tokens: Annotated[int | None, typer.Option(
        help="[prompt/prefix] Learned virtual tokens (20).")] = None,
    prompt_init: Annotated[str | None, typer.Option(
        help="[prompt] Start the virtual tokens from this text's embeddings (default: "
             "random).")] = None,
    train_last_layers: Annotated[int | None, typer.Option(
        help="[freeze] Decoder blocks that train, from the top (2).")] = None,
    quantize: Annotated[str | None, typer.Option(
        help="The base's precision while training: none, nf4 (qlora; also dora, ia3, "
             "prompt, prefix) or int8 (lora, ia3, prompt, prefix).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16 or float32.")] = "auto",
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 3.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (> 0).")] = -1,
    lr: Annotated[float | None, typer.Option(
        help="Learning rate (default by method: full 2e-5, freeze 1e-4, LoRA kinds 2e-4, "
             "ia3 3e-3, prompt 3e-2, prefix 1e-2).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per device step.")] = 8,
    grad_accum: Annotated[int, typer.Option(
        "--grad-accum", "--gradient-accumulation-steps",
        help="Steps whose gradients add up before one update.")] = 1,
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
    rag_namespace: Annotated[str | None, typer.Option(
        help="RAFT: --data is a question file (question, answer, optional source and "
             "system; \"answerable\": false and no answer for one to abstain on); each "
             "question is asked with the passages this namespace's search finds, in the "
             "daemon's RAG prompt.")] = None,
    rag_top_k: Annotated[int | None, typer.Option(help="[RAFT] Passages per prompt.")] = None,
    rag_mode: Annotated[str | None, typer.Option(help="[RAFT] vector, bm25 or hybrid.")] =
        None,
    oracle_p: Annotated[float | None, typer.Option(
        help="[RAFT] Share of prompts holding the gold passage (default 0.8); the others "
             "hold distractors only and teach the abstention answer.")] = None,
    answer_format: Annotated[str | None, typer.Option(
        help="[RAFT] text ('answer (source: id)') or json ({answer, source}).")] = None,
    abstain_answer: Annotated[str | None, typer.Option(
        help="[RAFT] The answer when the passages do not hold it.")] = None,
    rag_draws: Annotated[int | None, typer.Option(
        help="[RAFT] Chats per question, each drawn anew (gold passage or distractors): "
             "with --epochs 1, N draws train like N epochs whose prompts differ "
             "(default 1).")] = None,
    rag_max_prompt_tokens: Annotated[int | None, typer.Option(
        min=1, help="[RAFT] The serving daemon's prompt budget (its --max-model-len minus "
                    "the answer's room: max_tokens, else 256): passages past it are dropped "
                    "as that daemon drops them. Default: none dropped.")] = None,
    dump_examples: Annotated[Path | None, typer.Option(
        help="[RAFT] Write each training chat, with its gold and passages, here.")] = None,
    task: Annotated[str, typer.Option(
        help="chat, or rerank: a relevance adapter the daemon reranks RAG passages with "
             "(--data: query/passage/relevant pairs, or with --rag-namespace a question "
             "file whose gold passages and hard negatives are searched there).")] = "chat",
    rerank_negatives: Annotated[int | None, typer.Option(
        help="[rerank] Hard negatives per question (default 3).")] = None,
    url: Url = None, data_dir: DataDir = None, state: State = None,
    tenant: Tenant = "default",
) -> None:
    """Fine-tune with TRL: a PEFT adapter the daemon loads (LoRA by default), or a complete
    model (--method full / freeze)."""
    from lorag.trainer.methods import METHODS
    from lorag.trainer.train import TrainOptions
    from lorag.trainer.train import train as run

    targets = None if target_modules is None else \
        [m.strip() for m in target_modules.split(",") if m.strip()]
    options = TrainOptions(
        data=data, base=base, out=out, method=method, rank=rank, alpha=alpha,
        dropout=dropout, target_modules=targets, rslora=rslora,
        num_virtual_tokens=num_virtual_tokens, prompt_init=prompt_init,
        train_last_layers=train_last_layers, quantize=quantize, dtype=dtype, epochs=epochs,
        max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        max_seq_len=max_seq_len, packing=packing, gradient_checkpointing=gradient_checkpointing,
        seed=seed, eval_split=eval_split, eval_data=eval_data, train_on_prompt=train_on_prompt,
        save_steps=save_steps, resume=resume, task=task)  # checked before data is built
    if serve and not METHODS[options.method].adapter:
        raise typer.BadParameter(f"--method {options.method} writes a complete model, not an "
                                 f"adapter to hot-load: serve it with lorag serve --model "
                                 f"{out}", param_hint="--serve")
    if task == "rerank":
        raft_only = {"--rag-top-k": rag_top_k, "--oracle-p": oracle_p,
                     "--answer-format": answer_format, "--abstain-answer": abstain_answer,
                     "--rag-max-prompt-tokens": rag_max_prompt_tokens, "--rag-draws": rag_draws}
        for flag, value in raft_only.items():
            if value is not None:
                raise typer.BadParameter("a RAFT option; --task rerank takes --rag-namespace, "
                                         "--rag-mode and --rerank-negatives", param_hint=flag)
        source = None if rag_namespace is None else \
            namespaces_at(url, api_key, data_dir, state, tenant)
        chats, record = _relevance_data(data, out, rag_namespace, dump_examples, seed, source,
                                        mode=rag_mode, negatives=rerank_negatives)
        options = replace(options, data=chats, rerank=record)
    elif rerank_negatives is not None:
        raise typer.BadParameter("only with --task rerank", param_hint="--rerank-negatives")
    elif rag_namespace is not None:
        fit = None if rag_max_prompt_tokens is None else \
            daemon_fit(base, rag_max_prompt_tokens)
        chats, rag = _raft_data(data, out, rag_namespace, dump_examples, seed,
                                namespaces_at(url, api_key, data_dir, state, tenant), fit,
                                top_k=rag_top_k, mode=rag_mode, oracle_p=oracle_p,
                                answer_format=answer_format, abstain=abstain_answer,
                                draws=rag_draws)
        options = replace(options, data=chats, rag=rag)
    report = run(options, console)
    console.print(f"{report['wrote']['kind']} ({report['method']}): {out} | steps "
                  f"{report['global_step']} | final loss {report['final_loss']} | "
                  f"{report['tokens_per_s']} tok/s | peak "
                  f"{report['peak_memory_mb']} MB | {report['wall_s']} s")
    if serve:
        name = serve_name or out.resolve().name
        DaemonClient(serve, api_key).load_adapter(name, str(out.resolve()))
        auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
        console.print(f"loaded into {serve} as {name!r}; try:")
        print(f"curl -s {serve.rstrip('/')}/v1/chat/completions -H 'Content-Type: "
              f"application/json'{auth} -d '{{\"model\": \"{name}\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"Hello\"}]}'")


def daemon_fit(base: str, budget: int):
    """The passages a daemon serving `base` keeps in a RAG prompt of `budget` tokens: its
    chat template, its token counts, its rule (retrieval/rag.py augment)."""
    from transformers import AutoTokenizer

    from lorag.models import resolve_model
    from lorag.provision import ModelCache
    from lorag.server.chat_template import render_grounded
    from lorag.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(base, ModelCache(
        Settings().models_dir)))

    def fit(messages: list[dict], hits: list) -> list:
        return render_grounded(tokenizer, messages, hits, budget).used

    return fit


def _raft_data(questions: Path, out: Path, namespace: str, dump: Path | None, seed: int,
               source, fit, **given) -> tuple[Path, dict]:
    """RAFT's training chats from `questions`, searched in `source`'s `namespace`."""
    from lorag.retrieval.store import Hit
    from lorag.trainer.raft import RaftOptions, write_raft_data

    options = RaftOptions(namespace, seed=seed, **given_only(given))

    def search(question: str, k: int) -> list[Hit]:
        return [Hit(**hit) for hit in source.search(namespace, question, k, options.mode)]

    chats, record = write_raft_data(questions, search, options, out, dump, fit)
    console.print(f"RAFT: {record['examples']} chats from {namespace!r} "
                  f"({record['with_oracle']} with the gold passage), {record['left_out']} "
                  f"questions left out (gold not found); training on {chats}")
    return chats, record


def _relevance_data(data: Path, out: Path, namespace: str | None, dump: Path | None,
                    seed: int, source, **given) -> tuple[Path, dict]:
    """A relevance adapter's chats: from a pair file, or searched in `source`'s
    `namespace` for a question file."""
    from lorag.retrieval.store import Hit
    from lorag.trainer.relevance import RelevanceOptions, write_relevance_data

    options = RelevanceOptions(namespace, seed=seed, **given_only(given))

    def search(question: str, k: int) -> list[Hit]:
        return [Hit(**hit) for hit in source.search(namespace, question, k, options.mode)]

    chats, record = write_relevance_data(data, out, options, search, dump)
    console.print(f"rerank: {record['pairs']} pairs ({record['relevant']} relevant), "
                  f"{record['left_out']} questions left out (gold not among the candidates); "
                  f"training on {chats}")
    return chats, record


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
