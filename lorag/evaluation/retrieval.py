"""Retrieval quality on a labelled query set: recall@k, MRR@10 and nDCG@10.

Queries come from JSONL, one per line: {"query": "...", "relevant": ["doc id", ...]}, or a
question file's {"question", "source", ...} (RAFT's and `lorag eval generate`'s: the one
file labels retrieval and answers).
Relevance is by document: a search returns chunks, ranked; the ranking that is scored is
the documents in the order their first chunk appears. Binary relevance throughout.
"""

import math
from pathlib import Path

from lorag.errors import InvalidRequest
from lorag.jsonl import read_objects
from lorag.retrieval import SEARCH_MODE, TOP_K

DEPTH = 100  # chunks fetched per query: enough distinct documents for the cut-offs


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
             mode: str = SEARCH_MODE) -> dict:
    """Run every query through `namespaces.search` (a data dir's namespaces or a
    DaemonClient); per-query rows and the means."""
    rows = []
    for query in queries:
        hits = namespaces.search(namespace, query["query"], DEPTH, mode)
        ranked, relevant = documents_in_order(hits), set(query["relevant"])
        rows.append({"query": query["query"], "relevant": query["relevant"],
                     "ranked": ranked[:10], f"recall@{k}": recall_at(ranked, relevant, k),
                     "mrr@10": mrr_at(ranked, relevant), "ndcg@10": ndcg_at(ranked, relevant)})
    metrics = [f"recall@{k}", "mrr@10", "ndcg@10"]
    summary = {m: round(sum(r[m] for r in rows) / len(rows), 4) for m in metrics}
    return {"mode": mode, "queries": len(rows), **summary, "per_query": rows}
