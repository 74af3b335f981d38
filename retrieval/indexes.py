"""The indexes each replica derives from the state database, one per namespace it has
searched: a FAISS index of the chunks' vectors and their texts for BM25, at some
generation of the namespace (retrieval/store.py has the scheme).

`catch_up` brings a namespace's indexes to the committed generation: incrementally from
the chunks added and the tombstones left since, else from the snapshot on disk, else
rebuilt from the stored vectors. Snapshots are saved under the cache folder, stamped with
the namespace's incarnation and generation.
"""

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Connection, select

from lorag.retrieval.embedder import Embedder
from lorag.retrieval.faiss_index import build_index, is_flat, search_index, stack_vectors
from lorag.retrieval.lexical import LexicalIndex
from lorag.state import Database
from lorag.state.schema import chunks, namespaces, removed_chunks

log = logging.getLogger("lorag.retrieval")


@dataclass
class NamespaceIndex:
    """One namespace's indexes on this replica, exactly at `generation`."""

    incarnation: str
    generation: int
    index: faiss.Index
    texts: dict[int, str]  # chunk id -> text, for BM25
    lexical: LexicalIndex | None = None  # built from texts on demand; None: stale
    saved: bool = field(default=False)  # the snapshot on disk is at this generation

    def bm25(self) -> LexicalIndex:
        """The BM25 index of the texts, built now if a change made it stale."""
        if self.lexical is None:
            self.lexical = LexicalIndex(sorted(self.texts.items()))
        return self.lexical


class ReplicaIndexes:
    """This replica's NamespaceIndex of each namespace it holds. Thread-safe (`lock`)."""

    def __init__(self, db: Database, folder: Path, embedder: Embedder, ivf_threshold: int,
                 nprobe: int):
        self.db, self.embedder = db, embedder
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ivf_threshold, self.nprobe = ivf_threshold, nprobe
        self.held: dict[str, NamespaceIndex] = {}
        self.lock = threading.RLock()

    def generation(self, namespace: str) -> int | None:
        """The generation this replica's indexes of `namespace` are at (None: not held)."""
        with self.lock:
            derived = self.held.get(namespace)
            return None if derived is None else derived.generation

    def refresh(self, namespace: str | None = None) -> None:
        """Catch up `namespace` if this replica holds it, or every namespace it holds
        (None): what a change notification or a poll calls, so that searches find the
        indexes current instead of catching up themselves."""
        with self.lock:
            for held in [namespace] if namespace is not None else list(self.held):
                if held in self.held:
                    self.catch_up(held)

    def save(self) -> None:
        """Save the indexes that changed since their last snapshot."""
        with self.lock:
            for namespace, derived in self.held.items():
                if not derived.saved:
                    self._save(namespace, derived)

    def catch_up(self, namespace: str) -> NamespaceIndex | None:
        """This replica's indexes of `namespace`, brought to the committed generation:
        incrementally from the changes since the held one, else from the snapshot on
        disk, else rebuilt. None if the namespace does not exist."""
        with self.lock, self.db.read() as connection:
            row = connection.execute(select(
                namespaces.c.incarnation, namespaces.c.generation, namespaces.c.floor)
                .where(namespaces.c.name == namespace)).first()
            if row is None:
                self.forget(namespace)
                return None
            incarnation, generation, floor = row
            derived = self.held.get(namespace)
            if derived is None or derived.incarnation != incarnation:
                derived = self._load(namespace, connection, incarnation)
            if derived is None or derived.generation < floor:
                derived = self._rebuild(namespace, connection, incarnation, generation)
            elif derived.generation < generation:
                self._apply_changes(namespace, connection, derived, generation)
            self.held[namespace] = derived
            return derived

    def _apply_changes(self, namespace: str, connection: Connection, derived: NamespaceIndex,
                       generation: int) -> None:
        """Apply the writes in (derived.generation, generation] to the derived indexes."""
        since = derived.generation
        gone = list(connection.scalars(select(removed_chunks.c.chunk_id).where(
            removed_chunks.c.namespace == namespace, removed_chunks.c.seq > since,
            removed_chunks.c.seq <= generation)))
        added = connection.execute(select(chunks.c.id, chunks.c.embedding, chunks.c.text)
                                   .where(chunks.c.namespace == namespace,
                                          chunks.c.seq > since, chunks.c.seq <= generation)
                                   ).all()  # rows of (id, embedding, text)
        if gone:
            derived.index.remove_ids(np.array(gone, dtype=np.int64))
            for chunk_id in gone:
                derived.texts.pop(chunk_id, None)
        if added:
            derived.index.add_with_ids(
                stack_vectors([row.embedding for row in added], self.embedder.dim),
                np.array([row.id for row in added], dtype=np.int64))
            derived.texts.update((row.id, row.text) for row in added)
        derived.generation, derived.lexical, derived.saved = generation, None, False
        if is_flat(derived.index) and derived.index.ntotal >= self.ivf_threshold:
            derived.index = self._build(self._rows(connection, namespace, generation))  # IVF
            self._save(namespace, derived)  # the training is worth keeping

    def _rebuild(self, namespace: str, connection: Connection, incarnation: str,
                 generation: int) -> NamespaceIndex:
        rows = self._rows(connection, namespace, generation, texts=True)  # once for both
        derived = NamespaceIndex(incarnation, generation, self._build(rows),
                                 {row.id: row.text for row in rows})
        self._save(namespace, derived)
        return derived

    @staticmethod
    def _texts(connection: Connection, namespace: str, generation: int) -> dict[int, str]:
        """chunk id -> text of the namespace's chunks up to `generation` (for BM25)."""
        return dict(connection.execute(select(chunks.c.id, chunks.c.text).where(
            chunks.c.namespace == namespace, chunks.c.seq <= generation)).all())

    @staticmethod
    def _rows(connection: Connection, namespace: str, generation: int,
              texts: bool = False) -> list:
        """Every stored chunk of the namespace up to `generation`: (id, embedding), and
        its text too when `texts`."""
        columns = [chunks.c.id, chunks.c.embedding, *([chunks.c.text] if texts else [])]
        return connection.execute(select(*columns).where(
            chunks.c.namespace == namespace, chunks.c.seq <= generation)).all()

    def _build(self, rows: list) -> faiss.Index:
        """A fresh index over the vectors of `rows` (from `_rows`)."""
        return build_index(stack_vectors([row.embedding for row in rows], self.embedder.dim),
                           np.array([row.id for row in rows], dtype=np.int64),
                           self.ivf_threshold)

    def _load(self, namespace: str, connection: Connection,
              incarnation: str) -> NamespaceIndex | None:
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
        return NamespaceIndex(incarnation, generation, index, texts, saved=True)

    def _save(self, namespace: str, derived: NamespaceIndex) -> None:
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

    def forget(self, namespace: str) -> None:
        self.held.pop(namespace, None)
        for path in self._paths(namespace):
            path.unlink(missing_ok=True)

    def _paths(self, namespace: str) -> tuple[Path, Path]:
        return self.folder / f"{namespace}.index", self.folder / f"{namespace}.json"

    def vector_search(self, derived: NamespaceIndex, query: str, k: int,
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
