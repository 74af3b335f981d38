"""`lorag keys hash`: what a keys file may hold instead of a key (server/auth.py)."""

import sys
from typing import Annotated

import typer

from lorag.cli.common import console, group

app = group("API keys for the daemon's --api-keys file.")


@app.command("hash")
def keys_hash(
    key: Annotated[str | None, typer.Argument(
        help="The key; read from standard input when left out (it then stays out of the "
             "shell's history).")] = None,
) -> None:
    """Print "sha256:<hex>" for a key: put it in the keys file in place of the key."""
    from lorag.server.auth import MIN_KEY_LENGTH, hash_key

    key = key if key is not None else sys.stdin.readline().strip()
    if len(key) < MIN_KEY_LENGTH:
        console.print(f"[red]a key must be at least {MIN_KEY_LENGTH} characters[/]")
        raise typer.Exit(2)
    print(hash_key(key))
