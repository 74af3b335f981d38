"""Training data validation: every fault is caught before training, with file and line."""

import json

import pytest

from lorag.errors import InvalidRequest
from lorag.trainer.data import load_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write(tmp_path, lines) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n")
    return str(path)


def test_three_formats_are_detected_and_shaped_for_trl(tmp_path):
    chat = load_jsonl(write(tmp_path, [CHAT, "", CHAT]))  # blank lines are skipped
    assert chat.format == "chat" and len(chat.rows) == 2
    assert chat.rows[0] == {"prompt": [{"role": "user", "content": "hi"}],
                            "completion": [{"role": "assistant", "content": "yo"}]}
    pair = load_jsonl(write(tmp_path, [{"prompt": "2+2=", "completion": "4"}]))
    assert pair.format == "pair" and pair.rows == [{"prompt": "2+2=", "completion": "4"}]
    text = load_jsonl(write(tmp_path, [{"text": "once upon a time"}]))
    assert text.format == "text" and len(text.sha256) == 64


def test_a_developer_message_trains_as_the_system_message_it_is_served_as(tmp_path):
    chat = load_jsonl(write(tmp_path, [{"messages": [
        {"role": "developer", "content": "be brief"}, *CHAT["messages"]]}]))
    assert chat.rows[0]["prompt"][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("lines, message", [
    ([CHAT, '{"messages": [', CHAT], ":2: not valid JSON"),
    ([CHAT, ["not", "an", "object"]], ":2: each line must be a JSON object"),
    ([{"prompt": "a"}], ":1: 'completion' must be a non-empty string"),
    ([{"prompt": "a", "completion": ""}], ":1: 'completion' must be a non-empty string"),
    ([{"question": "a"}], ":1: needs 'messages' (chat), 'prompt' + 'completion', or 'text'"),
    ([CHAT, {"text": "plain"}], ":2: a text example in a chat dataset"),
    ([{"messages": []}], ":1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "wizard", "content": "x"}]}], ":1: messages[0] needs a 'role'"),
    ([{"messages": [{"role": "user", "content": "x"}]}], ":1: the last message must be"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}],
     ":1: messages[0]: 'content' must be a non-empty string"),
    (["", "  "], "has no examples"),
])
def test_bad_data_names_the_line_and_the_fault(tmp_path, lines, message):
    with pytest.raises(InvalidRequest) as error:
        load_jsonl(write(tmp_path, lines))
    assert message in error.value.message and error.value.field == "data"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_a_split_holds_out_its_share_and_refuses_one_outside_0_and_1(tmp_path):
    data = load_jsonl(write(tmp_path, [CHAT] * 10))
    train, held = data.split(0.2, seed=0)
    assert (len(train.rows), len(held.rows)) == (8, 2)
    with pytest.raises(InvalidRequest, match="between 0 and 1"):
        data.split(1.5, seed=0)
