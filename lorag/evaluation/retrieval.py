"""Retrieval quality on a labelled query set: recall@k, MRR@10 and nDCG@10.

Queries come from JSONL, one per line: {"query": "...", "relevant": ["doc id", ...]}, or a
question file's {"question", "source", ...} (RAFT's and `lorag eval generate`'s: the one
file labels retrieval and answers).
Relevance is by document: a search returns chunks, ranked; the ranking that is scored is
the documents in the order their first chunk appears. Binary relevance throughout.
"""

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.retrieval import SEARCH_MODE, TOP_K
from lorag.retrieval.rerank import RERANK_CANDIDATES

DEPTH = 100  # chunks fetched per query: enough distinct documents for the cut-offs
# (query, passage texts) -> the passages' indexes, most relevant first
Rerank = Callable[[str, list[str]], list[int]]


def read_queries(path: Path) -> list[dict]:
    """The query file, every line checked; errors name `file:line`."""
    queries = []
    for where, row in read_objects(path, "queries"):
        if "question" in row and "query" not in row:  # a question file's line
            row = {"query": row["question"],
                   "relevant": [row["source"]] if "source" in row else None}
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise InvalidRequest(f'{where}: needs a non-empty "query" string', field="queries")
        relevant = row.get("relevant")
        if not isinstance(relevant, list) or not relevant or \
                not all(isinstance(r, str) and r for r in relevant):
            raise InvalidRequest(f'{where}: "relevant" must be a non-empty list of document '
                                 'ids (or, in a question file, "source" a document id)',
                                 field="queries")
        queries.append({"query": row["query"], "relevant": relevant})
    if not queries:
        raise InvalidRequest(f"{path} holds no queries", field="queries")
    return queries


def documents_in_order(hits: list[dict]) -> list[str]:
    """Document ids in the order their best chunk ranks, each once."""
    seen: dict[str, None] = {}
    for hit in hits:
        seen.setdefault(hit["document_id"], None)
    return list(seen)


def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    """Share of the relevant documents among the first k."""
    return len(relevant & set(ranked[:k])) / len(relevant)


def mrr_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """1 / rank of the first relevant document within the first k, else 0."""
    for rank, document in enumerate(ranked[:k], 1):
        if document in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """DCG of the first k (gain 1 per relevant document, discount log2(rank + 1)) over the
    DCG of a perfect ranking."""
    dcg = sum(1.0 / math.log2(rank + 1)
              for rank, document in enumerate(ranked[:k], 1) if document in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def evaluate(namespaces, namespace: str, queries: list[dict], k: int = TOP_K,
             mode: str = SEARCH_MODE, rerank: Rerank | None = None) -> dict:
    """Run every query through `namespaces.search` (a data dir's namespaces or a
    DaemonClient), and with `rerank` reorder the first RERANK_CANDIDATES chunks by it, as
    a daemon's `rag.rerank` does; per-query rows, the means, and each stage's time per
    query (p50 / p99 ms)."""
    rows, search_s, rerank_s = [], [], []
    cutoffs = sorted({1, k, 10})
    for query in queries:
        started = time.perf_counter()
        hits = namespaces.search(namespace, query["query"], DEPTH, mode)
        search_s.append(time.perf_counter() - started)
        if rerank is not None and hits:
            started = time.perf_counter()
            candidates = hits[:RERANK_CANDIDATES]
            order = rerank(query["query"], [hit["text"] for hit in candidates])
            hits = [candidates[i] for i in order] + hits[RERANK_CANDIDATES:]
            rerank_s.append(time.perf_counter() - started)
        ranked, relevant = documents_in_order(hits), set(query["relevant"])
        rows.append({"query": query["query"], "relevant": query["relevant"],
                     "ranked": ranked[:10],
                     **{f"recall@{c}": recall_at(ranked, relevant, c) for c in cutoffs},
                     "mrr@10": mrr_at(ranked, relevant), "ndcg@10": ndcg_at(ranked, relevant)})
    metrics = [*(f"recall@{c}" for c in cutoffs), "mrr@10", "ndcg@10"]
    summary = {m: round(sum(r[m] for r in rows) / len(rows), 4) for m in metrics}
    timing = {"search_ms": _percentiles(search_s)}
    if rerank is not None:
        timing["rerank_ms"] = _percentiles(rerank_s)
    return {"mode": f"{mode}+rerank" if rerank else mode, "queries": len(rows), **summary,
            **timing, "per_query": rows}


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p99": None}
    values = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(values, 50)), 1),
            "p99": round(float(np.percentile(values, 99)), 1)}
