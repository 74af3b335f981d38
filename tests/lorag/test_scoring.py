"""Answer metrics against hand-computed values, edge cases included."""

import json
import re
from pathlib import Path

import pytest

from lorag.evaluation import scoring
from lorag.retrieval import rag

SCHEMA = json.loads((Path(__file__).parents[2] / "demo" / "answer.schema.json").read_text())


def test_exact_match_ignores_case_articles_and_punctuation_as_squad_does():
    assert scoring.exact_match("The Paris!", "paris") == 1.0
    assert scoring.exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_is_the_harmonic_mean_of_token_precision_and_recall():
    # precision 2/3, recall 1 -> 2 * (2/3) / (5/3) = 0.8
    assert scoring.token_f1("Ines Vargas leads", "Ines Vargas") == pytest.approx(0.8)
    # one shared token of 2 predicted and 3 gold: P 1/2, R 1/3 -> F1 0.4
    assert scoring.token_f1("red fox", "a big red dog") == pytest.approx(0.4)
    assert scoring.token_f1("blue", "red") == 0.0


def test_empty_answers():
    for metric in (scoring.exact_match, scoring.token_f1, scoring.rouge_l, scoring.bleu,
                   scoring.chrf, scoring.contains):
        assert metric("", "Ines Vargas") == 0.0, metric.__name__
    assert scoring.token_f1("", "") == 1.0  # SQuAD: both empty agree
    assert scoring.contains("anything", "") == 0.0  # an empty gold proves nothing
    assert scoring.follows_schema("", SCHEMA) is False
    assert scoring.extract_json("") is None


def test_contains_is_word_aligned():
    assert scoring.contains("It carries up to 180 kg.", "180 kg") == 1.0
    assert scoring.contains("It carries 1180 kg", "180 kg") == 0.0
    assert scoring.contains("The mascot is Pip", "pip") == 1.0


def test_rouge_l_is_lcs_f_measure_and_reads_unicode():
    # LCS of "w x y z" and "w y z v" is w y z: P = R = 3/4
    assert scoring.rouge_l("w x y z", "w y z v") == pytest.approx(0.75)
    assert scoring.rouge_l("Zoë Åkesson", "zoë åkesson") == 1.0
    assert scoring.rouge_l("Zoë", "Zoa") == 0.0  # rouge-score's own tokenizer says "zo" = "zo"
    assert scoring.rouge_l("東京 です", "東京") == pytest.approx(2 * 0.5 * 1 / 1.5)


SENTENCE = "the cat sat on the mat"


def test_bleu_is_one_for_the_same_text_and_zero_for_no_shared_ngram():
    assert scoring.bleu(SENTENCE, SENTENCE) == pytest.approx(1.0)
    assert scoring.bleu("dog", SENTENCE) == 0.0
    assert scoring.corpus_bleu([SENTENCE, "a b c d"], [SENTENCE, "a b c d"]) == \
        pytest.approx(1.0)


def test_chrf_is_one_for_the_same_text_and_partial_credit_for_a_part():
    assert scoring.chrf(SENTENCE, SENTENCE) == pytest.approx(1.0)
    assert 0 < scoring.chrf("the cat", SENTENCE) < 1


def test_format_adherence_is_strict_and_extraction_lenient():
    good = '{"answer": "Ines Vargas", "source": "ceo.md"}'
    assert scoring.follows_schema(good, SCHEMA)
    assert scoring.follows_schema(f"  {good}\n", SCHEMA)  # surrounding whitespace is fine
    wrapped = f"Sure! Here it is: {good} Hope that helps."
    assert not scoring.follows_schema(wrapped, SCHEMA)  # extra text: not the format
    assert scoring.extract_json(wrapped) == {"answer": "Ines Vargas", "source": "ceo.md"}
    assert scoring.answer_text(wrapped, "answer") == "Ines Vargas"
    assert not scoring.follows_schema('{"answer": "x"}', SCHEMA)  # source missing
    assert not scoring.follows_schema('{"answer": "x", "source": "a", "extra": 1}', SCHEMA)
    assert not scoring.follows_schema('{"answer": "x", "source": ', SCHEMA)
    assert scoring.follows_schema('{"answer": "Zoë Åkesson", "source": "ö.md"}', SCHEMA)
    assert scoring.follows_schema('{"answer": "\\u00e5", "source": "a"}', SCHEMA)


def test_extract_json_finds_the_first_whole_object_and_nothing_else():
    assert scoring.extract_json('{"a": [1, {"b": 2}]} tail') == {"a": [1, {"b": 2}]}
    assert scoring.extract_json('{ broken { "x": 1 }') == {"x": 1}
    assert scoring.extract_json("[1, 2]") is None and scoring.extract_json("none") is None


def test_answer_text_reads_a_string_answer_field_else_the_whole_reply():
    assert scoring.answer_text("plain words", "answer") == "plain words"
    assert scoring.answer_text('{"answer": 5}', "answer") == '{"answer": 5}'  # not a string
    assert scoring.answer_text('{"answer": "x"}', None) == '{"answer": "x"}'


def test_regex_format():
    pattern = re.compile(r"VERDICT: .+ \[done\]")
    assert scoring.matches("VERDICT: fine [done]\n", pattern)
    assert not scoring.matches("Well. VERDICT: fine [done]", pattern)


@pytest.mark.parametrize(("answer", "abstain", "declines"), [
    ("The sources do not say.", None, True),
    ('{"answer": "It is not in the sources", "source": "none"}', None, True),
    ("I don't know.", None, True),
    ("Nope, no idea at all", "Nope, no idea", True),  # the abstention trained in
    ("Ottoline Brandvold", None, False),
    ("The sources say it opens at 6:40.", None, False),
    ('{"answer": "Mr Xyz", "source": "none"}', None, True),  # cites no source
    ('{"answer": "Ottoline Brandvold", "source": "staff.md"}', None, False),
], ids=["raft-default", "phrase-in-json", "dont-know", "trained-phrase", "answer",
        "answer-naming-sources", "json-citing-none", "json-answer"])
def test_an_answer_declines_when_it_cites_none_or_holds_an_abstention_phrase(
        answer, abstain, declines):
    assert rag.declines(answer, abstain) is declines


def test_an_answer_is_supported_when_a_passage_holds_most_of_its_words():
    passages = ["The head baker, Ottoline Brandvold, makes a rye loaf.", "Hekla erupts."]
    assert scoring.supported("the head baker is Ottoline Brandvold", passages) == 1.0
    assert scoring.supported("Ottoline Brandvold makes rye loaves", passages) == 1.0  # 4 of 5
    assert scoring.supported("Ottoline Brandvold bakes sourdough daily", passages) == 0.0
    assert scoring.supported("Ingrid Svensson", passages) == 0.0
    assert scoring.supported("", passages) == 0.0
