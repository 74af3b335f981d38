"""Reranking RAG's candidates, two ways, and how a reranker's order joins the search's.

- A relevance adapter on the base model: the question and one passage go into a chat, and
  the passage's relevance is the probability that the model answers "yes". One format,
  here, for both sides: `lorag train --task rerank` (trainer/relevance.py) trains on these
  chats with the answer "yes" or "no", and the daemon (server/rerank.py) scores a pair by
  reading its first answer token's log-probabilities. It runs on the engine that
  generates, in the same continuous batch, with no second model in memory. A change to
  the chat is a new RERANK_LAYOUT: adapters record the one they learnt.
- Late interaction on the embedder (`sentence_scores`): a passage's relevance is the best
  cosine between the question and one of the passage's sentences (ColBERT's MaxSim, at
  the grain of sentences), so the one sentence that answers is not averaged away by the
  rest of a long passage. No training, the embedder retrieval already holds.

`rag.rerank` does not throw the search's ranking away: `fused` joins it with the
reranker's by reciprocal-rank fusion, so a reranker moves a passage up only where it
ranks it well above where the search did (measured on the Python reference, in
docs/retrieval.md: each reranker alone orders worse than hybrid search; fused, the
late-interaction one orders better).
"""

import math
import re

import numpy as np

from lorag.retrieval.embedder import Embedder

RELEVANCE_INSTRUCTION = ("Does the passage contain the answer to the question? Reply yes or "
                         "no.")
YES, NO = "yes", "no"
RERANK_LAYOUT = "yes-no/1"
RERANK_CANDIDATES = 20  # hits a RAG search hands the reranker, when top_k asks for fewer


def relevance_messages(query: str, passage: str) -> list[dict]:
    """The chat a relevance adapter answers "yes" or "no" to."""
    return [{"role": "system", "content": RELEVANCE_INSTRUCTION},
            {"role": "user", "content": f"Question: {query}\n\nPassage: {passage}"}]


def relevance(yes: list[float], no: list[float], floor: float) -> float:
    """P(yes) / (P(yes) + P(no)) from the log-probabilities of the answer's first token:
    `yes` and `no` those of the tokens that spell either word (any case, any leading
    space), found among the most likely tokens; `floor` the least likely of those seen,
    which bounds a word none of whose tokens was seen."""
    p_yes = sum(math.exp(v) for v in yes) if yes else math.exp(floor)
    p_no = sum(math.exp(v) for v in no) if no else math.exp(floor)
    return p_yes / (p_yes + p_no)


FUSION_K = 60  # reciprocal-rank fusion's constant, the literature's (Cormack et al. 2009)
# sentences of a document late interaction reads, from its start: a RAG chunk (~200 word
# pieces) has about 10; the cap bounds what one /v1/rerank body can make the embedder do
MAX_SENTENCES = 32
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n+")


def fused(scores: list[float], k: int = FUSION_K) -> list[int]:
    """Candidates given in the search's order (best first), ordered by reciprocal-rank
    fusion of that order and the order of `scores`: 1/(k + search rank) + 1/(k + reranker
    rank); ties keep the search's order."""
    by_score = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = {i: r for r, i in enumerate(by_score)}
    return sorted(range(len(scores)), key=lambda i: -(1 / (k + i) + 1 / (k + rank[i])))


def sentences(text: str) -> list[str]:
    """A passage's sentences and lines (a heading is one), or the passage if it has none."""
    found = [part.strip() for part in _SENTENCE_END.split(text)]
    return [part for part in found if part] or [text]


def sentence_scores(embedder: Embedder, query: str, documents: list[str]
                    ) -> tuple[list[float], list[str]]:
    """Each document's relevance to `query` by late interaction on `embedder` (the best
    cosine between the query and one of its first MAX_SENTENCES sentences, in [-1, 1]), and
    the sentences embedded."""
    pieces = [sentences(document)[:MAX_SENTENCES] for document in documents]
    read = [sentence for piece in pieces for sentence in piece]
    vectors = embedder.encode([query, *read])
    scores, start = [], 1
    for piece in pieces:
        scores.append(float(np.max(vectors[start:start + len(piece)] @ vectors[0])))
        start += len(piece)
    return scores, read
