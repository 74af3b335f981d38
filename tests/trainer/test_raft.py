"""RAFT's training chats (trainer/raft.py) from a real document store on the test corpus:
the gold passage where the oracle share says, really absent where it says not, the
daemon's RAG layout, the abstention target, and questions whose gold is never found left
out. That a chat's prompt is exactly the daemon's is checked against a daemon, in
tests/server/test_rag.py."""

import json

import pytest
from typer.testing import CliRunner

from lorag.cli import app
from lorag.errors import InvalidRequest
from lorag.retrieval.rag import with_context
from lorag.trainer.raft import (
    ABSTAIN,
    RaftOptions,
    raft_examples,
    read_questions,
    write_raft_data,
)
from tests.trainer.examples import CORPUS

QUESTIONS = [
    {"question": "Who is the head baker at the Zephyr Street bakery?", "answer": "the baker",
     "source": "guides/bakery.txt"},
    {"question": "How long does standard shipping take?", "answer": "3 to 5 working days",
     "source": "faq-shipping"},
    {"question": "When are refunds issued?", "answer": "within 14 days",
     "source": "faq-refunds"},
    {"question": "What is Hekla?", "answer": "a volcano", "source": "guides/volcanoes.md"},
]


def test_each_chat_is_the_daemons_rag_layout_then_the_cited_answer(search):
    examples, left_out = raft_examples(QUESTIONS, search, RaftOptions("kb", oracle_p=1.0))
    assert left_out == 0 and len(examples) == len(QUESTIONS)
    for example, question in zip(examples, QUESTIONS, strict=True):
        prompt = with_context([{"role": "user", "content": question["question"]}],
                              example.passages)
        assert example.messages == [*prompt, {"role": "assistant", "content":
                                              f"{question['answer']} (source: "
                                              f"{question['source']})"}]


def test_the_gold_passage_is_in_every_oracle_prompt(search):
    examples, _ = raft_examples(QUESTIONS * 5, search, RaftOptions("kb", top_k=2, seed=3))
    for example in examples:
        documents = [hit.document_id for hit in example.passages]
        assert len(documents) == 2
        assert (example.gold in documents) == example.oracle


def test_a_prompt_without_the_oracle_holds_no_passage_of_the_gold_document(search):
    examples, _ = raft_examples(QUESTIONS, search, RaftOptions("kb", oracle_p=0.0))
    for example in examples:
        context = example.messages[0]["content"]
        assert all(hit.document_id != example.gold for hit in example.passages)
        assert f"source: {example.gold}\n" not in context
        assert example.messages[-1] == {"role": "assistant", "content": ABSTAIN}


def test_the_oracle_share_follows_oracle_p(search):
    examples, _ = raft_examples(QUESTIONS * 50, search, RaftOptions("kb", oracle_p=0.8))
    share = sum(e.oracle for e in examples) / len(examples)
    assert 0.72 <= share <= 0.88  # 200 draws: 0.8 +- 2 standard deviations


def test_each_draw_decides_the_oracle_anew(search):
    examples, left_out = raft_examples(QUESTIONS, search, RaftOptions("kb", oracle_p=0.5,
                                                                      draws=8, seed=2))
    assert left_out == 0 and len(examples) == 8 * len(QUESTIONS)
    for question in QUESTIONS:  # each question both with its gold passage and without
        drawn = [e for e in examples if e.question == question["question"]]
        assert len(drawn) == 8 and {e.oracle for e in drawn} == {True, False}


def test_a_question_left_out_is_counted_once_over_the_draws(search):
    missing = {**QUESTIONS[0], "source": "guides/no-such-page.md"}
    examples, left_out = raft_examples([missing, QUESTIONS[1]], search,
                                       RaftOptions("kb", draws=3))
    assert left_out == 1 and [e.gold for e in examples] == ["faq-shipping"] * 3


def test_json_answers_cite_the_gold_source_and_abstentions_none(search):
    options = RaftOptions("kb", oracle_p=0.5, answer_format="json", seed=1)
    examples, _ = raft_examples(QUESTIONS * 4, search, options)
    targets = [json.loads(e.messages[-1]["content"]) for e in examples]
    assert {e.oracle for e in examples} == {True, False}
    for example, target in zip(examples, targets, strict=True):
        expected = example.gold if example.oracle else "none"
        assert set(target) == {"answer", "source"} and target["source"] == expected


def test_a_gold_passage_the_prompt_budget_drops_makes_the_chat_an_abstention(search):
    def without_bakery(messages, hits):
        return [hit for hit in hits if hit.document_id != "guides/bakery.txt"]

    [example], _ = raft_examples(QUESTIONS[:1], search, RaftOptions("kb", oracle_p=1.0),
                                 without_bakery)
    assert not example.oracle and example.messages[-1]["content"] == ABSTAIN


def test_a_prompt_with_no_room_for_any_passage_is_the_plain_chat(search):
    [example], _ = raft_examples(QUESTIONS[:1], search, RaftOptions("kb"),
                                 lambda messages, hits: [])
    assert example.messages[:-1] == [{"role": "user", "content": QUESTIONS[0]["question"]}]


def test_a_question_whose_gold_document_is_never_found_is_left_out(search):
    missing = {**QUESTIONS[0], "source": "guides/no-such-page.md"}
    examples, left_out = raft_examples([missing, QUESTIONS[1]], search, RaftOptions("kb"))
    assert left_out == 1 and [e.gold for e in examples] == ["faq-shipping"]


def test_an_unanswerable_question_abstains_over_the_daemons_own_hits(search):
    # the hard abstention: the page about the very bakery asked after is in the prompt,
    # and it does not say who founded it
    unanswerable = {"question": "Who founded the Zephyr Street bakery?", "answerable": False}
    examples, left_out = raft_examples([unanswerable, QUESTIONS[1]], search,
                                       RaftOptions("kb", top_k=2, answer_format="json"))
    assert left_out == 0 and len(examples) == 2
    example = examples[0]
    assert example.gold is None and not example.oracle
    assert example.passages == search(unanswerable["question"], 2)
    assert example.passages[0].document_id == "guides/bakery.txt"
    prompt = with_context([{"role": "user", "content": unanswerable["question"]}],
                          example.passages)
    assert example.messages == [*prompt, {"role": "assistant", "content": json.dumps(
        {"answer": ABSTAIN, "source": "none"})}]


def test_the_chats_and_the_dump_are_written_with_the_record(search, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    dump = tmp_path / "dump.jsonl"
    chats, record = write_raft_data(questions, search, RaftOptions("kb", oracle_p=1.0),
                                    tmp_path / "out", dump)
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    dumped = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["messages"] for row in rows] == [row["messages"] for row in dumped]
    assert {"question", "gold", "oracle", "passages"} <= set(dumped[0])
    assert record["examples"] == 4 and record["with_oracle"] == 4 and record["layout"]
    assert record["unanswerable"] == 0


@pytest.mark.parametrize(("line", "message"), [
    ({"question": "q"}, "'answer' must be a non-empty string"),
    ({"question": "q", "answer": "a", "source": 3}, "'source' must be a string"),
    ({"question": "q", "answerable": "no"}, "'answerable' must be true or false"),
    ({"answerable": False}, "'question' must be a non-empty string"),
], ids=["no-answer", "source-not-text", "answerable-not-bool", "unanswerable-no-question"])
def test_a_bad_question_line_is_named(tmp_path, line, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(InvalidRequest, match=message) as error:
        read_questions(path)
    assert f"{path}:1" in error.value.message and error.value.field == "data"


@pytest.mark.parametrize(("options", "flag"), [
    ({"oracle_p": 1.5}, "oracle_p"), ({"top_k": 0}, "rag_top_k"),
    ({"answer_format": "xml"}, "answer_format"), ({"mode": "fuzzy"}, "rag_mode"),
    ({"abstain": " "}, "abstain_answer"), ({"draws": 0}, "rag_draws"),
], ids=["oracle-p", "top-k", "format", "mode", "abstain", "draws"])
def test_options_out_of_range_name_their_flag(options, flag):
    with pytest.raises(InvalidRequest) as error:
        RaftOptions("kb", **options)
    assert error.value.field == flag and f"--{flag.replace('_', '-')}" in error.value.message


@pytest.mark.slow
def test_lorag_train_with_a_namespace_trains_on_the_chats_and_records_how(tiny_base,
                                                                           tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "adapter"
    ingested = CliRunner().invoke(app, ["ingest", str(CORPUS), "--namespace", "kb",
                                        "--data-dir", str(data_dir)])
    assert ingested.exit_code == 0, ingested.output
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    trained = CliRunner().invoke(app, [
        "train", "--data", str(questions), "--rag-namespace", "kb", "--data-dir",
        str(data_dir), "--base", str(tiny_base), "--out", str(out), "--max-steps", "1",
        "--batch-size", "2", "--answer-format", "json", "--rag-max-prompt-tokens", "300",
        "--rag-draws", "2", "--dump-examples", str(tmp_path / "dump.jsonl")])
    assert trained.exit_code == 0, trained.output
    report = json.loads((out / "training.json").read_text())
    assert report["data"]["path"] == str(out / "raft.jsonl")
    assert report["data"]["train_examples"] == 2 * len(QUESTIONS)
    assert report["rag"]["namespace"] == "kb" and report["rag"]["answer_format"] == "json"
    assert report["rag"]["draws"] == 2 and len(report["chat_template_sha256"]) == 64
    dumped = [json.loads(line) for line in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert len(dumped) == 2 * len(QUESTIONS) and all(row["passages"] for row in dumped)


def test_a_bad_training_flag_is_refused_before_raft_searches_or_writes(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    result = CliRunner().invoke(app, ["train", "--data", str(questions), "--rag-namespace",
                                      "kb", "--data-dir", str(tmp_path / "nowhere"), "--out",
                                      str(tmp_path / "out"), "--rank", "0"])
    assert isinstance(result.exception, InvalidRequest), result.output
    assert result.exception.field == "rank"
    assert not (tmp_path / "out").exists() and not (tmp_path / "nowhere").exists()
