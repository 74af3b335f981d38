"""Benchmark progress and partial results: lines off a terminal, JSON after each system."""

import io
import json

from rich.console import Console

from lorag.benchmarks import progress as progress_module
from lorag.benchmarks.progress import BenchProgress, Report


def test_progress_off_a_terminal_is_written_as_plain_lines(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    out = io.StringIO()
    with BenchProgress(Console(file=out, width=120)) as progress, \
            progress.system("lorag", total=4) as tracker:
        tracker.restart()  # the warm-up is over
        tracker.done(10)
        tracker.done(10)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("lorag:")]
    assert lines[-1].startswith("lorag: 2/4 requests,") and "tok/s, ETA" in lines[-1]


def test_the_report_is_rewritten_after_each_system_and_complete_at_the_end(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = Report(path, lambda systems: {"systems": dict(systems)})
    report.add("a", {"tokens_per_s": 1.0})
    assert json.loads(path.read_text()) == {"systems": {"a": {"tokens_per_s": 1.0}},
                                            "partial": True}
    report.add("b", {"tokens_per_s": 2.0})
    final = report.finish()
    assert json.loads(path.read_text()) == final == json.loads(capsys.readouterr().out)
    assert final == {"systems": {"a": {"tokens_per_s": 1.0}, "b": {"tokens_per_s": 2.0}}}
