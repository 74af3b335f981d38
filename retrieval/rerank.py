"""Reranking by a relevance adapter on the base model: the question and one passage go
into a chat, and the passage's relevance is the probability that the model answers "yes".

One format, here, for both sides: `lorag train --task rerank` (trainer/relevance.py)
trains on these chats with the answer "yes" or "no", and the daemon (server/rerank.py)
scores a pair by reading its first answer token's log-probabilities. A relevance adapter
runs on the engine that generates, in the same continuous batch, with no second model in
memory. A change to the chat is a new RERANK_LAYOUT: adapters record the one they learnt.
"""

import math

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
