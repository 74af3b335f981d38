"""A relevance adapter's training chats (trainer/relevance.py): the daemon's scoring prompt
with "yes" or "no", from a pair file or from a question file searched in a real document
store on the test corpus (the gold passage, and hard negatives of other documents)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorag.cli import app
from lorag.errors import InvalidRequest
from lorag.retrieval.rerank import RERANK_LAYOUT, relevance_messages
from lorag.trainer.relevance import (
    RelevanceOptions,
    pairs_from_namespace,
    read_pairs,
    write_relevance_data,
)
from lorag.trainer.train import TrainOptions
from tests.trainer.test_raft import QUESTIONS


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_question_gives_its_gold_passage_and_hard_negatives(search):
    pairs, left_out = pairs_from_namespace(QUESTIONS, search, RelevanceOptions("kb"))
    assert left_out == 0 and len(pairs) == 4 * len(QUESTIONS)
    for question in QUESTIONS:
        mine = [p for p in pairs if p.query == question["question"]]
        gold = [p for p in mine if p.relevant]
        assert len(gold) == 1 and gold[0].source.startswith(f"{question['source']}#")
        negatives = [p for p in mine if not p.relevant]
        assert len(negatives) == 3
        assert not any(p.source.startswith(f"{question['source']}#") for p in negatives)


def test_the_negatives_are_the_best_ranked_passages_of_other_documents(search):
    question = QUESTIONS[0]
    pairs, _ = pairs_from_namespace([question], search, RelevanceOptions("kb", negatives=2))
    ranked = [f"{h.document_id}#{h.chunk_id}" for h in search(question["question"], 20)
              if h.document_id != question["source"]]
    assert {p.source for p in pairs if not p.relevant} == set(ranked[:2])


def test_a_chat_is_the_daemons_scoring_prompt_then_yes_or_no(search):
    pairs, _ = pairs_from_namespace(QUESTIONS[:1], search, RelevanceOptions("kb"))
    for pair in pairs:
        assert pair.row()["messages"] == [
            *relevance_messages(pair.query, pair.passage),
            {"role": "assistant", "content": "yes" if pair.relevant else "no"}]


def test_without_a_source_the_gold_is_the_passage_holding_the_answer(search):
    hits = search("What is Hekla?", 20)
    holding = next(h for h in hits if "volcano" in h.text.lower())
    pairs, left_out = pairs_from_namespace(
        [{"question": "What is Hekla?", "answer": "volcano"}], search, RelevanceOptions("kb"))
    assert left_out == 0
    assert [p.source for p in pairs if p.relevant] == \
        [f"{holding.document_id}#{holding.chunk_id}"]


def test_a_question_whose_gold_is_not_among_the_candidates_is_left_out(search):
    lost = {"question": "What is Hekla?", "answer": "a volcano", "source": "no-such-doc"}
    pairs, left_out = pairs_from_namespace([lost, QUESTIONS[0]], search,
                                           RelevanceOptions("kb"))
    assert left_out == 1 and {p.query for p in pairs} == {QUESTIONS[0]["question"]}


def test_an_unanswerable_question_gives_no_pairs_and_is_counted(search):
    unanswerable = {"question": "Who founded the Zephyr Street bakery?", "answerable": False}
    pairs, left_out = pairs_from_namespace([unanswerable, QUESTIONS[1]], search,
                                           RelevanceOptions("kb"))
    assert left_out == 1 and {p.query for p in pairs} == {QUESTIONS[1]["question"]}


def test_written_data_records_the_layout_and_counts(search, tmp_path):
    questions = write(tmp_path / "questions.jsonl", QUESTIONS)
    chats, record = write_relevance_data(questions, tmp_path / "out", RelevanceOptions("kb"),
                                         search, dump=tmp_path / "dump.jsonl")
    assert record == {"layout": RERANK_LAYOUT, "namespace": "kb", "negatives": 3,
                      "pairs": 16, "relevant": 4, "left_out": 0}
    assert len(chats.read_text().splitlines()) == 16
    dumped = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert sum(row["relevant"] for row in dumped) == 4 and all(row["source"] for row in dumped)


def test_a_pair_file_trains_as_given(tmp_path):
    rows = [{"query": "q", "passage": "p", "relevant": True},
            {"query": "q", "passage": "r", "relevant": False}]
    chats, record = write_relevance_data(write(tmp_path / "pairs.jsonl", rows),
                                         tmp_path / "out", RelevanceOptions())
    assert record["pairs"] == 2 and record["namespace"] is None
    assert [json.loads(line)["messages"][-1]["content"]
            for line in chats.read_text().splitlines()] == ["yes", "no"]


BAD_PAIRS = [
    ("no-passage", [{"query": "q", "relevant": True}], "pairs.jsonl:1: 'passage' must be"),
    ("relevant-text", [{"query": "q", "passage": "p", "relevant": "yes"}],
     "'relevant' must be true or false"),
    ("one-kind", [{"query": "q", "passage": "p", "relevant": True}] * 2,
     "all relevant; a relevance adapter needs both kinds"),
]


@pytest.mark.parametrize(("rows", "problem"), [b[1:] for b in BAD_PAIRS],
                         ids=[b[0] for b in BAD_PAIRS])
def test_a_bad_pair_file_is_refused_naming_the_line_or_the_problem(tmp_path, rows, problem):
    with pytest.raises(InvalidRequest, match=problem):
        write_relevance_data(write(tmp_path / "pairs.jsonl", rows), tmp_path / "out",
                             RelevanceOptions())
    assert not (tmp_path / "out").exists()


def test_read_pairs_of_an_empty_file_says_so(tmp_path):
    with pytest.raises(InvalidRequest, match="has no pairs"):
        read_pairs(write(tmp_path / "pairs.jsonl", []))


@pytest.mark.parametrize(("given", "flag"), [({"negatives": 0}, "--rerank-negatives"),
                                             ({"mode": "dense"}, "--rag-mode")])
def test_relevance_options_name_the_flag_they_refuse(given, flag):
    with pytest.raises(InvalidRequest, match=f"{flag} must be") as refused:
        RelevanceOptions("kb", **given)
    assert refused.value.field == flag.removeprefix("--").replace("-", "_")


def test_an_unknown_task_names_the_flag(tmp_path):
    with pytest.raises(InvalidRequest, match="--task must be chat or rerank"):
        TrainOptions(data=tmp_path / "x", base="b", out=tmp_path, task="classify")


CLI_REFUSALS = [
    (["--task", "rerank", "--oracle-p", "0.5"], "--oracle-p"),
    (["--task", "rerank", "--answer-format", "json"], "--answer-format"),
    (["--rerank-negatives", "2"], "--rerank-negatives"),
    (["--task", "rerank", "--rerank-negatives", "0"], "--rerank-negatives must be"),
]


@pytest.mark.parametrize(("flags", "named"), CLI_REFUSALS,
                         ids=["oracle-p", "answer-format", "negatives-alone", "no-negatives"])
def test_the_cli_refuses_flags_that_do_not_fit_the_task(tmp_path, flags, named):
    data = write(tmp_path / "pairs.jsonl", [{"query": "q", "passage": "p", "relevant": True},
                                            {"query": "q", "passage": "r", "relevant": False}])
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out",
                                      str(tmp_path / "out"), *flags])
    said = str(result.exception) if isinstance(result.exception, InvalidRequest) else \
        result.output
    assert result.exit_code != 0 and named in said
    assert not (tmp_path / "out").exists()
