"""`lorag ingest`, `lorag search` and `lorag namespaces` on a data dir, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


def lorag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorag", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_ingest_search_and_namespaces(tmp_path):
    data = ["--data-dir", str(tmp_path)]
    first = lorag("ingest", "--namespace", "kb", str(CORPUS), *data)
    assert first.returncode == 0, first.stderr
    assert "kb: 8 added, 0 updated, 0 unchanged, 0 failed" in " ".join(first.stderr.split())
    again = lorag("ingest", "--namespace", "kb", str(CORPUS), *data)
    assert "0 added, 0 updated, 8 unchanged" in " ".join(again.stderr.split())

    found = lorag("search", "--namespace", "kb", "when does the bakery open", "--k", "2",
                  "--json", *data)
    hits = json.loads(found.stdout)
    assert len(hits) == 2 and hits[0]["document_id"] == "guides/bakery.txt"
    assert set(hits[0]) == {"document_id", "chunk_id", "score", "text", "metadata"}
    german = json.loads(lorag("search", "--namespace", "kb", "Werktage", "--filter", "lang=de",
                              "--mode", "bm25", "--json", *data).stdout)
    assert [h["document_id"] for h in german] == ["faq-versand"]
    bad = lorag("search", "--namespace", "kb", "x", "--filter", "nokey", *data)
    assert bad.returncode == 2 and "--filter 'nokey' must be key=value" in bad.stderr

    evaluated = lorag("eval", "retrieval", "--namespace", "kb", "--queries",
                      str(CORPUS.parent / "queries.jsonl"), "--json", str(tmp_path / "e.json"),
                      *data)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "recall@5" in evaluated.stdout and "nDCG@10" in evaluated.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == {"vector", "bm25", "hybrid"}
    assert all(r["queries"] == 10 and len(r["per_query"]) == 10 for r in by_mode.values())
    assert by_mode["hybrid"]["mrr@10"] >= 0.9 and by_mode["hybrid"]["recall@5"] >= 0.8

    listed = lorag("namespaces", "list", *data)
    assert "kb" in listed.stdout and "8" in listed.stdout
    assert lorag("namespaces", "delete", "kb", *data).returncode == 0
    gone = lorag("namespaces", "delete", "kb", *data)
    assert gone.returncode == 2 and "does not exist" in gone.stderr
