"""Training data: JSONL in one of three formats, detected and validated before training.

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}   chat
    {"prompt": "...", "completion": "..."}                                          pair
    {"text": "..."}                                                                 text

Every line must be the same format. Chat data goes through the base model's chat template;
the loss falls on the final assistant turn (what the adapter should learn to say), chat
and pair data alike, unless `train_on_prompt`. Text data trains on every token. A bad line
stops everything before the model is even loaded, naming the file, the line and the fault.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.roles import ROLES, canonical


@dataclass
class TrainingData:
    """Validated examples in TRL's shapes, with where they came from."""

    format: str
    rows: list[dict]
    sha256: str  # of the file's bytes: training.json records exactly what was trained on

    def dataset(self) -> Dataset:
        """The examples as a datasets.Dataset for TRL's SFTTrainer."""
        return Dataset.from_list(self.rows)

    def split(self, fraction: float, seed: int) -> tuple["TrainingData", "TrainingData"]:
        """(train, eval), the eval part a seeded `fraction` of the rows (at least one)."""
        if not 0 < fraction < 1:
            raise InvalidRequest(f"eval split must be between 0 and 1, got {fraction}",
                                 field="eval_split")
        if len(self.rows) < 2:
            raise InvalidRequest("an eval split needs at least 2 examples", field="eval_split")
        order = Dataset.from_dict({"i": list(range(len(self.rows)))}).shuffle(seed=seed)["i"]
        cut = max(1, round(len(self.rows) * fraction))
        pick = lambda indices: [self.rows[i] for i in indices]  # noqa: E731
        return (TrainingData(self.format, pick(order[cut:]), self.sha256),
                TrainingData(self.format, pick(order[:cut]), self.sha256))


def load_jsonl(path: str | Path) -> TrainingData:
    """Read and validate a JSONL training file; raises InvalidRequest naming the line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"training data {path} does not exist", field="data")
    rows, fmt = [], None
    for where, record in read_objects(path, "data"):
        line_format = _format_of(record, where)
        if fmt is not None and line_format != fmt:
            raise InvalidRequest(f"{where}: a {line_format} example in a {fmt} dataset; every "
                                 "line must have the same format", field="data")
        fmt = line_format
        rows.append(_to_trl(record, fmt, where))
    if not rows:
        raise InvalidRequest(f"{path} has no examples", field="data")
    return TrainingData(fmt, rows, hashlib.sha256(path.read_bytes()).hexdigest())


def _format_of(record: dict, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "pair"
    if "text" in record:
        return "text"
    raise InvalidRequest(f"{where}: needs 'messages' (chat), 'prompt' + 'completion', or "
                         f"'text'; found {sorted(record)}", field="data")


def _to_trl(record: dict, fmt: str, where: str) -> dict:
    if fmt == "text":
        return {"text": _text(record, "text", where)}
    if fmt == "pair":
        return {"prompt": _text(record, "prompt", where),
                "completion": _text(record, "completion", where)}
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"{where}: 'messages' must be a non-empty list", field="data")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"{where}: messages[{index}] needs a 'role' of "
                                 f"{', '.join(ROLES)}", field="data")
        _text(message, "content", f"{where}: messages[{index}]")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise InvalidRequest(f"{where}: the last message must be the assistant's answer, "
                             "after at least one other message", field="data")
    # TRL's conversational prompt-completion shape: loss on the final assistant turn
    return {"prompt": [{"role": canonical(m["role"]), "content": m["content"]}
                       for m in messages[:-1]],
            "completion": [{"role": "assistant", "content": messages[-1]["content"]}]}


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{where}: '{key}' must be a non-empty string", field="data")
    return value
