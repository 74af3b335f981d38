"""What every command group shares: the console, the error handling, common options."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lorag.errors import LoragError
from lorag.settings import Settings

console = Console(stderr=True)


class App(typer.Typer):
    """Typer app that turns lorag's errors into one clear line and an exit code."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except LoragError as e:  # the caller's mistake: say what and where
            # one unwrapped line, and the message taken literally (no rich markup)
            console.print("[red]error:[/red]", escape(e.message), soft_wrap=True)
            raise SystemExit(2) from None
        except RuntimeError as e:  # infrastructure: say what failed
            console.print("[red]failed:[/red]", escape(str(e)), soft_wrap=True)
            raise SystemExit(1) from None


def group(help_text: str) -> typer.Typer:
    """A command group (`lorag models ...`): shows its help when called bare."""
    return typer.Typer(help=help_text, no_args_is_help=True)


DataDir = Annotated[Path | None, typer.Option(
    help="State folder (without --url); default $LORAG_HOME/data.")]
State = Annotated[str | None, typer.Option(
    envvar="LORAG_STATE",
    help="State database: sqlite:///PATH (default <data-dir>/lorag.db), or "
         "postgresql://USER@HOST/DB to share tenants, adapters and documents with a fleet.")]
Url = Annotated[str | None, typer.Option(
    help="A running daemon's URL: work there instead of on the data dir.")]
DaemonUrl = Annotated[str, typer.Option("--url", help="The running daemon's URL.")]
ApiKey = Annotated[str | None, typer.Option(help="API key for the daemon.",
                                            envvar="LORAG_API_KEY")]
Tenant = Annotated[str, typer.Option(
    help="Whose namespaces, without --url (a daemon without API keys serves 'default').")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the JSON here.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def given_only(options: dict[str, object]) -> dict[str, object]:
    """The options given on the command line (None: left to the default)."""
    return {name: value for name, value in options.items() if value is not None}


def data_dir_or_default(data_dir: Path | None) -> Path:
    """--data-dir, else the settings' data dir."""
    return (data_dir or Settings().resolved_data_dir).expanduser()
