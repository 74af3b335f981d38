"""A benchmark's progress on stderr, and its results on disk as soon as each is measured.

A serving run takes many minutes per system; stdout carries only the final JSON (so it
can be piped), so progress goes to stderr through rich: one line per system with the
requests done, tokens/s so far and an ETA, redrawn in place on a terminal and written as
a plain line every LOG_EVERY_S seconds to a file or pipe (a CI log, `2> bench.log`).
`Report` rewrites the JSON file after every system, so a run cut short still leaves what
it measured (marked `"partial": true`).
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_EVERY_S = 10.0


class Tracker:
    """One system's counters, fed by the system's runner: `done(tokens)` per finished
    request, `tokens(n)` as tokens stream (optional)."""

    def __init__(self, progress: Progress, task, total: int | None, name: str):
        self.progress, self.task, self.total, self.name = progress, task, total, name
        self.requests = self.generated = 0
        self.start = self.logged = time.perf_counter()

    def restart(self) -> None:
        """Zero the clock and counters: the warm-up is over, the measured part begins."""
        self.requests = self.generated = 0
        self.start = time.perf_counter()
        self.progress.reset(self.task, total=self.total)

    def tokens(self, n: int) -> None:
        self.generated += n
        self._show()

    def done(self, tokens: int = 0) -> None:
        self.requests += 1
        self.generated += tokens
        self._show()

    def _show(self) -> None:
        now = time.perf_counter()
        rate = self.generated / max(now - self.start, 1e-9)
        self.progress.update(self.task, completed=self.requests, rate=f"{rate:7.1f} tok/s")
        console = self.progress.console
        if not console.is_terminal and now - self.logged >= LOG_EVERY_S:
            self.logged = now
            left = ""
            if self.total and self.requests:
                eta = (now - self.start) / self.requests * (self.total - self.requests)
                left = f", ETA {eta:.0f} s"
            console.print(f"{self.name}: {self.requests}/{self.total or '?'} requests, "
                          f"{rate:.1f} tok/s{left}", highlight=False)


class BenchProgress:
    """`with progress.system("lorag", total=256) as tracker:` shows one line per system."""

    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console or Console(stderr=True))

    def __enter__(self) -> "BenchProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextmanager
    def system(self, name: str, total: int | None) -> Iterator[Tracker]:
        """A line for `name`; total None: no count to show (a bar that pulses)."""
        task = self.progress.add_task(name, total=total, rate="")
        tracker = Tracker(self.progress, task, total, name)
        try:
            yield tracker
        finally:
            if total is not None:
                self.progress.update(task, completed=tracker.requests)
            self.progress.stop_task(task)


class Report:
    """The benchmark's JSON, rewritten after each system; `build()` makes it from the
    systems measured so far."""

    def __init__(self, path: Path | None, build: Callable[[dict], dict]):
        self.path, self.build = path, build
        self.systems: dict = {}

    def add(self, name: str, result: dict) -> None:
        self.systems[name] = result
        self._write({**self.build(self.systems), "partial": True})

    def finish(self) -> dict:
        """The complete result, printed to stdout and written."""
        result = self.build(self.systems)
        print(json.dumps(result, indent=2))
        self._write(result)
        return result

    def _write(self, result: dict) -> None:
        if self.path is not None:
            Path(self.path).write_text(json.dumps(result, indent=2) + "\n")
