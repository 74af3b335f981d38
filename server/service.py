"""What the transports call: the engine behind tenants, retrieval, durable state and metrics.

HTTP and gRPC authenticate a caller, unpack a request into server/requests.py's values and
make ONE call here (`chat`, `complete`), or on its `adapters` (server/adapters.py) or
`namespaces` (server/namespaces.py); nothing here knows either wire format. A chat is
built here for every transport alike: the adapter or composition resolved by the tenancy
rule (server/tenancy.py), optional retrieval, the chat template rendered once, the
sampling defaults.
"""

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import NamedTuple

from lorag.adapters import MAX_COMPOSITION, AdapterKey, Composition
from lorag.errors import InvalidRequest, LoragError, NotFound, Unavailable
from lorag.retrieval import RAG_MAX_TOP_K
from lorag.retrieval.ingest import SUFFIXES
from lorag.retrieval.rag import ABSTAIN, ABSTENTIONS, NO_SOURCE, citing
from lorag.retrieval.rerank import RERANK_CANDIDATES, fused
from lorag.retrieval.store import MODES, DocumentStore, Hit
from lorag.server.adapters import AdapterRecords
from lorag.server.auth import ApiKeys
from lorag.server.backend import Backend
from lorag.server.batch_store import BatchStore
from lorag.server.chat_template import render_chat, render_grounded
from lorag.server.embeddings import Embeddings
from lorag.server.engine.stream import TokenLogprob
from lorag.server.engine.structured import Constraint, token_bytes
from lorag.server.limits import RequestLimits
from lorag.server.metrics import Metrics, TrackedStream, metric_label
from lorag.server.namespaces import Namespaces
from lorag.server.quotas import KeyQuotas
from lorag.server.requests import (
    COMPLETION_TOKENS,
    RAG_ANSWER_TOKENS,
    SAMPLING_DEFAULTS,
    ChatRequest,
    CompletionRequest,
    Grounding,
    Rag,
    Reply,
    Source,
)
from lorag.server.rerank import Reranked, Reranker, RerankRequest
from lorag.server.sources import AdapterCache
from lorag.server.state import StateStore
from lorag.server.tenancy import Caller


class _Retrieved(NamedTuple):
    """A `rag` chat's passages, best first, the reranker that ordered them, and each
    stage's time."""

    hits: list[Hit]
    reranker: str | None
    search_ms: float
    rerank_ms: float | None


def _cited_schema(rag: Rag, constraint: Constraint | None):
    """For `rag.cite`: a function of a grounding's sources to the response_format's schema
    with the cited property limited to them (retrieval/rag.py `citing`), checked now,
    before retrieval; None without rag.cite."""
    if rag.cite is None:
        return None
    if constraint is None or constraint.kind != "json_schema":
        raise InvalidRequest("rag.cite names a property of the response_format's "
                             "json_schema; send response_format {type: json_schema} with it",
                             field="rag.cite")
    schema = json.loads(constraint.spec)
    try:
        citing(schema, rag.cite, [])
    except ValueError as e:
        raise InvalidRequest(f"rag.cite: {e}", field="rag.cite") from None
    return lambda sources: Constraint.of_schema(
        citing(schema, rag.cite, [source.document_id for source in sources]))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Service:
    """Tenant-scoped chat, completions, retrieval and adapter management over one engine."""

    def __init__(self, engine: Backend, store: StateStore, keys: ApiKeys, model_name: str,
                 documents: DocumentStore, quotas: KeyQuotas,
                 limits: RequestLimits | None = None, adapter_cache: AdapterCache | None = None,
                 adapter_source: str | None = None):
        self.engine = engine
        self.quotas = quotas  # each API key's share of the engine
        self.limits = limits or RequestLimits()  # what one request may bring
        self.namespaces = Namespaces(documents, self.limits)
        self.embeddings = Embeddings(documents.embedder, self.limits)
        self.store = store
        self.batches = BatchStore(store.db)  # the Batch API's files, batches and lines
        self.keys = keys
        self.model_name = model_name
        self.metrics = Metrics(self.engine_state)
        self.adapters = AdapterRecords(engine, store, self.limits, self.metrics, model_name,
                                       adapter_cache, adapter_source)
        self.token_bytes = token_bytes(engine.tokenizer)  # for logprobs' token texts
        self.reranker = Reranker(engine, self.limits, self.token_bytes, documents.embedder)
        self.follower = None  # follow_state's thread
        # requests whose streams have not ended, for a graceful drain
        self.in_flight: dict[str, TrackedStream] = {}
        self.callers: dict[str, Caller] = {}  # who sent each request in flight
        self.idle = threading.Condition()  # guards both; notified when they empty
        self.draining = False
        self.on_drain: list[Callable[[], None]] = []  # transports' hooks (gRPC health)
        self._ensure_tenants()
        keys.on_reload.append(self._ensure_tenants)

    def _ensure_tenants(self) -> None:
        for caller in self.keys.keys.values():
            self.store.ensure_tenant(caller.tenant)

    def caller(self, authorization: str | None) -> Caller:
        """Who sends a request, from its Authorization header (both transports ask this
        first): Unauthenticated for a missing or unknown key, Unavailable while draining."""
        if self.draining:
            raise Unavailable("this replica is shutting down and takes no new requests; "
                              "retry: the load balancer sends it to another replica")
        return self.keys.caller(authorization)

    # ---- generation ----

    def chat(self, caller: Caller, request: ChatRequest) -> Reply:
        """Submit one chat turn: grounded in a namespace when `request.rag` is set, rendered
        with the base model's chat template, on the requested adapter or composition.
        Blocking (retrieval embeds the question): async callers run it in a thread."""
        self.limits.check_chat(request.messages, request.sampling.stop,
                               request.sampling.constraint)
        if request.tools is not None:
            self._constrain_to_calls(request)
        adapter = self.adapters.key_for(caller, request.model, request.adapters)
        grounding = None
        if request.rag is None:
            prompt = self._render(request.messages)
        else:
            self.adapters.check_layout(adapter)
            cited = _cited_schema(request.rag, request.sampling.constraint)
            prompt, grounding = self.ground(caller, request.messages, request.rag,
                                            request.sampling.max_tokens)
            if cited is not None:
                request.sampling.constraint = cited(grounding.sources)
        limit = self.engine.limits.max_model_len
        params = request.sampling.choice_params(default_max_tokens=max(1, limit - len(prompt)))
        return Reply(self._submit(caller, prompt, params, adapter, "chatcmpl",
                                  request.priority), grounding, request.tools)

    def _constrain_to_calls(self, request: ChatRequest) -> None:
        """Check a chat's tools; under `required` or a named function, its output is the
        calls' grammar (so it takes no response_format besides)."""
        self.limits.check_tools(request.tools)
        request.tools.check()
        if request.tools.choice == "auto":
            return
        if request.sampling.constraint is not None:
            raise InvalidRequest("tool_choice required or a named function constrains the "
                                 "reply to calls: send it without response_format / "
                                 "structured_outputs", field="tool_choice")
        request.sampling.constraint = request.tools.constraint()

    def complete(self, caller: Caller, request: CompletionRequest) -> Reply:
        """Submit a raw completion: the prompt as is, no chat template."""
        self.limits.check_sampling(request.sampling.stop, request.sampling.constraint)
        adapter = self.adapters.key_for(caller, request.model, request.adapters)
        params = request.sampling.choice_params(default_max_tokens=COMPLETION_TOKENS)
        prompt = request.prompt
        if isinstance(prompt, str):  # as is: special tokens (BOS) the tokenizer adds
            prompt = self.engine.tokenizer.encode(prompt)
        return Reply(self._submit(caller, prompt, params, adapter, "cmpl", request.priority))

    def cancel(self, stream: TrackedStream) -> None:
        """Stop a request whose client went away; counted if it was still running."""
        self._ended(stream)
        if self.engine.cancel(stream.request_id):
            self.metrics.requests.labels(stream.label, "cancelled").inc()

    def logprobs(self, entries: list[TokenLogprob]) -> list[dict]:
        """Token log-probabilities for a reply, each as OpenAI's chat shape: {"token",
        "bytes", "logprob", "top_logprobs": [{"token", "bytes", "logprob"}]}."""
        def piece(token_id: int, logprob: float) -> dict:
            raw = self.token_bytes[token_id] if token_id < len(self.token_bytes) else b""
            return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw),
                    "logprob": logprob}

        return [{**piece(e.token_id, e.logprob),
                 "top_logprobs": [piece(token_id, logprob) for token_id, logprob in e.top]}
                for e in entries]

    def _submit(self, caller: Caller, prompt, choices: list, adapter: AdapterKey | None,
                kind: str, priority: int = 0) -> list[TrackedStream]:
        """Submit one request per choice (`choices`: each one's SamplingParams), within the
        caller's key's share (KeyQuotas: 429 past it; a choice counts as a request). The
        choices after the first follow it: the engine computes their prompt once. If one
        cannot be submitted, those already submitted are cancelled."""
        request_id = f"{kind}-{uuid.uuid4().hex}"
        streams = []
        try:
            for i, params in enumerate(choices):
                streams.append(self._submit_one(caller, prompt, params, adapter,
                                                f"{request_id}-{i}" if i else request_id,
                                                request_id if i else None, priority))
        except BaseException:
            for stream in streams:
                self.cancel(stream)
            raise
        return streams

    def _submit_one(self, caller: Caller, prompt, params, adapter: AdapterKey | None,
                    request_id: str, after: str | None, priority: int) -> TrackedStream:
        self.quotas.admit(caller)
        try:
            stream = self.engine.submit(prompt, params, adapter, request_id, after=after,
                                        priority=priority, history=(caller.tenant, adapter))
        except BaseException as e:
            self.quotas.release(caller, tokens=0)
            if isinstance(e, LoragError) and e.field == "adapter":  # the engine's parameter:
                e.field = "adapters" if isinstance(adapter, Composition) else "model"  # ours
            raise
        tracked = TrackedStream(stream, self.metrics, metric_label(adapter), on_end=self._ended)
        with self.idle:
            self.in_flight[tracked.request_id] = tracked
            self.callers[tracked.request_id] = caller
        return tracked

    def _ended(self, stream: TrackedStream) -> None:
        """A request left: its key's share back (once, however it ended)."""
        with self.idle:
            caller = self.callers.pop(stream.request_id, None)
            if self.in_flight.pop(stream.request_id, None) is not None and not self.in_flight:
                self.idle.notify_all()
        if caller is not None:
            self.quotas.release(caller, stream.tokens)

    def ground(self, caller: Caller, messages: list[dict], rag: Rag,
               max_tokens: int | None) -> tuple[list[int], Grounding]:
        """Retrieve for the last user message (reranked when `rag` or the namespace says
        so) and render the chat with as many passages as fit in the context next to the
        answer (`max_tokens`, else RAG_ANSWER_TOKENS): the prompt a `rag` chat runs on,
        and the one RAFT's training chats reproduce."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise InvalidRequest("rag needs a user message to search with", field="messages")
        found = self._retrieve(caller, rag, question)
        budget = self.engine.limits.max_model_len - (max_tokens or RAG_ANSWER_TOKENS)
        result = render_grounded(self.engine.tokenizer, messages, found.hits, budget)
        sources = [Source(h.document_id, h.chunk_id, h.score, h.metadata, h.text)
                   for h in result.used]
        return result.prompt_ids, Grounding(rag.namespace, sources, len(found.hits),
                                            result.dropped, found.reranker, found.search_ms,
                                            found.rerank_ms)

    def _retrieve(self, caller: Caller, rag: Rag, question: str) -> "_Retrieved":
        """`rag`'s passages for `question`, best first: the search's `top_k`, or with a
        reranker the `top_k` best of RERANK_CANDIDATES by the search's order fused with
        the reranker's (retrieval/rerank.py `fused`); and each stage's time."""
        reranker = self._reranker(caller, rag)
        started = time.perf_counter()
        depth = max(rag.top_k, RERANK_CANDIDATES) if reranker else rag.top_k
        hits = self.namespaces.search(caller, rag.namespace, question, depth, rag.mode,
                                      rag.filter)
        search_ms, rerank_ms = _ms(time.perf_counter() - started), None
        if reranker and hits:
            scored = self._score(caller, reranker, question, [hit.text for hit in hits])
            hits = [hits[i] for i in fused(scored.scores)[:rag.top_k]]
            rerank_ms = _ms(scored.seconds)
        return _Retrieved(hits, reranker, search_ms, rerank_ms)

    def _reranker(self, caller: Caller, rag: Rag) -> str | None:
        """The reranker a `rag` chat reranks with (a relevance adapter, or the embedder's
        name for late interaction): the request's, else its namespace's default; None
        when it does not rerank."""
        if rag.rerank is False:
            return None
        if rag.rerank_model is not None:
            return rag.rerank_model
        model = self.namespaces.reranker(caller, rag.namespace)
        if model is None and rag.rerank:
            raise InvalidRequest(f"rag.rerank needs a reranker: namespace "
                                 f"{rag.namespace!r} has no default one; name one in "
                                 f"rag.rerank_model ({self.embeddings.model!r}, late "
                                 "interaction on the embedder, or an adapter trained by "
                                 "`lorag train --task rerank`)", field="rag.rerank_model")
        if model is not None and not self._late_interaction(model):
            try:
                self.adapters.named(caller, model, "rag.rerank")
            except NotFound:
                raise InvalidRequest(
                    f"namespace {rag.namespace!r} reranks with adapter {model!r} by default, "
                    "which is not one you can use; send rag.rerank: false, or name your own "
                    "in rag.rerank_model", field="rag.rerank") from None
        return model

    def rerank(self, caller: Caller, request: RerankRequest) -> Reranked:
        """Score `request.documents` against its query on `model`: a relevance adapter,
        or the embedder's name."""
        return self._score(caller, request.model, request.query, request.documents, "model")

    def _late_interaction(self, model: str) -> bool:
        """Whether `model` names the embedder: reranking by late interaction on it."""
        return model == self.embeddings.model

    def _score(self, caller: Caller, model: str, query: str, documents: list[str],
               field: str = "rag.rerank_model") -> Reranked:
        """Relevance scores on `model` (a relevance adapter, or the embedder's name),
        within the caller's key's share: the documents are scored at once, counted as one
        request of the key."""
        late = self._late_interaction(model)
        adapter = None if late else self.adapters.named(caller, model, field)  # None: base
        self.quotas.admit(caller)
        tokens = 0
        try:
            if late:
                scored = self.reranker.by_sentences(query, documents)
                tokens = scored.prompt_tokens
            else:
                scored = self.reranker.score(query, documents, adapter)
                tokens = scored.prompt_tokens + len(documents)
            return scored
        finally:
            self.quotas.release(caller, tokens)

    def set_namespace(self, caller: Caller, name: str, shared: bool,
                      reranker: str | None) -> bool:
        """Create one of the caller's namespaces or change its settings; a default
        reranker must be an adapter the caller can use, or the embedder's name."""
        if reranker is not None and not self._late_interaction(reranker):
            self.adapters.named(caller, reranker, "reranker")
        return self.namespaces.create(caller, name, shared, reranker)

    def _render(self, messages: list[dict]) -> list[int]:
        """Chat messages -> prompt token ids, with the base model's chat template; control
        tokens come from the template alone (server/chat_template.py)."""
        return render_chat(self.engine.tokenizer, messages)

    # ---- state ----

    def follow_state(self, interval: float) -> None:
        """Apply the changes other replicas commit (adapters, documents) as they are
        notified, and poll every `interval` seconds."""
        def on_change(topic: str | None, name: str | None) -> None:
            if topic in (None, "adapters"):
                self.adapters.sync()
            if topic in (None, "documents"):
                self.namespaces.store.refresh(name)

        self.follower = self.store.db.follow(on_change, interval)

    def info(self, caller: Caller) -> dict:
        """What a client needs to build a request form: the model, the value each sampling
        field takes when a request leaves it out, the limits, and the caller's rights."""
        limits = self.engine.limits
        return {"model": self.model_name, "engine": self.engine.describe(),
                "embedding_model": self.embeddings.model,
                "max_model_len": limits.max_model_len,
                # max_tokens left out: a chat may use the rest of the context
                "defaults": {**SAMPLING_DEFAULTS, "max_tokens": None, "seed": None},
                "structured_outputs": ["json_schema", "json_object", "regex", "grammar"],
                "max_composition": MAX_COMPOSITION,
                "rag": {"top_k": Rag.top_k, "max_top_k": RAG_MAX_TOP_K, "mode": Rag.mode,
                        "modes": list(MODES), "rerank_candidates": RERANK_CANDIDATES,
                        # how a grounded answer declines, so a client can show it as such
                        "abstain": {"answer": ABSTAIN, "source": NO_SOURCE,
                                    "phrases": list(ABSTENTIONS)}},
                "ingest_file_types": sorted(SUFFIXES),
                "request_limits": asdict(self.limits),
                "caller": {"tenant": caller.tenant, "admin": caller.admin}}

    def health(self) -> dict:
        """Liveness: whether the engine's loop runs, and its queue (counters only).
        Readiness is the same and not draining (`ready`)."""
        occupancy = self.engine.occupancy()
        return {"status": "ok" if self.engine.alive else "engine stopped",
                "model": self.model_name, "running": occupancy["running"],
                "waiting": occupancy["waiting"], "draining": self.draining}

    def drain(self, timeout: float) -> int:
        """Stop taking requests (readiness fails, new requests get Unavailable), let the
        ones in flight finish for up to `timeout` seconds, then end the rest with an
        Unavailable error as their last output. Returns how many were cut short."""
        self.draining = True
        for hook in self.on_drain:
            hook()
        deadline = time.monotonic() + timeout
        with self.idle:
            # done when every stream was read to its end, or the engine has nothing left
            # to run (a stream whose client never read it would otherwise count forever)
            while self.in_flight and not self._engine_idle() \
                    and (wait := deadline - time.monotonic()) > 0:
                self.idle.wait(min(wait, 0.1))
            left = [] if self._engine_idle() else list(self.in_flight.values())
        error = Unavailable(f"this replica shut down before the request finished (it "
                            f"waited --shutdown-timeout {timeout:g} s); retry it")
        for stream in left:
            stream.fail(error)  # read as the stream's end: counted as an "error" finish
            self.engine.cancel(stream.request_id)
        return len(left)

    def _engine_idle(self) -> bool:
        occupancy = self.engine.occupancy()
        return occupancy["running"] == occupancy["waiting"] == 0

    def engine_state(self) -> dict:
        """What the metrics read from the engine."""
        return {**self.engine.occupancy(), "model": self.model_name,
                "max_lora": self.engine.limits.max_active_adapters,
                "adapters": self.engine.list_adapters(),
                "engine_families": self.engine.metric_families()}

    def close(self) -> None:
        """Stop the engine (running requests end as cancelled), save the derived indexes
        and close the state database."""
        if self.follower is not None:
            self.follower.stop()
        self.engine.shutdown()
        self.namespaces.store.close()
        self.store.db.close()

