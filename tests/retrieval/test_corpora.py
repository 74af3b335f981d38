"""The real documentation retrieval is measured on (lorag/evaluation/corpora.py), and the
question set labelled against it: every question's gold section exists and holds the
answer's text, and the sections are the Reference's own, each once."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorag.cli import app
from lorag.evaluation.corpora import python_reference

QUESTIONS = Path(__file__).parents[2] / "benchmarks" / "data" / "pyref-questions.jsonl"


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    return {document.id: document.text for document in python_reference()}


def test_each_section_starts_with_its_heading_and_ids_are_unique(sections):
    documents = python_reference()
    assert len({d.id for d in documents}) == len(documents) > 150
    for document in documents:
        assert document.text.startswith(document.metadata["heading"]) or \
            document.metadata["heading"] == document.metadata["topic"]


def test_a_section_the_topics_repeat_is_kept_once(sections):
    # topic "if" is also a section of topic "compound": one document
    assert [i for i, text in sections.items() if text.startswith('The "if" statement')] == \
        ["the-if-statement"]


def test_every_question_names_a_section_that_holds_its_answer(sections):
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    assert len(questions) >= 60
    for question in questions:
        assert question["answer"] in sections[question["source"]], question


def test_lorag_eval_corpus_writes_documents_training_and_held_out_questions(tmp_path):
    result = CliRunner().invoke(app, ["eval", "corpus", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    documents = read_jsonl(tmp_path / "documents.jsonl")
    train = read_jsonl(tmp_path / "train-questions.jsonl")
    held_out = read_jsonl(tmp_path / "questions.jsonl")
    ids = {d["id"] for d in documents}
    assert len(train) == len(documents) and {q["source"] for q in train} == ids
    assert {q["question"] for q in train}.isdisjoint(q["question"] for q in held_out)
    assert {q["source"] for q in held_out} <= ids


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


DEMO = Path(__file__).parents[2] / "demo"
# per unanswerable question, words a page answering it would need, none in demo/kb
ABSENT = [("revenue",), ("password", "wi-fi"), ("studied", "degree"), ("price",),
          ("programming", "written in"), ("marketing",), ("parking",), ("ticker", "stock"),
          ("logo",), ("lunch",)]


def test_the_demos_unanswerable_questions_ask_what_its_knowledge_base_never_says():
    questions = read_jsonl(DEMO / "unanswerable.jsonl")
    assert len(questions) == len(ABSENT) and all(q["answerable"] is False for q in questions)
    pages = " ".join(p.read_text().lower() for p in (DEMO / "kb").glob("*.md"))
    for words in ABSENT:
        assert not any(word in pages for word in words), words
    tern = (DEMO / "kb" / "tern.md").read_text().lower()
    assert "euro" not in tern and "cost" not in tern  # what a Tern T5 costs


def test_the_other_companys_unanswerable_questions_ask_what_its_pages_never_say():
    from demo.make_train import NEVER_SAID  # namespace package: the repo root is on the path

    questions = [q for q in read_jsonl(DEMO / "marlow" / "questions.jsonl")
                 if q.get("answerable") is False]
    assert len(questions) == 58 and all("answer" not in q for q in questions)
    pages = " ".join(p.read_text().lower() for p in (DEMO / "marlow" / "kb").glob("*.md"))
    for kind in NEVER_SAID.values():
        for _, words in kind:
            assert not any(word in pages for word in words), words


def test_no_wording_of_the_other_companys_questions_alone_says_unanswerable():
    """Each opening of an unanswerable question (its first word; "What is the ...")
    also opens answerable ones, whose answers are on their gold pages."""
    rows = read_jsonl(DEMO / "marlow" / "questions.jsonl")
    answerable = [row for row in rows if row.get("answerable", True)]
    for row in answerable:
        page = (DEMO / "marlow" / "kb" / row["source"]).read_text()
        assert row["answer"] in page, row
    openings = {" ".join(row["question"].split()[:n]) for row in answerable for n in (1, 3)}
    for row in rows:
        if row.get("answerable") is False:
            words = row["question"].split()
            assert words[0] in openings, row
            assert not row["question"].startswith("What is the ") or \
                " ".join(words[:3]) in openings, row
