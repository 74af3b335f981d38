"""Namespaced document store: the state database is the source of truth, FAISS and BM25
indexes are derived per replica and catch up on changes.

Every chunk's text, metadata and embedding live in the state database (lorag/state:
SQLite for one box, PostgreSQL for a fleet). A namespace's `generation` is its change
sequence: each committed write bumps it once, its new chunks carry it (`seq`), and each
chunk it removed leaves a tombstone at it. Each replica keeps, per namespace it has
searched, a FAISS index (`IndexIDMap2` over exact inner product on unit vectors while
small, `IndexIVFFlat` trained on the stored vectors above `ivf_threshold`; ids = chunk ids)
and the chunk texts for BM25, at some generation; before a search it reads the
namespace's generation (one primary-key lookup) and, if behind, applies the chunks added
and removed since (not a rebuild). So a search never returns a chunk whose delete has
committed, whichever replica wrote it. A replica behind the namespace's tombstone floor,
or one that sees another incarnation of the name, rebuilds from the stored vectors.

The indexes are saved under the cache folder, stamped with the namespace's incarnation
and generation, when the store closes and after a rebuild; a restart (or a crash) loads
the snapshot and catches up from its generation. BM25 (retrieval/lexical.py) is rebuilt
from the texts in memory when a search needs it after a change, and fused with the
vector ranking by reciprocal rank for hybrid search. A namespace is an opaque name here:
who owns it is the caller's business.
"""

import hashlib
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
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
from lorag.retrieval.chunking import chunk_text
from lorag.retrieval.embedder import Embedder
from lorag.retrieval.lexical import LexicalIndex, fuse
from lorag.state import Database
from lorag.state.schema import chunks, documents, namespaces, removed_chunks

log = logging.getLogger("lorag.retrieval")

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


@dataclass
class _Derived:
    """One namespace's indexes on this replica, exactly at `generation`."""

    incarnation: str
    generation: int
    index: faiss.Index
    texts: dict[int, str]  # chunk id -> text, for BM25
    lexical: LexicalIndex | None = None  # built from texts on demand; None: stale
    saved: bool = field(default=False)  # the snapshot on disk is at this generation


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
        self.folder = Path(cache_dir) / "faiss"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.chunk_tokens, self.overlap = chunk_tokens, overlap
        self.ivf_threshold, self.nprobe = ivf_threshold, nprobe
        self.derived: dict[str, _Derived] = {}
        self.lock = threading.RLock()

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
        ids = [p[0] for p in prepared]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise InvalidRequest(f"document id {twice!r} appears twice in one batch",
                                 field="id")
        with self.db.read() as connection:
            known = dict(connection.execute(
                select(documents.c.id, documents.c.sha256).where(
                    documents.c.namespace == namespace, documents.c.id.in_(ids))).all())
        outcomes = ["unchanged" if known.get(document_id) == digest else
                    "updated" if document_id in known else "added"
                    for document_id, *_, digest in prepared]
        changed = [p for p, outcome in zip(prepared, outcomes, strict=True)
                   if outcome != "unchanged"]
        if not changed:
            return outcomes
        rows = self._chunk_rows(namespace, changed)
        with self.db.write() as connection:
            self._ensure(connection, namespace)
            generation = self._bump(connection, namespace)  # locks the namespace's row
            old = self._remove_documents(connection, namespace, [c[0] for c in changed],
                                         generation)
            connection.execute(insert(documents), [
                {"namespace": namespace, "id": document_id, "sha256": digest,
                 "metadata": metadata} for document_id, _, metadata, digest in changed])
            connection.execute(insert(chunks), [{**row, "seq": generation} for row in rows])
            if old:
                self._prune(connection, namespace, generation)
            self.db.notify(connection, "documents", namespace)
        self._catch_up(namespace)
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
        self._catch_up(namespace)
        return True

    def drop_namespace(self, namespace: str) -> bool:
        """Delete a namespace with all its documents; says whether it existed."""
        with self.db.write() as connection:
            gone = connection.execute(
                delete(namespaces).where(namespaces.c.name == namespace)).rowcount
            self.db.notify(connection, "documents", namespace)
        with self.lock:
            self._forget(namespace)
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
        with self.lock:
            derived = self._catch_up(namespace)
            if derived is None:
                return []
            depth = max(4 * k, 20) if mode == "hybrid" else k  # fusion needs candidates
            rankings = []
            if mode in ("vector", "hybrid"):
                rankings.append(self._vector_search(derived, query, depth, allowed))
            if mode in ("bm25", "hybrid"):
                if derived.lexical is None:
                    derived.lexical = LexicalIndex(sorted(derived.texts.items()))
                rankings.append(derived.lexical.search(query, depth, allowed))
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

    def create(self, namespace: str, shared: bool = False) -> bool:
        """Create an empty namespace, or set whether an existing one is shared; True if new."""
        check_name(namespace, "namespace", "namespace", MAX_KEY_LENGTH)
        with self.db.write() as connection:
            new = self._ensure(connection, namespace)
            connection.execute(update(namespaces).where(namespaces.c.name == namespace)
                               .values(shared=bool(shared)))
            return new

    def overview(self) -> list[dict]:
        """Every namespace: its name, whether it is shared, and its document and chunk
        counts; sorted by name."""
        document_count = select(func.count()).where(
            documents.c.namespace == namespaces.c.name).scalar_subquery()
        chunk_count = select(func.count()).where(
            chunks.c.namespace == namespaces.c.name).scalar_subquery()
        with self.db.read() as connection:
            rows = connection.execute(select(
                namespaces.c.name, namespaces.c.shared, document_count, chunk_count)
                .order_by(namespaces.c.name)).all()
        return [{"namespace": name, "shared": bool(shared), "documents": n_documents,
                 "chunks": n_chunks} for name, shared, n_documents, n_chunks in rows]

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
        with self.lock:
            derived = self.derived.get(namespace)
            return None if derived is None else derived.generation

    def refresh(self, namespace: str | None = None) -> None:
        """Catch up `namespace` if this replica holds it, or every namespace it holds
        (None): what a change notification or a poll calls, so that searches find the
        indexes current instead of catching up themselves."""
        with self.lock:
            for held in [namespace] if namespace is not None else list(self.derived):
                if held in self.derived:
                    self._catch_up(held)

    def close(self) -> None:
        """Save the indexes that changed since their last snapshot (the state database
        belongs to the caller)."""
        with self.lock:
            for namespace, derived in self.derived.items():
                if not derived.saved:
                    self._save(namespace, derived)

    # ---- catching up ----

    def _catch_up(self, namespace: str) -> _Derived | None:
        """This replica's indexes of `namespace`, brought to the committed generation:
        incrementally from the changes since the held one, else from the snapshot on
        disk, else rebuilt. None if the namespace does not exist."""
        with self.lock, self.db.read() as connection:
            row = connection.execute(select(
                namespaces.c.incarnation, namespaces.c.generation, namespaces.c.floor)
                .where(namespaces.c.name == namespace)).first()
            if row is None:
                self._forget(namespace)
                return None
            incarnation, generation, floor = row
            derived = self.derived.get(namespace)
            if derived is None or derived.incarnation != incarnation:
                derived = self._load(namespace, connection, incarnation)
            if derived is None or derived.generation < floor:
                derived = self._rebuild(namespace, connection, incarnation, generation)
            elif derived.generation < generation:
                self._apply_changes(namespace, connection, derived, generation)
            self.derived[namespace] = derived
            return derived

    def _apply_changes(self, namespace: str, connection: Connection, derived: _Derived,
                       generation: int) -> None:
        """Apply the writes in (derived.generation, generation] to the derived indexes."""
        since = derived.generation
        gone = list(connection.scalars(select(removed_chunks.c.chunk_id).where(
            removed_chunks.c.namespace == namespace, removed_chunks.c.seq > since,
            removed_chunks.c.seq <= generation)))
        added = connection.execute(select(chunks.c.id, chunks.c.embedding, chunks.c.text)
                                   .where(chunks.c.namespace == namespace,
                                          chunks.c.seq > since, chunks.c.seq <= generation)
                                   ).all()
        if gone:
            derived.index.remove_ids(np.array(gone, dtype=np.int64))
            for chunk_id in gone:
                derived.texts.pop(chunk_id, None)
        if added:
            derived.index.add_with_ids(_vectors(added, self.embedder.dim),
                                       np.array([r[0] for r in added], dtype=np.int64))
            derived.texts.update((r[0], r[2]) for r in added)
        derived.generation, derived.lexical, derived.saved = generation, None, False
        if _is_flat(derived.index) and derived.index.ntotal >= self.ivf_threshold:
            derived.index = self._build(connection, namespace, generation)  # grown: go IVF
            self._save(namespace, derived)  # the training is worth keeping

    def _rebuild(self, namespace: str, connection: Connection, incarnation: str,
                 generation: int) -> _Derived:
        texts = self._texts(connection, namespace, generation)
        derived = _Derived(incarnation, generation,
                           self._build(connection, namespace, generation), texts)
        self._save(namespace, derived)
        return derived

    @staticmethod
    def _texts(connection: Connection, namespace: str, generation: int) -> dict[int, str]:
        """chunk id -> text of the namespace's chunks up to `generation` (for BM25)."""
        return dict(connection.execute(select(chunks.c.id, chunks.c.text).where(
            chunks.c.namespace == namespace, chunks.c.seq <= generation)).all())

    def _build(self, connection: Connection, namespace: str, generation: int) -> faiss.Index:
        """A fresh index over every stored vector of the namespace up to `generation`."""
        rows = connection.execute(select(chunks.c.id, chunks.c.embedding).where(
            chunks.c.namespace == namespace, chunks.c.seq <= generation)).all()
        return build_index(_vectors(rows, self.embedder.dim),
                           np.array([r[0] for r in rows], dtype=np.int64), self.ivf_threshold)

    def _load(self, namespace: str, connection: Connection,
              incarnation: str) -> _Derived | None:
        """The snapshot on disk, if it is of this incarnation (None otherwise)."""
        path, stamp = self._paths(namespace)
        try:
            saved = json.loads(stamp.read_text())
            if saved["incarnation"] != incarnation:
                return None
            index = faiss.read_index(str(path))
        except (OSError, ValueError, KeyError, RuntimeError):
            return None  # missing or unreadable: rebuilt
        generation = saved["generation"]
        texts = self._texts(connection, namespace, generation)
        return _Derived(incarnation, generation, index, texts, saved=True)

    def _save(self, namespace: str, derived: _Derived) -> None:
        """Write the snapshot (temp file + rename, the stamp last). A snapshot is only a
        head start for the next open: one that cannot be written (a full disk) is logged
        and tried again at close, and whatever was committed stays acknowledged."""
        path, stamp = self._paths(namespace)
        stamp.unlink(missing_ok=True)  # no stamp: a half-written pair is never trusted
        for target, write in ((path, lambda p: faiss.write_index(derived.index, str(p))),
                              (stamp, lambda p: p.write_text(json.dumps({
                                  "incarnation": derived.incarnation,
                                  "generation": derived.generation})))):
            temporary = target.with_name(f".{target.name}.tmp")
            try:
                write(temporary)
                os.replace(temporary, target)
            except (OSError, RuntimeError) as e:  # faiss raises RuntimeError on I/O errors
                temporary.unlink(missing_ok=True)
                log.warning("cannot save the index snapshot of namespace %r (%s); it is "
                            "rebuilt from the database when next needed", namespace,
                            str(e).strip().splitlines()[-1])
                return
        derived.saved = True

    def _forget(self, namespace: str) -> None:
        self.derived.pop(namespace, None)
        for path in self._paths(namespace):
            path.unlink(missing_ok=True)

    def _paths(self, namespace: str) -> tuple[Path, Path]:
        return self.folder / f"{namespace}.index", self.folder / f"{namespace}.json"

    # ---- internals ----

    def _matches(self, key: str, value) -> ColumnElement:
        """A chunk's metadata[key] equals `value`, JSON types respected."""
        if not isinstance(value, str | int | float | bool):
            raise InvalidRequest(f"filter {key!r}: values must be strings, numbers or "
                                 f"booleans, got {value!r}", field="filter")
        if self.db.dialect == "postgresql":
            return type_coerce(chunks.c.metadata, JSONB()).contains({key: value})  # @>
        return func.json_extract(chunks.c.metadata, f'$."{key}"') == value

    def _chunk_rows(self, namespace: str, prepared: list[tuple]) -> list[dict]:
        """The chunk rows of prepared documents (id, text, metadata, digest), embedded in
        one batch."""
        limit = min(self.chunk_tokens, self.embedder.max_tokens)
        pieces = [(document_id, metadata, chunk)
                  for document_id, text, metadata, _ in prepared
                  for chunk in chunk_text(text, self.embedder.tokenizer, limit, self.overlap)]
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

    def _vector_search(self, derived: _Derived, query: str, k: int,
                       allowed: set[int] | None) -> list[tuple[int, float]]:
        index = derived.index
        if index.ntotal == 0:
            return []
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.fromiter(allowed, dtype=np.int64))
        scores, ids = search_index(index, self.embedder.encode([query]), min(k, index.ntotal),
                                   self.nprobe, selector)
        return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits in `scored`'s order; a chunk deleted since the indexes caught up is left
        out (the database is the truth)."""
        if not scored:
            return []
        with self.db.read() as connection:
            rows = {row[0]: row[1:] for row in connection.execute(
                select(chunks.c.id, chunks.c.document_id, chunks.c.text, chunks.c.metadata)
                .where(chunks.c.id.in_([chunk_id for chunk_id, _ in scored])))}
        return [Hit(rows[chunk_id][0], chunk_id, score, rows[chunk_id][1], rows[chunk_id][2])
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


def _prepare(document_id, text, metadata) -> tuple[str, str, dict, str]:
    """A document checked: (id, text, metadata, content hash)."""
    if not isinstance(document_id, str) or not document_id:
        raise InvalidRequest("document id must be a non-empty string", field="id")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"document {document_id!r} has no text", field="text")
    metadata = metadata or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"document {document_id!r}: metadata must be a JSON object",
                             field="metadata")
    digest = hashlib.sha256(json.dumps([text, metadata], sort_keys=True).encode()).hexdigest()
    return document_id, text, metadata, digest


def build_index(vectors: np.ndarray, ids: np.ndarray, ivf_threshold: int) -> faiss.Index:
    """An index over unit `vectors` [n, dim] with ids: exact inner product below
    `ivf_threshold` vectors, else IVF with ~4 sqrt(n) lists (inner product), trained on at
    most 64 vectors per list (k-means on all of a million would take minutes here)."""
    n, dim = vectors.shape
    if n < ivf_threshold:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:  # enough points per list to train (faiss wants >= 39)
        lists = max(1, min(int(4 * np.sqrt(n)), n // 39))
        # the factory owns its coarse quantizer (a Python-side one could be freed)
        index = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.max_points_per_centroid = 64
        index.train(vectors)
    if n:
        index.add_with_ids(vectors, ids)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int = 16,
                 selector: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k best per query; `nprobe` lists for IVF; `selector` limits
    the candidates inside the search. A few queries run on one OpenMP thread: a single
    query's scan split over two threads measured 2-4x slower here (100k flat: 15 ms vs
    6.7 ms), and concurrent requests bring their own threads."""
    if _is_flat(index):
        params = faiss.SearchParameters(sel=selector) if selector else None
    else:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            params.sel = selector
    threads = faiss.omp_get_max_threads()  # per calling thread in OpenMP
    if len(queries) < 20:
        faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


def _vectors(rows, dim: int) -> np.ndarray:
    """[n, dim] float32 from rows whose second field is an embedding's bytes."""
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])


def _is_flat(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is None
