"""What the transports call: the engine behind tenants, durable state and metrics.

Both HTTP and gRPC authenticate a caller, then call one method here; nothing here knows
about either wire format. Tenancy is a naming rule: tenant T's adapter N is the engine's
adapter "T/N"; a caller resolves names among its own adapters and the shared ones, so
another tenant's adapter is simply not found (no existence leak). Retrieval namespaces
follow the same rules (server/namespaces.py); `rag_messages` grounds a chat in one.
"""

import re
import threading
import time

from lorag.retrieval.rag import augment
from lorag.retrieval.store import DocumentStore
from lorag.server.auth import ApiKeys, Caller
from lorag.server.engine import Engine, SamplingParams
from lorag.server.metrics import Metrics, TrackedStream
from lorag.server.namespaces import Namespaces
from lorag.server.state import AdapterRecord, StateStore

from lorag.errors import AdapterNotFound, InvalidRequest, PermissionDenied

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
RAG_ANSWER_TOKENS = 256  # room kept for the answer when a RAG request gives no max_tokens


class Service:
    """Tenant-scoped generation and adapter management over one engine."""

    def __init__(self, engine: Engine, store: StateStore, keys: ApiKeys, model_name: str,
                 documents: DocumentStore):
        self.engine = engine
        self.namespaces = Namespaces(documents)
        self.store = store
        self.keys = keys
        self.model_name = model_name
        self.metrics = Metrics(self.engine_state)
        self.records: dict[str, AdapterRecord] = {}  # engine key -> record
        self.lock = threading.Lock()  # orders loads/unloads with their records
        for record in store.adapters():  # a restart: known again, read on first use
            engine.load_adapter(record.key, record.path, lazy=True)
            self.records[record.key] = record
        for caller in keys.keys.values():
            store.ensure_tenant(caller.tenant)

    # ---- generation ----

    def generate(self, caller: Caller, prompt: str | list[int], params: SamplingParams,
                 model: str, adapters: list[tuple[str, float]] | None = None,
                 request_id: str | None = None) -> TrackedStream:
        """Submit a request on `model` (the base model's name or an adapter's), or on a
        weighted composition of the caller's adapters. Returns a stream to read."""
        adapter = None if model == self.model_name else self._key(caller, model, "model")
        parts = None
        if adapters:
            if adapter is not None:
                raise InvalidRequest("give either an adapter as `model` or `adapters`, not "
                                     "both; with `adapters`, set `model` to the base model "
                                     f"{self.model_name!r}", field="adapters")
            parts = [(self._key(caller, name, "adapters"), weight) for name, weight in adapters]
        stream = self.engine.submit(prompt, params, adapter=adapter, adapters=parts,
                                    request_id=request_id)
        return TrackedStream(stream, self.metrics, adapter or ("+".join(k for k, _ in parts)
                                                               if parts else None))

    def cancel(self, stream: TrackedStream) -> None:
        """Stop a request whose client went away; counted if it was still running."""
        if self.engine.cancel(stream.request_id):
            self.metrics.requests.labels(stream.label, "cancelled").inc()

    def template(self, messages: list[dict]) -> list[int]:
        """Chat messages -> prompt token ids, with the base model's chat template."""
        tokenizer = self.engine.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def rag_messages(self, caller: Caller, messages: list[dict], namespace: str, top_k: int,
                     mode: str, filters: dict | None, max_tokens: int | None) -> dict:
        """Retrieve for the last user message and put the passages into the chat, as many
        as fit in the context next to `max_tokens` of answer (256 when not given).
        Returns {"messages", "sources", "retrieved", "dropped"}."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise InvalidRequest("rag needs a user message to search with", field="messages")
        hits = self.namespaces.search(caller, namespace, question, top_k, mode, filters)
        budget = self.engine.config.max_model_len - (max_tokens or RAG_ANSWER_TOKENS)
        result = augment(messages, hits, lambda m: len(self.template(m)), budget)
        return {"messages": result.messages, "retrieved": len(hits), "dropped": result.dropped,
                "sources": [{"document_id": h.document_id, "chunk_id": h.chunk_id,
                             "score": h.score, "metadata": h.metadata} for h in result.used]}

    # ---- adapters ----

    def load_adapter(self, caller: Caller, name: str, path: str, shared: bool = False) -> bool:
        """Register `path` as the caller tenant's adapter `name`; True if newly loaded."""
        self._require_admin(caller, "load adapters")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"adapter name {name!r} must be 1-128 characters of letters, "
                                 "digits and . _ : - starting with a letter or digit",
                                 field="lora_name")
        if name == self.model_name:
            raise InvalidRequest(f"{name!r} is the base model's name", field="lora_name")
        record = AdapterRecord(caller.tenant, name, str(path), bool(shared))
        with self.lock:
            if shared:
                self._check_shared_name(record)
            start = time.perf_counter()
            loaded = self.engine.load_adapter(record.key, str(path))  # reads + validates
            self.metrics.adapter_load.observe(time.perf_counter() - start)
            # the row is written only after validation: a crash before this line leaves
            # no trace; after it, a complete record
            self.store.put_adapter(record)
            self.records[record.key] = record
        return loaded

    def unload_adapter(self, caller: Caller, name: str) -> None:
        """Forget the caller tenant's adapter `name` (running requests finish)."""
        self._require_admin(caller, "unload adapters")
        key = f"{caller.tenant}/{name}"
        with self.lock:
            if key not in self.records:
                raise AdapterNotFound(f"adapter {name!r} is not loaded", field="lora_name")
            self.store.delete_adapter(caller.tenant, name)
            del self.records[key]
            self.engine.unload_adapter(key)

    def pin_adapter(self, caller: Caller, name: str, pinned: bool) -> None:
        """Keep one of the caller's adapters in a compute slot, or let it go again."""
        self._require_admin(caller, "pin adapters")
        key = self._key(caller, name, "name")
        if pinned:
            self.engine.pin_adapter(key)
        else:
            self.engine.unpin_adapter(key)

    def list_adapters(self, caller: Caller) -> list[dict]:
        """The adapters the caller can use, with their status in the engine."""
        rows = {row["name"]: row for row in self.engine.list_adapters()}
        out = []
        for record in sorted(self._visible(caller), key=lambda r: r.name):
            row = rows.get(record.key, {})
            out.append({"name": record.name, "path": record.path, "shared": record.shared,
                        "owner": record.tenant, "in_ram": row.get("in_ram", False),
                        "active": row.get("slot") is not None,
                        "pinned": row.get("pinned", False),
                        "running_requests": row.get("running_requests", 0)})
        return out

    def get_adapter(self, caller: Caller, name: str) -> dict:
        """One adapter's status, or AdapterNotFound."""
        for row in self.list_adapters(caller):
            if row["name"] == name:
                return row
        raise AdapterNotFound(f"adapter {name!r} is not loaded", field="name")

    # ---- state ----

    def engine_state(self) -> dict:
        """What the metrics and /health read from the engine."""
        stats = self.engine.stats()
        return {"waiting": stats["waiting"], "running": stats["running"],
                "kv_slots_free": stats["kv_slots_free"], "evictions": stats["evictions"],
                "adapters": self.engine.list_adapters()}

    def _visible(self, caller: Caller) -> list[AdapterRecord]:
        return [r for r in self.records.values() if r.tenant == caller.tenant or r.shared]

    def _key(self, caller: Caller, name: str, field: str) -> str:
        # own adapters first, then shared ones; other tenants' are invisible
        own = f"{caller.tenant}/{name}"
        if own in self.records:
            return own
        for record in self.records.values():
            if record.shared and record.name == name:
                return record.key
        raise AdapterNotFound(f"model {name!r} is neither the base model "
                              f"({self.model_name!r}) nor a loaded adapter; list them at "
                              "GET /v1/models", field=field)

    def _check_shared_name(self, record: AdapterRecord) -> None:
        for other in self.records.values():
            if other.shared and other.name == record.name and other.key != record.key:
                raise InvalidRequest(f"a shared adapter named {record.name!r} already exists "
                                     f"(tenant {other.tenant!r}); choose another name",
                                     field="lora_name")

    @staticmethod
    def _require_admin(caller: Caller, what: str) -> None:
        if not caller.admin:
            raise PermissionDenied(f"this API key may not {what}; use an admin key",
                                   field="authorization")
