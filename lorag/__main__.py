"""`python -m lorag` runs the CLI. The guard matters: vLLM's engine processes are
spawned, and a spawned child imports the parent's main module again."""

from lorag.cli import app

if __name__ == "__main__":
    app()
