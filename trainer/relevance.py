"""`lorag train --task rerank`: training chats for a relevance adapter, which the daemon
reranks RAG candidates with (server/rerank.py) by the probability that it answers "yes".

The chats are the daemon's scoring prompt (retrieval/rerank.py `relevance_messages`) with
the answer "yes" or "no". Two sources:

- a pair file: one `{"query", "passage", "relevant": true|false}` per line;
- a question file (RAFT's, `lorag eval generate`'s: question, answer, optional source) with
  `--rag-namespace`: each question is searched as the daemon searches the candidates it
  reranks (RERANK_CANDIDATES hits), the gold document's best passage is the positive (the
  one holding the answer's text, where one does) and the best-ranked passages of other
  documents are the negatives: the hard ones, those the first stage confuses with the
  answer. Without `source`, a question's gold is the document holding its answer's text
  among the hits; a question whose gold is not among them is left out (counted), and so
  is an unanswerable one (`"answerable": false`): it has no passage to rank first.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.retrieval import MODES, SEARCH_MODE
from lorag.retrieval.rerank import NO, RERANK_CANDIDATES, RERANK_LAYOUT, YES, relevance_messages
from lorag.retrieval.store import Hit
from lorag.trainer.raft import Search, read_questions


@dataclass(frozen=True)
class RelevanceOptions:
    """How `lorag train --task rerank` builds its pairs from a namespace."""

    namespace: str | None = None  # None: the data is a pair file
    negatives: int = 3  # per question
    mode: str = SEARCH_MODE
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.negatives, int) or not 1 <= self.negatives < RERANK_CANDIDATES:
            raise InvalidRequest(f"--rerank-negatives must be an integer in 1.."
                                 f"{RERANK_CANDIDATES - 1}, got {self.negatives!r}",
                                 field="rerank_negatives")
        if self.mode not in MODES:
            raise InvalidRequest(f"--rag-mode must be one of {', '.join(MODES)}, got "
                                 f"{self.mode!r}", field="rag_mode")


@dataclass
class Pair:
    query: str
    passage: str
    relevant: bool
    source: str = ""  # where the passage came from (document#chunk), when known

    def row(self) -> dict:
        """The chat `lorag train` trains on."""
        answer = {"role": "assistant", "content": YES if self.relevant else NO}
        return {"messages": [*relevance_messages(self.query, self.passage), answer]}


def pairs_from_namespace(questions: list[dict], search: Search,
                         options: RelevanceOptions) -> tuple[list[Pair], int]:
    """One positive and `options.negatives` hard negatives per question, and how many
    questions were left out (gold not among the candidates)."""
    rng = random.Random(options.seed)
    pairs, left_out = [], 0
    for record in questions:
        if not record.get("answerable", True):
            left_out += 1
            continue
        question = record["question"]
        hits = search(question, RERANK_CANDIDATES)
        positive = _gold_passage(record, hits)
        if positive is None:
            left_out += 1
            continue
        others = [hit for hit in hits if hit.document_id != positive.document_id]
        found = [Pair(question, positive.text, True, _where(positive))]
        found += [Pair(question, hit.text, False, _where(hit))
                  for hit in others[:options.negatives]]
        rng.shuffle(found)
        pairs += found
    return pairs, left_out


def _gold_passage(record: dict, hits: list[Hit]) -> Hit | None:
    answer = record["answer"].strip().lower()
    holding = [hit for hit in hits if answer and answer in hit.text.lower()]
    if record.get("source"):
        gold = [hit for hit in hits if hit.document_id == record["source"]]
        return next((hit for hit in gold if hit in holding), gold[0] if gold else None)
    return holding[0] if holding else None


def _where(hit: Hit) -> str:
    return f"{hit.document_id}#{hit.chunk_id}"


def read_pairs(path: Path) -> list[Pair]:
    """A pair file's rows, each checked; a bad one is named by its file and line."""
    pairs = []
    for where, row in read_objects(path, "data"):
        for key in ("query", "passage"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise InvalidRequest(f"{where}: {key!r} must be a non-empty string (a rerank "
                                     "pair file has query, passage and relevant)",
                                     field="data")
        if not isinstance(row.get("relevant"), bool):
            raise InvalidRequest(f"{where}: 'relevant' must be true or false", field="data")
        pairs.append(Pair(row["query"], row["passage"], row["relevant"]))
    if not pairs:
        raise InvalidRequest(f"{path} has no pairs", field="data")
    return pairs


def write_relevance_data(data: Path, out: Path, options: RelevanceOptions,
                         search: Search | None = None,
                         dump: Path | None = None) -> tuple[Path, dict]:
    """The relevance chats for `data` (a pair file, or with a namespace a question file)
    written under `out` (relevance.jsonl); `dump` also gets each pair as built. Returns
    the chats' file and the record training.json keeps."""
    left_out = 0
    if options.namespace is None:
        pairs = read_pairs(data)
    else:
        pairs, left_out = pairs_from_namespace(read_questions(data), search, options)
        if not pairs:
            raise InvalidRequest(f"no question's gold passage was among the "
                                 f"{RERANK_CANDIDATES} candidates of namespace "
                                 f"{options.namespace!r}, leaving nothing to train on",
                                 field="rag_namespace")
    positives = sum(pair.relevant for pair in pairs)
    if positives in (0, len(pairs)):
        raise InvalidRequest(f"{data}: the pairs are all "
                             f"{'relevant' if positives else 'irrelevant'}; a relevance "
                             "adapter needs both kinds", field="data")
    out.mkdir(parents=True, exist_ok=True)
    chats = out / "relevance.jsonl"
    chats.write_text("".join(json.dumps(p.row(), ensure_ascii=False) + "\n" for p in pairs),
                     encoding="utf-8")
    if dump is not None:
        dump.write_text("".join(json.dumps({**p.row(), "relevant": p.relevant,
                                            "source": p.source}, ensure_ascii=False) + "\n"
                                for p in pairs), encoding="utf-8")
    record = {"layout": RERANK_LAYOUT, "namespace": options.namespace,
              "negatives": options.negatives if options.namespace else None,
              "pairs": len(pairs), "relevant": positives, "left_out": left_out}
    return chats, record
