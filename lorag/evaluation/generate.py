"""`lorag eval generate`: a labelled question set through a running daemon, scored.

It measures what users get: each question goes to the daemon's chat completions (greedy),
optionally with `rag`, and the answer is scored against the gold one with
lorag/evaluation/scoring.py. Examples are JSONL, one per line:

    {"question": "...", "answer": "gold answer", "source": "gold document id"}
    {"question": "...", "answerable": false}

(`source` and a per-example `system` message are optional; an unanswerable question, one
the knowledge base does not answer, needs no `answer`). Metrics by name:

    exact_match  f1  rouge_l  bleu  chrf  -- text metrics on the answer text
    accuracy     the gold answer appears in the answer text (factual accuracy)
    format       the whole answer follows --format-schema or --format-regex
    source       the answer's JSON `source` field names the gold document
    retrieved    the gold document was among the passages `rag` used
    abstain      on unanswerable questions: the answer declines (retrieval/rag.py
                 declines, the daemon's test too: it cites source "none", or holds
                 --abstain-answer or a common "not in the sources" phrase); the
                 summary's false_abstain is the share of answerable ones declined
    supported    the answer's words are in a passage it was given (scoring.supported: 80%
                 of its normalised words in the passage its JSON `source` cites, else in
                 any passage `rag` used); abstentions are not scored

Text metrics, accuracy and source score answerable questions only.

The answer text is the JSON field `--answer-field` when the answer holds one, else the
whole answer, so a JSON-formatted answer is compared by its content. `--response-format`
sends an OpenAI `response_format` with every question (constrained decoding), so the
format a grammar guarantees can be told apart from the one an adapter learned.
"""

import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lorag.client import DaemonClient
from lorag.errors import InvalidRequest
from lorag.evaluation import scoring
from lorag.jsonl import read_objects
from lorag.retrieval import RAG_TOP_K, SEARCH_MODE
from lorag.retrieval.rag import declines

TEXT = {"exact_match": scoring.exact_match, "f1": scoring.token_f1,
        "rouge_l": scoring.rouge_l, "bleu": scoring.bleu, "chrf": scoring.chrf,
        "accuracy": scoring.contains}
METRICS = (*TEXT, "format", "source", "retrieved", "abstain", "supported")


@dataclass
class EvalOptions:
    """What `lorag eval generate` takes."""

    url: str
    data: Path
    model: str
    metrics: list[str]
    api_key: str | None = None
    rag_namespace: str | None = None
    rag_top_k: int = RAG_TOP_K
    rag_mode: str = SEARCH_MODE
    rag_rerank_model: str | None = None  # rag.rerank with this relevance adapter
    rag_cite: str | None = None  # rag.cite: the response_format's property citing a passage
    schema: dict | None = None
    regex: re.Pattern | None = None
    answer_field: str | None = None
    response_format: dict | None = None  # sent as is: the daemon validates it
    max_tokens: int = 128
    concurrency: int = 1
    abstain_answer: str | None = None  # the abstention the model was trained to give
    out: Path | None = None
    name: str = field(default="")

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise InvalidRequest(f"unknown metric(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(METRICS)}", field="metrics")
        if "format" in self.metrics and self.schema is None and self.regex is None:
            raise InvalidRequest("the format metric needs --format-schema or --format-regex",
                                 field="metrics")
        for metric in ("retrieved", "supported"):
            if metric in self.metrics and not self.rag_namespace:
                raise InvalidRequest(f"the {metric} metric needs --rag-namespace",
                                     field="metrics")
        if self.rag_rerank_model and not self.rag_namespace:
            raise InvalidRequest("reranking reorders rag's passages: --rag-rerank-model "
                                 "needs --rag-namespace", field="rag_rerank_model")
        if self.rag_cite and not (self.rag_namespace and self.response_format):
            raise InvalidRequest("--rag-cite limits a property of --response-format to rag's "
                                 "sources: it needs both --rag-namespace and "
                                 "--response-format", field="rag_cite")


def read_examples(path: Path) -> list[dict]:
    """The examples, every line checked; errors name `file:line`."""
    examples = []
    for where, row in read_objects(path, "data"):
        if row.get("answerable", True) not in (True, False):
            raise InvalidRequest(f'{where}: "answerable" must be true or false', field="data")
        answerable = row.get("answerable", True)
        for key, required in (("question", True), ("answer", answerable), ("source", False),
                              ("system", False)):
            value = row.get(key)
            if (required or value is not None) and not isinstance(value, str):
                raise InvalidRequest(f'{where}: "{key}" must be a string', field="data")
        if not row["question"].strip():
            raise InvalidRequest(f'{where}: "question" is empty', field="data")
        examples.append(row)
    if not examples:
        raise InvalidRequest(f"{path} holds no examples", field="data")
    return examples


def score(example: dict, answer: str, passages: list[dict], options: EvalOptions) -> dict:
    """Every requested metric that applies to one answer; `passages` are the sources `rag`
    used ({"document_id", "text", ...})."""
    text = scoring.answer_text(answer, options.answer_field)
    declined = declines(text, options.abstain_answer)
    answerable = example.get("answerable", True)
    scores = {}
    for metric in options.metrics:
        if metric == "abstain":
            scores[metric if not answerable else "false_abstain"] = float(declined)
        elif metric == "supported":
            if not declined:
                scores[metric] = scoring.supported(text, _cited(answer, passages))
        elif metric == "format":
            scores[metric] = float(scoring.follows_schema(answer, options.schema)
                                   if options.schema is not None
                                   else scoring.matches(answer, options.regex))
        elif not answerable:
            continue  # nothing to compare with
        elif metric in TEXT:
            scores[metric] = TEXT[metric](text, example["answer"])
        elif "source" in example:  # source, retrieved: only where the gold source is known
            if metric == "source":
                cited = (scoring.extract_json(answer) or {}).get("source")
                scores[metric] = float(cited == example["source"])
            else:
                scores[metric] = float(example["source"] in
                                       [p["document_id"] for p in passages])
    return scores


def _cited(answer: str, passages: list[dict]) -> list[str]:
    """The texts of the passages an answer rests on: those of the document its JSON
    `source` names, else every passage it was given."""
    source = (scoring.extract_json(answer) or {}).get("source")
    named = [p["text"] for p in passages if p["document_id"] == source]
    return named or [p["text"] for p in passages]


def evaluate(options: EvalOptions, on_example=None) -> dict:
    """Run every example through the daemon; per-example rows and the summary."""
    examples = read_examples(options.data)
    client = DaemonClient(options.url, options.api_key)

    def ask(indexed: tuple[int, dict]) -> dict:
        index, example = indexed
        messages = [{"role": "system", "content": example["system"]}] \
            if example.get("system") else []
        messages.append({"role": "user", "content": example["question"]})
        body = {"model": options.model, "messages": messages, "temperature": 0,
                "max_tokens": options.max_tokens}
        if options.rag_namespace:
            body["rag"] = {"namespace": options.rag_namespace, "top_k": options.rag_top_k,
                           "mode": options.rag_mode}
            if options.rag_rerank_model:
                body["rag"] |= {"rerank": True, "rerank_model": options.rag_rerank_model}
            if options.rag_cite:
                body["rag"]["cite"] = options.rag_cite
        if options.response_format:
            body["response_format"] = options.response_format
        start = time.perf_counter()
        reply = client.chat(body)
        latency = time.perf_counter() - start
        answer = reply["choices"][0]["message"]["content"]
        passages = reply.get("sources", [])
        grounding = reply.get("rag") or {}
        row = {"index": index, "question": example["question"], "gold": example.get("answer"),
               "answerable": example.get("answerable", True),
               "gold_source": example.get("source"), "answer": answer,
               "sources": [p["document_id"] for p in passages],
               "reranker": grounding.get("reranker"),
               "rag_timing": grounding.get("timing"),
               "latency_s": round(latency, 3),
               "completion_tokens": reply["usage"]["completion_tokens"],
               "finish_reason": reply["choices"][0]["finish_reason"],
               "scores": score(example, answer, passages, options)}
        if on_example:
            on_example(row)
        return row

    with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
        rows = list(pool.map(ask, enumerate(examples)))
    if options.out:
        with Path(options.out).open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"name": options.name, "model": options.model, "rag": options.rag_namespace,
            "reranker": options.rag_rerank_model, "examples": len(rows),
            **summarize(rows, options.metrics, options.answer_field)}


def summarize(rows: list[dict], metrics: list[str], answer_field: str | None) -> dict:
    """Means of each metric (over the examples it applies to), corpus BLEU/chrF, the share
    of answers that ended by themselves (not cut by max_tokens), latency."""
    summary = {}
    for metric in [*metrics, *(["false_abstain"] if "abstain" in metrics else [])]:
        values = [r["scores"][metric] for r in rows if metric in r["scores"]]
        summary[metric] = round(sum(values) / len(values), 4) if values else None
    answered = [r for r in rows if r["answerable"]]
    texts = [scoring.answer_text(r["answer"], answer_field) for r in answered]
    golds = [r["gold"] for r in answered]
    if "bleu" in metrics and answered:
        summary["corpus_bleu"] = round(scoring.corpus_bleu(texts, golds), 4)
    if "chrf" in metrics and answered:
        summary["corpus_chrf"] = round(scoring.corpus_chrf(texts, golds), 4)
    summary["stopped"] = round(sum(r["finish_reason"] == "stop" for r in rows) / len(rows), 4)
    latencies = sorted(r["latency_s"] for r in rows)
    summary["latency_p50_s"] = round(statistics.median(latencies), 3)
    summary["latency_p95_s"] = round(latencies[min(len(latencies) - 1,
                                                   int(0.95 * len(latencies)))], 3)
    return summary
