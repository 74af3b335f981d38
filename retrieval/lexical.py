"""BM25 over a namespace's chunks (bm25s), and reciprocal rank fusion with vector hits.

The BM25 index is derived state like the FAISS one: built from the chunk texts in SQLite
when a namespace is first searched after a write (bm25s indexes ~10^5 chunks a second),
never written to disk, so it cannot disagree with the database.
"""

import bm25s
import numpy as np

RRF_K = 60  # Cormack et al. 2009: the constant that damps the weight of top ranks


class LexicalIndex:
    """BM25 over (chunk id, text) pairs, with an optional allowed-id mask."""

    def __init__(self, rows: list[tuple[int, str]]):
        self.ids = np.array([chunk_id for chunk_id, _ in rows], dtype=np.int64)
        self.bm25 = bm25s.BM25()
        corpus = bm25s.tokenize([text for _, text in rows], show_progress=False)
        # chunks of stop words, digits or punctuation alone leave no term to index (and
        # bm25s fails on an empty vocabulary): such an index finds nothing
        self.empty = not corpus.vocab
        if not self.empty:
            self.bm25.index(corpus, show_progress=False)

    def search(self, query: str, k: int,
               allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score), best first; only ids in `allowed` when given, masked
        inside the scoring (not cut from a top-k afterwards). Zero-score chunks are left
        out: they share no term with the query."""
        if self.empty:
            return []
        tokens = bm25s.tokenize([query], show_progress=False)
        if not tokens.vocab:
            return []
        mask = None
        if allowed is not None:
            mask = np.isin(self.ids, np.fromiter(allowed, dtype=np.int64)).astype(np.float32)
        positions, scores = self.bm25.retrieve(tokens, k=min(k, len(self.ids)),
                                               show_progress=False, weight_mask=mask)
        return [(int(self.ids[p]), float(s))
                for p, s in zip(positions[0], scores[0], strict=True) if s > 0]


def fuse(rankings: list[list[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (chunk id, sum of 1 / (RRF_K + rank)) best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: -item[1])[:k]
