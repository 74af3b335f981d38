"""The real documentation retrieval is measured on (lorag/evaluation/corpora.py), and the
question set labelled against it: every question's gold section exists and holds the
answer's text, and the sections are the Reference's own, each once."""

import json
from pathlib import Path

import pytest

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
