"""RAFT (Zhang et al. 2024, retrieval-augmented fine-tuning): training chats whose prompt is
the one the daemon builds for `rag`, so that an adapter learns to answer from passages the
way it will be asked.

A question file has one `{"question", "answer", optional "source", optional "system"}` per
line, the shape `lorag eval generate` reads: the same file trains and evaluates. `source`
names the gold document; without it, the search's best hit is taken as gold. For each
question the namespace is searched as the daemon searches it (`top_k`, `mode`), and the
prompt is laid out by the daemon's own function (retrieval/rag.py `with_context`):

- with probability `oracle_p` the gold passage is among the passages: the daemon's own hits
  when they hold it (the prompt is then exactly the daemon's), else those hits with the
  lowest-ranked one replaced by the gold document's best passage; the target is the answer,
  citing the gold document;
- otherwise only distractors (hits of other documents), and the target is the abstention
  answer: the adapter learns to say the sources do not hold the answer rather than invent.

An unanswerable question (`"answerable": false`, no answer: `lorag eval generate`'s shape)
gets the daemon's own hits as they are, and the abstention as target. Those are the hard
abstentions: passages about the very thing asked (the office, the product) that do not
say what is asked, where distractor-only prompts teach only "no passage is on topic".

A question whose gold document is not among the search's first MAX_TOP_K hits is left out
(counted), since no prompt the daemon builds for it would hold its answer.

`draws` > 1 makes that many chats per question, each drawn anew, so that one question is
seen both with its gold passage (answer) and without it (abstain): trained for one epoch,
N draws replace N epochs of the same chats, in which an adapter can learn a question's
target by heart instead of reading the passages for it.
"""

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.retrieval import MAX_TOP_K, MODES, RAG_MAX_TOP_K, RAG_TOP_K, SEARCH_MODE
from lorag.retrieval.rag import ABSTAIN, NO_SOURCE, RAG_LAYOUT, with_context
from lorag.retrieval.store import Hit

ANSWER_FORMATS = ("text", "json")  # json: {"answer", "source"}, the demo's schema
MAX_DRAWS = 64  # a bound on the chats written, far past where more draws stop adding

# (question, k) -> hits best first: the namespace's search, local or on a daemon
Search = Callable[[str, int], list[Hit]]
# (the chat, hits best first) -> the hits a prompt budget keeps (retrieval/rag.py augment)
Fit = Callable[[list[dict], list[Hit]], list[Hit]]


@dataclass(frozen=True)
class RaftOptions:
    """How `lorag train --rag-namespace` builds its examples; each error names its flag."""

    namespace: str
    top_k: int = RAG_TOP_K
    mode: str = SEARCH_MODE
    oracle_p: float = 0.8
    answer_format: str = "text"
    abstain: str = ABSTAIN
    seed: int = 0
    draws: int = 1  # chats per question, each drawn anew

    def __post_init__(self):
        checks = [("rag-top-k", self.top_k, isinstance(self.top_k, int) and
                   1 <= self.top_k <= RAG_MAX_TOP_K, f"an integer in 1..{RAG_MAX_TOP_K}"),
                  ("rag-mode", self.mode, self.mode in MODES, f"one of {', '.join(MODES)}"),
                  ("oracle-p", self.oracle_p, 0 <= self.oracle_p <= 1, "in [0, 1]"),
                  ("answer-format", self.answer_format, self.answer_format in ANSWER_FORMATS,
                   f"one of {', '.join(ANSWER_FORMATS)}"),
                  ("abstain-answer", self.abstain, bool(self.abstain.strip()), "some text"),
                  ("rag-draws", self.draws, isinstance(self.draws, int) and
                   1 <= self.draws <= MAX_DRAWS, f"an integer in 1..{MAX_DRAWS}")]
        for flag, value, ok, allowed in checks:
            if not ok:
                raise InvalidRequest(f"--{flag} must be {allowed}, got {value!r}",
                                     field=flag.replace("-", "_"))

    def record(self, examples: list["RaftExample"], left_out: int) -> dict:
        """What training.json keeps of how the data was built."""
        return {"namespace": self.namespace, "layout": RAG_LAYOUT, "top_k": self.top_k,
                "mode": self.mode, "oracle_p": self.oracle_p,
                "answer_format": self.answer_format, "abstain": self.abstain,
                "seed": self.seed, "draws": self.draws, "examples": len(examples),
                "with_oracle": sum(e.oracle for e in examples),
                "unanswerable": sum(e.gold is None for e in examples), "left_out": left_out}


@dataclass
class RaftExample:
    """One training chat, and what went into it."""

    question: str
    gold: str | None  # the gold document's id; None for an unanswerable question
    oracle: bool  # whether the gold passage is among the passages
    passages: list[Hit]  # best first, as retrieval ranks them
    messages: list[dict]  # the prompt the daemon would build, then the target

    def row(self) -> dict:
        """The line `lorag train` trains on."""
        return {"messages": self.messages}

    def dump(self) -> dict:
        """The line `--dump-examples` writes: the chat and how it was made."""
        return {**self.row(), "question": self.question, "gold": self.gold,
                "oracle": self.oracle,
                "passages": [f"{hit.document_id}#{hit.chunk_id}" for hit in self.passages]}


def raft_examples(questions: list[dict], search: Search, options: RaftOptions,
                  fit: Fit | None = None) -> tuple[list[RaftExample], int]:
    """The examples for `questions` (`options.draws` rounds over them), and how many
    questions were left out. `fit` drops the passages a prompt budget has no room for, as
    the daemon drops them; a chat whose gold passage is dropped that way is an abstention,
    since its prompt lacks the answer."""
    rng = random.Random(options.seed)
    search = functools.cache(search)  # a question asked twice is searched once
    examples, left_out = [], 0
    for draw in range(options.draws):
        for record in questions:
            example = _example(record, search, options, rng, fit)
            if example is not None:
                examples.append(example)
            elif draw == 0:
                left_out += 1
    return examples, left_out


def _example(record: dict, search: Search, options: RaftOptions, rng: random.Random,
             fit: Fit | None) -> RaftExample | None:
    question = record["question"]
    chosen = _passages(record, search, options, rng)
    if chosen is None:
        return None
    gold, passages = chosen
    asking = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    asking.append({"role": "user", "content": question})
    if fit is not None:
        passages = fit(asking, passages)
    oracle = gold is not None and any(hit.document_id == gold for hit in passages)
    target = _answer(record["answer"], gold, options.answer_format) if oracle else \
        _answer(options.abstain, NO_SOURCE, options.answer_format)
    prompt = with_context(asking, passages) if passages else asking
    return RaftExample(question, gold, oracle, passages,
                       [*prompt, {"role": "assistant", "content": target}])


def _passages(record: dict, search: Search, options: RaftOptions, rng: random.Random
              ) -> tuple[str | None, list[Hit]] | None:
    """The gold document (None for an unanswerable question) and the passages its prompt
    carries, before a prompt budget; None when the gold document is never found."""
    asked = search(record["question"], options.top_k)  # what the daemon's `rag` finds
    if not record.get("answerable", True):
        return None, asked
    wide = search(record["question"], MAX_TOP_K)  # where the gold and distractors are found
    gold = record.get("source") or (asked[0].document_id if asked else None)
    gold_hit = next((hit for hit in wide if hit.document_id == gold), None)
    if gold_hit is None:
        return None
    if rng.random() < options.oracle_p:
        has_gold = any(hit.document_id == gold for hit in asked)
        return gold, asked if has_gold else [*asked[:options.top_k - 1], gold_hit]
    passages, seen = [], set()
    for hit in [*asked, *wide]:  # the daemon's hits first, then the next ranks
        if hit.document_id != gold and (hit.document_id, hit.chunk_id) not in seen:
            seen.add((hit.document_id, hit.chunk_id))
            passages.append(hit)
    return gold, passages[:options.top_k]


def _answer(answer: str, source: str, answer_format: str) -> str:
    if answer_format == "json":
        return json.dumps({"answer": answer, "source": source}, ensure_ascii=False)
    return answer if source == NO_SOURCE else f"{answer} (source: {source})"


def read_questions(path: Path) -> list[dict]:
    """The question file's rows, each checked; a bad one is named by its file and line."""
    rows = []
    for where, row in read_objects(path, "data"):
        answerable = row.get("answerable", True)
        if not isinstance(answerable, bool):
            raise InvalidRequest(f"{where}: 'answerable' must be true or false", field="data")
        for key in ("question", "answer") if answerable else ("question",):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise InvalidRequest(f"{where}: {key!r} must be a non-empty string (a RAFT "
                                     "question file has question, answer and optionally "
                                     "source and system; an unanswerable question has "
                                     '"answerable": false and no answer)', field="data")
        for key in ("source", "system"):
            if key in row and not isinstance(row[key], str):
                raise InvalidRequest(f"{where}: {key!r} must be a string", field="data")
        rows.append(row)
    if not rows:
        raise InvalidRequest(f"{path} has no questions", field="data")
    return rows


def write_raft_data(questions: Path, search: Search, options: RaftOptions, out: Path,
                    dump: Path | None = None, fit: Fit | None = None) -> tuple[Path, dict]:
    """Build the examples for the question file `questions` and write the chats to train
    on under `out` (raft.jsonl); `dump` also gets each chat with how it was made. Returns
    the chats' file and the record training.json keeps."""
    examples, left_out = raft_examples(read_questions(questions), search, options, fit)
    if not examples:
        raise InvalidRequest(f"no question's gold document was found in namespace "
                             f"{options.namespace!r}, leaving nothing to train on",
                             field="rag_namespace")
    out.mkdir(parents=True, exist_ok=True)
    chats = out / "raft.jsonl"
    chats.write_text("".join(json.dumps(e.row(), ensure_ascii=False) + "\n"
                             for e in examples), encoding="utf-8")
    if dump is not None:
        dump.write_text("".join(json.dumps(e.dump(), ensure_ascii=False) + "\n"
                                for e in examples), encoding="utf-8")
    return chats, options.record(examples, left_out)
