"""Reranking on the serving engine: each (query, document) pair is one request on the
relevance adapter, scored by the probability that its answer is "yes"
(retrieval/rerank.py holds the chat both the trainer and this module use). Or, named by
the embedding model's name, by late interaction on the embedder retrieval holds
(retrieval/rerank.py `sentence_scores`), with no engine request at all.

A pair is a one-token greedy request asking for the most likely tokens' log-probabilities,
submitted like any chat: it runs in the continuous batch beside generation, on whichever
backend serves (the native engine or vLLM), and its prompt's shared prefix (the
instruction and the question) is found in the prefix cache from the second document on.
A document too long for the context is cut to fit; the query is not.
"""

import time
import uuid
from collections import deque
from dataclasses import dataclass

from lorag.adapters import AdapterKey
from lorag.errors import InvalidRequest, Unavailable
from lorag.retrieval.embedder import Embedder
from lorag.retrieval.rerank import NO, YES, relevance, relevance_messages, sentence_scores
from lorag.server.backend import Backend
from lorag.server.chat_template import render_chat
from lorag.server.engine.sampling import MAX_LOGPROBS, SamplingParams
from lorag.server.engine.stream import TokenLogprob
from lorag.server.limits import RequestLimits

# a rerank's requests in the engine at once: a batch's worth of prefill, while the rest
# of the queue stays open to other callers
IN_FLIGHT = 8
# one token, greedy, with the most likely tokens' log-probabilities: where "yes" and "no" are
SCORING = SamplingParams(max_tokens=1, temperature=0.0, logprobs=MAX_LOGPROBS)


@dataclass
class RerankRequest:
    """vLLM's and llama.cpp's body: a query, the documents to order, how many to return
    (`top_n`, 0: all), and whether the results carry each document's text."""

    model: str
    query: str
    documents: list[str]
    top_n: int = 0
    return_documents: bool = True


@dataclass
class Reranked:
    """Each document's relevance (by input index), what the prompts cost and how long."""

    scores: list[float]
    prompt_tokens: int
    seconds: float

    def order(self, top_n: int = 0) -> list[int]:
        """Document indexes, most relevant first (ties keep the input order); `top_n` of
        them, or all for 0."""
        ranked = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return ranked[:top_n] if top_n else ranked


class Reranker:
    """Scores documents against a query on the engine, with a relevance adapter."""

    def __init__(self, engine: Backend, limits: RequestLimits, token_texts: list[bytes],
                 embedder: Embedder):
        self.engine, self.limits, self.embedder = engine, limits, embedder
        words = [raw.decode("utf-8", errors="replace").strip().lower() for raw in token_texts]
        self.yes = {i for i, word in enumerate(words) if word == YES}
        self.no = {i for i, word in enumerate(words) if word == NO}

    def score(self, query: str, documents: list[str], adapter: AdapterKey | None) -> Reranked:
        """Every document's relevance to `query` on `adapter` (None: the base model), one
        engine request each, IN_FLIGHT at a time. Blocks until all are scored; if one
        cannot be submitted (a full queue) or fails, those in flight are cancelled."""
        self._check(query, documents)
        started = time.perf_counter()
        prompts = [self._prompt(query, document, f"documents.{i}")
                   for i, document in enumerate(documents)]
        batch, outputs, pending = uuid.uuid4().hex, [None] * len(prompts), deque()

        def collect_oldest() -> None:
            j, stream = pending[0]
            outputs[j] = stream.result()
            pending.popleft()

        try:
            for i, prompt in enumerate(prompts):
                if len(pending) == IN_FLIGHT:
                    collect_oldest()
                pending.append((i, self.engine.submit(prompt, SCORING, adapter,
                                                      f"rerank-{batch}-{i}")))
            while pending:
                collect_oldest()
        except BaseException:
            for _, stream in pending:
                self.engine.cancel(stream.request_id)
            raise
        if any(not out.logprobs for out in outputs):  # cancelled: the daemon is draining
            raise Unavailable("the engine stopped before it scored every document; retry")
        scores = [self._relevance(out.logprobs[0]) for out in outputs]
        return Reranked(scores, sum(map(len, prompts)), time.perf_counter() - started)

    def by_sentences(self, query: str, documents: list[str]) -> Reranked:
        """Every document's relevance to `query` by late interaction on the embedder: the
        best cosine of the query with one of its sentences; `prompt_tokens` counts the
        word pieces the embedder read (each text cut at its window, as it cuts them)."""
        self._check(query, documents)
        started = time.perf_counter()
        scores, read = sentence_scores(self.embedder, query, documents)
        window = self.embedder.max_tokens
        tokens = sum(min(count, window) for count in self.embedder.token_counts([query, *read]))
        return Reranked(scores, tokens, time.perf_counter() - started)

    def _check(self, query: str, documents: list[str]) -> None:
        """What either scorer refuses: an empty query, more documents than the limit."""
        if not query.strip():
            raise InvalidRequest("query is empty", field="query")
        self.limits.check_rerank_documents(len(documents))

    def _prompt(self, query: str, document: str, field: str) -> list[int]:
        """The pair's prompt ids, the document cut (by tokens, from its end) to leave room
        in the context for the answer's token."""
        tokenizer = self.engine.tokenizer
        room = self.engine.limits.max_model_len - SCORING.max_tokens
        prompt = render_chat(tokenizer, relevance_messages(query, document))
        while len(prompt) > room:
            ids = tokenizer.encode(document, add_special_tokens=False)
            keep = len(ids) - (len(prompt) - room) - 1
            if keep < 1:
                raise InvalidRequest(
                    f"query is too long to score {field} against: its prompt alone needs "
                    f"{len(prompt) - len(ids)} of the model's {room + 1} tokens",
                    field="query")
            document = tokenizer.decode(ids[:keep])
            prompt = render_chat(tokenizer, relevance_messages(query, document))
        return prompt

    def _relevance(self, entry: TokenLogprob) -> float:
        seen = [entry.top, [(entry.token_id, entry.logprob)]]
        logprobs = dict(pair for pairs in seen for pair in pairs)
        return relevance([v for i, v in logprobs.items() if i in self.yes],
                         [v for i, v in logprobs.items() if i in self.no],
                         floor=min(logprobs.values()))
