"""`lorag adapters list|load|unload|pin|unpin|rollout`: a running daemon's adapters."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorag.cli.common import DEFAULT_URL, ApiKey, DaemonUrl, console, group
from lorag.client import DaemonClient

app = group("A running daemon's adapters: list, load, unload, pin, unpin, rollout.")
Name = Annotated[str, typer.Argument(help="The adapter's name.")]


@app.command("list")
def list_(url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """The adapters this key sees, with where each one is."""
    show(DaemonClient(url, api_key).adapters())


@app.command()
def load(
    name: Name,
    path: Annotated[str, typer.Argument(
        help="PEFT adapter folder, inside one of the daemon's adapter roots; or a remote "
             "source: s3://bucket/prefix, https://host/file.tar.gz#sha256=<hex>, "
             "hf://org/name@revision.")],
    shared: Annotated[bool, typer.Option(help="Let every tenant use it.")] = False,
    url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None,
) -> None:
    """Register an adapter folder under a name (again: refreshes it); `name@version`
    registers a version of `name`, for `lorag adapters rollout`."""
    where = path if "://" in path else str(Path(path).expanduser().resolve())
    row = DaemonClient(url, api_key).load_adapter(name, where, shared)
    console.print(f"{name}: {'loaded' if row['loaded'] else 'already loaded (refreshed)'}")
    show([row])


@app.command()
def unload(name: Name, url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Forget an adapter; requests running with it finish."""
    DaemonClient(url, api_key).unload_adapter(name)
    console.print(f"{name}: unloaded")


@app.command()
def pin(name: Name, url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Keep an adapter in a compute slot until unpinned."""
    show([DaemonClient(url, api_key).pin_adapter(name, pinned=True)])


@app.command()
def unpin(name: Name, url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Let a pinned adapter be evicted again."""
    show([DaemonClient(url, api_key).pin_adapter(name, pinned=False)])


@app.command()
def rollout(
    name: Name,
    versions: Annotated[list[str], typer.Argument(
        metavar="VERSION=WEIGHT...", help="Weights of registered versions of NAME "
        "(NAME@VERSION), e.g. v3=90 v4=10; v4=100 promotes v4.")],
    url: DaemonUrl = DEFAULT_URL, api_key: ApiKey = None,
) -> None:
    """Serve NAME by weighted versions, sticky per API key, on every replica at once."""
    weights = {}
    for item in versions:
        version, _, weight = item.partition("=")
        if not version or not weight.isdigit():
            raise typer.BadParameter(f"{item!r}: give VERSION=WEIGHT, the weight an integer")
        weights[version] = int(weight)
    answer = DaemonClient(url, api_key).rollout(name, weights)
    console.print(f"{name}: " + ", ".join(f"{v} {w}" for v, w in answer["versions"].items()))


def show(rows: list[dict]) -> None:
    """Adapters as a table: kind, registered, in RAM, in a slot, pinned, running
    requests."""
    table = Table("adapter", "kind", "owner", "shared", "status", "pinned", "running", "path")
    table.columns[-1].overflow = "fold"
    for row in rows:
        status = "in a slot" if row["active"] else "in RAM" if row["in_ram"] else "registered"
        table.add_row(row["name"], row.get("kind", ""), row["owner"],
                      "yes" if row["shared"] else "", status,
                      "yes" if row["pinned"] else "", str(row["running_requests"]),
                      row["path"])
    Console().print(table)
