"""Retrieval metrics against hand-computed values, and the query file's checks."""

import math

import pytest

from lorag.errors import InvalidRequest
from lorag.evaluation.retrieval import documents_in_order, mrr_at, ndcg_at, read_queries, recall_at


def test_metrics_match_hand_computed_values():
    ranked, relevant = ["a", "b", "c", "d"], {"b", "d"}
    assert recall_at(ranked, relevant, 1) == 0.0
    assert recall_at(ranked, relevant, 2) == 0.5
    assert recall_at(ranked, relevant, 4) == 1.0
    assert mrr_at(ranked, relevant) == 0.5
    # DCG = 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068; ideal = 1 + 0.63093
    assert ndcg_at(ranked, relevant) == pytest.approx(1.06161 / 1.63093, abs=1e-5)
    assert ndcg_at(["b", "d", "a"], relevant) == pytest.approx(1.0)


def test_metrics_edge_cases():
    assert (recall_at([], {"a"}, 5), mrr_at([], {"a"}), ndcg_at([], {"a"})) == (0, 0, 0)
    # the relevant document just past the cut-off counts for nothing
    ranked = [f"d{i}" for i in range(10)] + ["hit"]
    assert (mrr_at(ranked, {"hit"}), ndcg_at(ranked, {"hit"})) == (0.0, 0.0)
    # more relevant documents than k: the ideal ranking is capped at k, so a full top-2 is 1
    assert ndcg_at(["a", "b"], {"a", "b", "c"}, k=2) == pytest.approx(1.0)
    assert recall_at(["a", "b"], {"a", "b", "c"}, 2) == pytest.approx(2 / 3)
    assert mrr_at(["x", "y", "a"], {"a"}) == pytest.approx(1 / 3)
    assert ndcg_at(["x", "a"], {"a"}) == pytest.approx(1 / math.log2(3))


def test_chunks_rank_their_documents_once_in_order_of_their_best_chunk():
    hits = [{"document_id": d} for d in ("a", "a", "b", "a", "c", "b")]
    assert documents_in_order(hits) == ["a", "b", "c"]


@pytest.mark.parametrize(("text", "fragment"), [
    ('{"query": "q", "relevant": ["a"]}\n{"query": "q2"', "q.jsonl:2: not valid JSON"),
    ('{"query": "q"}', 'q.jsonl:1: "relevant" must be a non-empty list'),
    ('{"query": "q", "relevant": []}', '"relevant" must be a non-empty list'),
    ('{"query": " ", "relevant": ["a"]}', 'needs a non-empty "query"'),
    ('\n\n', "holds no queries"),
])
def test_a_bad_query_file_names_its_line(tmp_path, text, fragment):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidRequest) as error:
        read_queries(path)
    assert fragment in error.value.message and error.value.field == "queries"


def test_query_file_reads_unicode(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "Wie lange dauert der Versand? ünï", "relevant": ["faq"]}\n',
                    encoding="utf-8")
    assert read_queries(path) == [{"query": "Wie lange dauert der Versand? ünï",
                                   "relevant": ["faq"]}]


def test_a_question_file_labels_each_query_with_its_source(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question": "q", "answer": "a", "source": "doc-1"}\n')
    assert read_queries(path) == [{"query": "q", "relevant": ["doc-1"]}]


def test_a_question_without_a_source_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(InvalidRequest, match='questions.jsonl:1: "relevant" must be .* "source"'):
        read_queries(path)
