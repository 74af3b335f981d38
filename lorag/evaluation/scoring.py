"""Scores of one generated answer against a gold one, as `lorag eval generate` reports them.

Text metrics follow their reference definitions: exact match and token F1 as in SQuAD
(lowercase, punctuation and English articles removed, whitespace collapsed); ROUGE-L from
`rouge-score` (F-measure) with a Unicode-aware tokenizer (its default one drops every
character outside a-z and 0-9, which scores "Zoë" as "zo"); BLEU and chrF from `sacrebleu`
(0-1 here, sacrebleu's 0-100 divided by 100). Format adherence is strict: the whole
answer, stripped of surrounding whitespace, must be one JSON value valid under the schema,
or must match the regex in full. `extract_json` is lenient, for reading a field out of an
answer that wraps its JSON in other text.
"""

import json
import re
from collections import Counter

import jsonschema
import sacrebleu
from rouge_score import rouge_scorer

from lorag.retrieval.rag import normalize

_WORDS = re.compile(r"\w+")


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal."""
    return float(normalize(prediction) == normalize(gold))


def contains(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears, word-aligned, in the normalised
    prediction: the factual-accuracy measure for answers in sentences."""
    gold_words = normalize(gold)
    return float(bool(gold_words) and f" {gold_words} " in f" {normalize(prediction)} ")


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD)."""
    predicted, wanted = normalize(prediction).split(), normalize(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


class _UnicodeTokenizer:
    """Lowercased \\w+ runs, for rouge-score."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens)."""
    return _ROUGE.score(gold, prediction)["rougeL"].fmeasure


def bleu(prediction: str, gold: str) -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing), 0-1."""
    return sacrebleu.sentence_bleu(prediction, [gold]).score / 100


def chrf(prediction: str, gold: str) -> float:
    """Sentence chrF (sacrebleu), 0-1."""
    return sacrebleu.sentence_chrf(prediction, [gold]).score / 100


def corpus_bleu(predictions: list[str], golds: list[str]) -> float:
    """Corpus BLEU over all answers (the figure papers report), 0-1."""
    return sacrebleu.corpus_bleu(predictions, [golds]).score / 100


def corpus_chrf(predictions: list[str], golds: list[str]) -> float:
    """Corpus chrF over all answers, 0-1."""
    return sacrebleu.corpus_chrf(predictions, [golds]).score / 100


def follows_schema(answer: str, schema: dict) -> bool:
    """The whole answer is one JSON value valid under `schema`."""
    try:
        value = json.loads(answer.strip())
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def matches(answer: str, pattern: re.Pattern) -> bool:
    """The whole answer (stripped) matches `pattern`."""
    return pattern.fullmatch(answer.strip()) is not None


def extract_json(answer: str) -> dict | None:
    """The first JSON object in `answer`, even with text around it; None if there is none."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(answer) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(answer, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def answer_text(answer: str, field: str | None) -> str:
    """The part of `answer` the text metrics compare: the JSON field `field` when the
    answer holds a JSON object with it as a string, else the whole answer."""
    if field:
        value = extract_json(answer)
        if value is not None and isinstance(value.get(field), str):
            return value[field]
    return answer


SUPPORTED_SHARE = 0.8  # of an answer's words a passage must hold for it to be supported


def supported(answer: str, passages: list[str]) -> float:
    """1.0 when one of `passages` holds at least SUPPORTED_SHARE of the answer's normalised
    words (a lexical test of grounding: an answer copied or closely paraphrased from the
    passage passes, one whose content is not in it fails)."""
    words = normalize(answer).split()
    if not words:
        return 0.0
    for passage in passages:
        held = set(normalize(passage).split())
        if sum(word in held for word in words) >= SUPPORTED_SHARE * len(words):
            return 1.0
    return 0.0
