"""Namespaced document store: the state database is the source of truth, FAISS and BM25
indexes are derived per replica and catch up on changes.

Every chunk's text, metadata and embedding live in the state database (lorag/state:
SQLite for one box, PostgreSQL for a fleet). A namespace's `generation` is its change
sequence: each committed write bumps it once, its new chunks carry it (`seq`), and each
chunk it removed leaves a tombstone at it. Each replica keeps (retrieval/indexes.py), per
namespace it has searched, a FAISS index (`IndexIDMap2` over exact inner product on unit
vectors while small, `IndexIVFFlat` trained on the stored vectors above `ivf_threshold`;
ids = chunk ids; retrieval/faiss_index.py) and the chunk texts for BM25, at some
generation; before a search it reads the namespace's generation (one primary-key lookup)
and, if behind, applies the chunks added and removed since (not a rebuild). So a search
never returns a chunk whose delete has committed, whichever replica wrote it. A replica
behind the namespace's tombstone floor, or one that sees another incarnation of the name,
rebuilds from the stored vectors.

The indexes are saved under the cache folder, stamped with the namespace's incarnation
and generation, when the store closes and after a rebuild; a restart (or a crash) loads
the snapshot and catches up from its generation. BM25 (retrieval/lexical.py) is rebuilt
from the texts in memory when a search needs it after a change, and fused with the
vector ranking by reciprocal rank for hybrid search. A namespace is an opaque name here:
who owns it is the caller's business.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    delete,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB

from lorag.errors import InvalidRequest
from lorag.names import MAX_KEY_LENGTH, check_name
from lorag.retrieval import MAX_TOP_K, MODES, SEARCH_MODE, TOP_K
from lorag.retrieval.embedder import Embedder
from lorag.retrieval.indexes import ReplicaIndexes
from lorag.retrieval.lexical import fuse
from lorag.state import Database
from lorag.state.schema import chunks, documents, namespaces, removed_chunks

KEPT_GENERATIONS = 16  # tombstones of the last 16 writes outlive a prune
TOMBSTONES_BEFORE_PRUNE = 10_000  # ... and are pruned once above this and the live chunks


@dataclass
class Hit:
    """One search result, shaped as `lorag search --json` prints it."""

    document_id: str
    chunk_id: int
    score: float
    text: str
    metadata: dict


class Prepared(NamedTuple):
    """A document checked, with its content's hash."""

    id: str
    text: str
    metadata: dict
    digest: str


class DocumentStore:
    """Documents in namespaces: upsert, delete, search. Thread-safe."""

    def __init__(self, db: Database, cache_dir: Path, embedder: Embedder,
                 chunk_tokens: int = 200, overlap: int = 40, ivf_threshold: int = 50_000,
                 nprobe: int = 16):
        """db: the state database; cache_dir: where this replica keeps its index snapshots;
        chunk_tokens, overlap: chunk size and the overlap of consecutive chunks, in the
        embedder's tokens (capped at its input length), for documents written from now on;
        ivf_threshold: chunks in a namespace above which its index becomes IVF (trained on
        the stored vectors) instead of exact flat search; nprobe: IVF lists searched."""
        if not 0 <= overlap < chunk_tokens:
            raise InvalidRequest(f"chunk overlap must be in [0, chunk tokens), got overlap="
                                 f"{overlap} chunk tokens={chunk_tokens}", field="chunk_overlap")
        self.db = db
        self.embedder = embedder
        self.chunk_tokens, self.overlap = chunk_tokens, overlap
        self.indexes = ReplicaIndexes(db, Path(cache_dir) / "faiss", embedder, ivf_threshold,
                                      nprobe)

    # ---- writes ----

    def upsert(self, namespace: str, document_id: str, text: str,
               metadata: dict | None = None) -> str:
        """Add or replace one document; returns "added", "updated" or "unchanged"."""
        return self.put_documents(namespace, [_Doc(document_id, text, metadata)])[0]

    def put_documents(self, namespace: str, batch: list) -> list[str]:
        """Add or replace documents (anything with .id, .text, .metadata) in one
        transaction; "added", "updated" or "unchanged" for each. Every document is checked
        before anything is written, and the chunks of all changed ones are embedded in one
        batch, before the transaction."""
        check_name(namespace, "namespace", "namespace", MAX_KEY_LENGTH)
        prepared = [_prepare(d.id, d.text, d.metadata) for d in batch]
        ids = [p.id for p in prepared]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise InvalidRequest(f"document id {twice!r} appears twice in one batch",
                                 field="id")
        with self.db.read() as connection:
            known = dict(connection.execute(
                select(documents.c.id, documents.c.sha256).where(
                    documents.c.namespace == namespace, documents.c.id.in_(ids))).all())
        outcomes = ["unchanged" if known.get(p.id) == p.digest else
                    "updated" if p.id in known else "added" for p in prepared]
        changed = [p for p, outcome in zip(prepared, outcomes, strict=True)
                   if outcome != "unchanged"]
        if not changed:
            return outcomes
        rows = self._chunk_rows(namespace, changed)
        with self.db.write() as connection:
            self._ensure(connection, namespace)
            generation = self._bump(connection, namespace)  # locks the namespace's row
            old = self._remove_documents(connection, namespace, [c.id for c in changed],
                                         generation)
            connection.execute(insert(documents), [
                {"namespace": namespace, "id": c.id, "sha256": c.digest, "metadata": c.metadata}
                for c in changed])
            connection.execute(insert(chunks), [{**row, "seq": generation} for row in rows])
            if old:
                self._prune(connection, namespace, generation)
            self.db.notify(connection, "documents", namespace)
        self.indexes.catch_up(namespace)
        return outcomes

    def delete(self, namespace: str, document_id: str) -> bool:
        """Remove a document and its chunks; says whether it existed."""
        with self.db.write() as connection:
            exists = connection.execute(select(documents.c.id).where(
                documents.c.namespace == namespace, documents.c.id == document_id)).first()
            if exists is None:
                return False
            generation = self._bump(connection, namespace)
            self._remove_documents(connection, namespace, [document_id], generation)
            self._prune(connection, namespace, generation)
            self.db.notify(connection, "documents", namespace)
        self.indexes.catch_up(namespace)
        return True

    def drop_namespace(self, namespace: str) -> bool:
        """Delete a namespace with all its documents; says whether it existed."""
        with self.db.write() as connection:
            gone = connection.execute(
                delete(namespaces).where(namespaces.c.name == namespace)).rowcount
            self.db.notify(connection, "documents", namespace)
        with self.indexes.lock:
            self.indexes.forget(namespace)
        return gone > 0

    # ---- reads ----

    def search(self, namespace: str, query: str, k: int = TOP_K,
               filters: dict | None = None, mode: str = SEARCH_MODE) -> list[Hit]:
        """The k best chunks for `query`: "vector" (FAISS), "bm25", or "hybrid" (both,
        fused by reciprocal rank). `filters` ({key: value or [values]}) restrict the
        candidates inside each search, before ranking."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequest("query is empty", field="query")
        if not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise InvalidRequest(f"k must be an integer in 1..{MAX_TOP_K}, got {k!r}",
                                 field="top_k")
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}, got {mode!r}",
                                 field="mode")
        allowed = set(self._filtered_ids(namespace, filters)) if filters else None
        if allowed is not None and not allowed:
            return []
        with self.indexes.lock:
            held = self.indexes.catch_up(namespace)
            if held is None:
                return []
            depth = max(4 * k, 20) if mode == "hybrid" else k  # fusion needs candidates
            rankings = []
            if mode in ("vector", "hybrid"):
                rankings.append(self.indexes.vector_search(held, query, depth, allowed))
            if mode in ("bm25", "hybrid"):
                rankings.append(held.bm25().search(query, depth, allowed))
        if mode == "hybrid":
            scored = fuse([[chunk_id for chunk_id, _ in r] for r in rankings], k)
        else:
            scored = rankings[0][:k]
        return self._hits(scored)

    def namespaces(self) -> list[str]:
        """Namespace names, sorted."""
        with self.db.read() as connection:
            return list(connection.scalars(select(namespaces.c.name).order_by(
                namespaces.c.name)))

    def exists(self, namespace: str) -> bool:
        """Whether the namespace exists (one indexed lookup, not a listing)."""
        with self.db.read() as connection:
            return connection.execute(select(namespaces.c.name).where(
                namespaces.c.name == namespace)).first() is not None

    def shared(self) -> list[str]:
        """Names of the namespaces marked shared, sorted."""
        with self.db.read() as connection:
            return list(connection.scalars(select(namespaces.c.name).where(
                namespaces.c.shared).order_by(namespaces.c.name)))

    def create(self, namespace: str, shared: bool = False, reranker: str | None = None) -> bool:
        """Create an empty namespace, or set an existing one's settings: whether it is
        shared, and the adapter its RAG chats rerank with by default (None: none); True if
        new."""
        check_name(namespace, "namespace", "namespace", MAX_KEY_LENGTH)
        with self.db.write() as connection:
            new = self._ensure(connection, namespace)
            connection.execute(update(namespaces).where(namespaces.c.name == namespace)
                               .values(shared=bool(shared), reranker=reranker))
            return new

    def reranker(self, namespace: str) -> str | None:
        """The adapter the namespace's RAG chats rerank with by default, if it has one."""
        with self.db.read() as connection:
            return connection.scalar(select(namespaces.c.reranker).where(
                namespaces.c.name == namespace))

    def overview(self) -> list[dict]:
        """Every namespace: its name, whether it is shared, its default reranker, and its
        document and chunk counts; sorted by name."""
        document_count = select(func.count()).where(
            documents.c.namespace == namespaces.c.name).scalar_subquery()
        chunk_count = select(func.count()).where(
            chunks.c.namespace == namespaces.c.name).scalar_subquery()
        with self.db.read() as connection:
            rows = connection.execute(select(
                namespaces.c.name, namespaces.c.shared, namespaces.c.reranker, document_count,
                chunk_count).order_by(namespaces.c.name)).all()
        return [{"namespace": name, "shared": bool(shared), "reranker": reranker,
                 "documents": n_documents, "chunks": n_chunks}
                for name, shared, reranker, n_documents, n_chunks in rows]

    def counts(self, namespace: str) -> tuple[int, int]:
        """(documents, chunks) in a namespace."""
        with self.db.read() as connection:
            n_documents = connection.scalar(select(func.count()).where(
                documents.c.namespace == namespace))
            n_chunks = connection.scalar(select(func.count()).where(
                chunks.c.namespace == namespace))
        return n_documents, n_chunks

    def documents(self, namespace: str) -> list[str]:
        """Document ids in a namespace, sorted."""
        with self.db.read() as connection:
            return list(connection.scalars(select(documents.c.id).where(
                documents.c.namespace == namespace).order_by(documents.c.id)))

    def generation(self, namespace: str) -> int | None:
        """The generation this replica's indexes of `namespace` are at (None: not held)."""
        return self.indexes.generation(namespace)

    def refresh(self, namespace: str | None = None) -> None:
        """Catch up `namespace` if this replica holds it, or every namespace it holds
        (None): what a change notification or a poll calls, so that searches find the
        indexes current instead of catching up themselves."""
        self.indexes.refresh(namespace)

    def close(self) -> None:
        """Save the indexes that changed since their last snapshot (the state database
        belongs to the caller)."""
        self.indexes.save()

    # ---- internals ----

    def _matches(self, key: str, value) -> ColumnElement:
        """A chunk's metadata[key] equals `value`, JSON types respected."""
        if not isinstance(value, str | int | float | bool):
            raise InvalidRequest(f"filter {key!r}: values must be strings, numbers or "
                                 f"booleans, got {value!r}", field="filter")
        if self.db.dialect == "postgresql":
            return type_coerce(chunks.c.metadata, JSONB()).contains({key: value})  # @>
        return func.json_extract(chunks.c.metadata, f'$."{key}"') == value

    def _chunk_rows(self, namespace: str, prepared: list[Prepared]) -> list[dict]:
        """The chunk rows of prepared documents, embedded in one batch."""
        limit = min(self.chunk_tokens, self.embedder.max_tokens)
        pieces = [(document_id, metadata, chunk)
                  for document_id, text, metadata, _ in prepared
                  for chunk in self.embedder.chunks(text, limit, self.overlap)]
        vectors = self.embedder.encode([chunk.text for *_, chunk in pieces])
        return [{"namespace": namespace, "document_id": document_id,
                 "position": chunk.position, "text": chunk.text,
                 "metadata": {**metadata, **chunk.metadata}, "embedding": vector.tobytes()}
                for (document_id, metadata, chunk), vector in zip(pieces, vectors,
                                                                   strict=True)]

    def _ensure(self, connection: Connection, namespace: str) -> bool:
        """Create the namespace's row if missing; whether it was created."""
        return connection.execute(self.db.insert_ignore(namespaces).values(
            name=namespace, generation=0, shared=False, incarnation=uuid.uuid4().hex,
            floor=0)).rowcount > 0

    @staticmethod
    def _bump(connection: Connection, namespace: str) -> int:
        """The namespace's next generation. On PostgreSQL the UPDATE holds the row's lock
        until commit: writers to one namespace take turns, so generations commit in order."""
        return connection.execute(update(namespaces).where(namespaces.c.name == namespace)
                                  .values(generation=namespaces.c.generation + 1)
                                  .returning(namespaces.c.generation)).scalar_one()

    @staticmethod
    def _remove_documents(connection: Connection, namespace: str, ids: list[str],
                          generation: int) -> list[int]:
        """Delete documents (their chunks cascade) and tombstone the chunks at
        `generation`; the removed chunk ids."""
        old = list(connection.scalars(select(chunks.c.id).where(
            chunks.c.namespace == namespace, chunks.c.document_id.in_(ids))))
        connection.execute(delete(documents).where(documents.c.namespace == namespace,
                                                   documents.c.id.in_(ids)))
        if old:
            connection.execute(insert(removed_chunks), [
                {"namespace": namespace, "chunk_id": chunk_id, "seq": generation}
                for chunk_id in old])
        return old

    @staticmethod
    def _prune(connection: Connection, namespace: str, generation: int) -> None:
        """Drop old tombstones once they outnumber the live chunks (and a floor): a
        replica more than KEPT_GENERATIONS writes behind then rebuilds, which reads no
        more than catching up would."""
        tombstones = connection.scalar(select(func.count()).where(
            removed_chunks.c.namespace == namespace))
        live = connection.scalar(select(func.count()).where(chunks.c.namespace == namespace))
        if tombstones <= max(live, TOMBSTONES_BEFORE_PRUNE):
            return
        floor = generation - KEPT_GENERATIONS
        connection.execute(delete(removed_chunks).where(
            removed_chunks.c.namespace == namespace, removed_chunks.c.seq <= floor))
        connection.execute(update(namespaces).where(namespaces.c.name == namespace)
                           .values(floor=floor))

    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits in `scored`'s order; a chunk deleted since the indexes caught up is left
        out (the database is the truth)."""
        if not scored:
            return []
        with self.db.read() as connection:
            rows = {row.id: row for row in connection.execute(
                select(chunks.c.id, chunks.c.document_id, chunks.c.text, chunks.c.metadata)
                .where(chunks.c.id.in_([chunk_id for chunk_id, _ in scored])))}
        return [Hit(rows[chunk_id].document_id, chunk_id, score, rows[chunk_id].text,
                    rows[chunk_id].metadata)
                for chunk_id, score in scored if chunk_id in rows]

    def _filtered_ids(self, namespace: str, filters: dict) -> list[int]:
        """Chunk ids whose metadata matches every filter (a value, or any of a list)."""
        clauses = [chunks.c.namespace == namespace]
        for key, wanted in filters.items():
            if not isinstance(key, str) or not key.replace("_", "").isalnum():
                raise InvalidRequest(f"filter key {key!r} must be letters, digits or _",
                                     field="filter")
            options = wanted if isinstance(wanted, list) else [wanted]
            clauses.append(or_(*(self._matches(key, value) for value in options)))
        with self.db.read() as connection:
            return list(connection.scalars(select(chunks.c.id).where(*clauses)))


@dataclass
class _Doc:
    id: str
    text: str
    metadata: dict | None


def _prepare(document_id, text, metadata) -> Prepared:
    """A document checked, or InvalidRequest naming what is wrong."""
    if not isinstance(document_id, str) or not document_id:
        raise InvalidRequest("document id must be a non-empty string", field="id")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"document {document_id!r} has no text", field="text")
    metadata = metadata or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"document {document_id!r}: metadata must be a JSON object",
                             field="metadata")
    digest = hashlib.sha256(json.dumps([text, metadata], sort_keys=True).encode()).hexdigest()
    return Prepared(document_id, text, metadata, digest)
