"""How a reranker's order joins the search's (reciprocal-rank fusion), and late
interaction on the real embedder: a passage scores by its best sentence."""

import numpy as np
import pytest

from lorag.retrieval.rerank import (
    FUSION_K,
    MAX_SENTENCES,
    fused,
    sentence_scores,
    sentences,
)


def test_fusion_keeps_the_search_order_when_the_reranker_agrees_or_ties():
    assert fused([0.9, 0.5, 0.1]) == [0, 1, 2]
    assert fused([0.5, 0.5, 0.5]) == [0, 1, 2]


def test_fusion_lifts_a_passage_only_as_far_as_both_orders_allow():
    # the reranker puts the search's last first: it rises, but not above the search's
    # first, which the reranker ranks second
    assert fused([0.8, 0.1, 0.05, 0.9]) == [0, 3, 1, 2]
    # the score is exactly 1/(k + search rank) + 1/(k + reranker rank)
    k = FUSION_K
    assert 1 / k + 1 / (k + 1) > 1 / (k + 3) + 1 / k


@pytest.mark.parametrize(("text", "expected"), [
    ("One. Two? Three!", ["One.", "Two?", "Three!"]),
    ("# Heading\nA line: and the rest", ["# Heading", "A line:", "and the rest"]),
    ("no end mark", ["no end mark"]),
    ("  ", ["  "]),
])
def test_a_passage_splits_into_its_sentences_and_lines(text, expected):
    assert sentences(text) == expected


def test_a_passage_scores_by_its_best_sentence(embedder):
    query = "When does the Zephyr Street bakery open?"
    buried = ("Hekla is a volcano in Iceland. Invoices are paid within thirty days. The "
              "Zephyr Street bakery opens at seven every morning. Parking is free on Sundays.")
    loose = "Bread and cakes are sold in many shops across the city, early and late."
    scores, read = sentence_scores(embedder, query, [loose, buried])
    assert read == [loose, *sentences(buried)] and scores[1] > scores[0]
    q = embedder.encode([query])[0]
    # (batched apart, as here, bf16 vectors differ in the fourth decimal)
    assert scores[1] == pytest.approx(float(np.max(embedder.encode(sentences(buried)) @ q)),
                                      abs=2e-3)
    whole = float(embedder.encode([buried])[0] @ q)
    assert scores[1] > whole  # the answering sentence is not averaged away


def test_late_interaction_reads_a_long_documents_first_sentences_only(embedder):
    long = " ".join(f"Line {i} of the log." for i in range(200))
    _, read = sentence_scores(embedder, "What does line 150 say?", [long, "Short."])
    assert read == [*sentences(long)[:MAX_SENTENCES], "Short."]
