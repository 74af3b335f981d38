"""`lorag bench methods` on the tiny Llama: every method trains in its own
process and every column of the table is filled, the chart drawn."""

import json

import pytest
from typer.testing import CliRunner

from lorag.cli import app
from lorag.trainer.methods import METHODS

COLUMNS = {"trainable_parameters", "trainable_percent", "peak_memory_mb", "seconds_per_step",
           "tokens_per_s", "size_on_disk_mb", "final_loss", "lr", "quantize", "format",
           "task_accuracy", "facts_accuracy", "agreement_with_base", "kl_from_base"}


def bench(tiny_base, folder, *flags: str):
    return CliRunner().invoke(app, [
        "bench", "methods", "--model", str(tiny_base), "--batch-size", "2", "--held-out", "2",
        "--facts", "2", "--neutral", "2", "--max-new-tokens", "4", "--folder", str(folder),
        *flags])


@pytest.mark.slow
def test_every_method_fills_every_column(tiny_base, tmp_path):
    out, chart, folder = tmp_path / "methods.json", tmp_path / "methods.png", tmp_path / "run"
    result = bench(tiny_base, folder, "--steps", "1", "--json", str(out), "--chart", str(chart))
    assert result.exit_code == 0, result.output
    table = json.loads(out.read_text())
    assert list(table["methods"]) == ["base", *METHODS]
    assert set(table["methods"]["base"]) == {"format", "task_accuracy", "facts_accuracy",
                                             "agreement_with_base", "kl_from_base"}
    assert table["methods"]["base"]["agreement_with_base"] == 1.0
    for name in METHODS:
        row = table["methods"][name]
        assert set(row) == COLUMNS, (name, row)
        assert all(row[key] is not None for key in COLUMNS), (name, row)
        assert row["trainable_parameters"] > 0 and row["peak_memory_mb"] > 0
        assert 0 <= row["agreement_with_base"] <= 1 and row["kl_from_base"] >= 0
    rows = table["methods"]
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["ia3"]["trainable_parameters"] < rows["lora"]["trainable_parameters"]
    assert rows["qlora"]["quantize"] == "nf4" and rows["full"]["lr"] == METHODS["full"].lr
    assert chart.stat().st_size > 10_000

    # the same folder again: what trained there is reused, not trained again
    trained = (folder / "lora" / "training.json").stat().st_mtime_ns
    again = bench(tiny_base, folder, "--steps", "1", "--methods", "lora", "--json", str(out))
    assert again.exit_code == 0, again.output
    assert (folder / "lora" / "training.json").stat().st_mtime_ns == trained
    assert json.loads(out.read_text())["methods"]["lora"]["trainable_parameters"] == \
        rows["lora"]["trainable_parameters"]
    other = bench(tiny_base, folder, "--steps", "2", "--methods", "lora")
    assert "holds methods trained with" in other.exception.message


def test_an_unknown_method_is_refused_before_anything_trains():
    result = CliRunner().invoke(app, ["bench", "methods", "--methods", "lora,sgd"])
    assert "--method must be one of full, freeze" in result.exception.message
