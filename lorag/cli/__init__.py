"""The `lorag` command line: the top floor, one module per command group.

    lorag models pull|list     lorag generate       lorag serve
    lorag train                lorag export         lorag ingest     lorag search
    lorag namespaces list|delete                    lorag adapters list|load|unload|pin|unpin
    lorag eval retrieval|generate                   lorag bench serving|training|retrieval|load
    lorag keys hash

Commands import the heavy parts (torch, the daemon, the trainer) when they run, so
`lorag --help` and the daemon clients start fast.
"""

from lorag.cli import adapters, bench, evaluate, keys, models, retrieval, serve, train
from lorag.cli.common import App

app = App(help="One quantized base model, many LoRA adapters, grounded by retrieval.",
          no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(models.app, name="models")
app.command()(models.generate)
app.command()(serve.serve)
app.command()(train.train)
app.command()(train.export)
app.command()(retrieval.ingest)
app.command()(retrieval.search)
app.add_typer(retrieval.namespaces_app, name="namespaces")
app.add_typer(adapters.app, name="adapters")
app.add_typer(keys.app, name="keys")
app.add_typer(evaluate.app, name="eval")
app.add_typer(bench.app, name="bench")
