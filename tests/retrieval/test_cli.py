"""`lorag ingest`, `lorag search`, `lorag eval retrieval` and `lorag namespaces` on a data
dir, run in this process by Typer's runner (test_cli_errors.py runs the real command)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorag.cli import app
from lorag.errors import InvalidRequest, NotFound

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


def lorag(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_ingest_search_and_namespaces(tmp_path):
    data = ["--data-dir", str(tmp_path)]
    first = lorag("ingest", "--namespace", "kb", str(CORPUS), *data)
    assert first.exit_code == 0, first.output
    assert "kb: 8 added, 0 updated, 0 unchanged, 0 failed" in " ".join(first.output.split())
    again = lorag("ingest", "--namespace", "kb", str(CORPUS), *data)
    assert "0 added, 0 updated, 8 unchanged" in " ".join(again.output.split())

    found = lorag("search", "--namespace", "kb", "when does the bakery open", "--k", "2",
                  "--json", *data)
    hits = json.loads(found.stdout)
    assert len(hits) == 2 and hits[0]["document_id"] == "guides/bakery.txt"
    assert set(hits[0]) == {"document_id", "chunk_id", "score", "text", "metadata"}
    german = json.loads(lorag("search", "--namespace", "kb", "Werktage", "--filter", "lang=de",
                              "--mode", "bm25", "--json", *data).stdout)
    assert [h["document_id"] for h in german] == ["faq-versand"]
    bad = lorag("search", "--namespace", "kb", "x", "--filter", "nokey", *data)
    assert isinstance(bad.exception, InvalidRequest)
    assert "--filter 'nokey' must be key=value" in bad.exception.message

    evaluated = lorag("eval", "retrieval", "--namespace", "kb", "--queries",
                      str(CORPUS.parent / "queries.jsonl"), "--json", str(tmp_path / "e.json"),
                      *data)
    assert evaluated.exit_code == 0, evaluated.output
    assert "R@5" in evaluated.stdout and "MRR@10" in evaluated.stdout
    assert "search ms" in evaluated.stdout  # the table fits 80 columns unwrapped
    report = json.loads((tmp_path / "e.json").read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == {"vector", "bm25", "hybrid"}
    assert all(r["queries"] == 10 and len(r["per_query"]) == 10 for r in by_mode.values())
    assert by_mode["hybrid"]["mrr@10"] >= 0.9 and by_mode["hybrid"]["recall@5"] >= 0.8

    listed = lorag("namespaces", "list", *data)
    assert "kb" in listed.stdout and "8" in listed.stdout
    assert lorag("namespaces", "delete", "kb", *data).exit_code == 0
    gone = lorag("namespaces", "delete", "kb", *data)
    assert isinstance(gone.exception, NotFound) and "does not exist" in gone.exception.message
