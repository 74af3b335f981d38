"""`python -m lorag` runs the CLI."""

from lorag.cli import app

app()
